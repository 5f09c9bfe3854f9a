"""Data curation (paper appendix 6, docs/method.md#data-curation): filter raw videos, rank survivors, write a manifest.

Stages, in order (a video stops at the first it fails; the report keeps every statistic computed up to there):

1. resolution: width >= 1280 and height >= 720 (``low_resolution``);
2. frames 1, 21, 41, 61: hue entropy >= 0.60 (``monochrome``) and Laplacian variance >= 20.0 (``blurry``) on *each*;
3. mean optical-flow magnitude >= 0.2 (``static``);
4. keep the top 50% by temporal consistency (``low_consistency``);
5. keep the top 50% by aesthetic score (``low_aesthetic``) -- only when a scorer is configured: the paper's model is
   not something we download, so ``aesthetic_scorer="package.module:function"`` plugs one in (``function(rgb)``
   takes an (H, W, 3) uint8 frame and returns a float; 8 frames are averaged).

Statistics are computed in a process pool (``curation_stats.analyze_video``); each result is appended to the JSONL
report as it arrives, so a killed run resumes by skipping the paths already in the report. Ranking runs at the end
over every video that passed the filters, and the report is rewritten with each video's final ``kept`` and ``reason``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine import console
from engine.data.curation_stats import analyze_video
from engine.data.manifest import load_manifest, write_manifest

logger = logging.getLogger("engine.data")

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")


@dataclass
class CurationConfig:
    """Thresholds of the paper's appendix 6 (defaults) and how the statistics are computed."""

    min_width: int = 1280
    """Reject videos narrower than this (720p)."""
    min_height: int = 720
    """Reject videos shorter than this (720p)."""
    frame_positions: tuple[int, ...] = (0, 20, 40, 60)
    """0-based frames checked for monochrome/blur (the paper's 1st, 21st, 41st, 61st); positions past the end drop."""
    hue_entropy_min: float = 0.60
    """Reject when any checked frame's hue entropy (bits) is below this."""
    hue_bins: int = 36
    """Hue histogram bins over OpenCV's 0-179 hue (10 degrees each)."""
    achromatic: int = 20
    """Pixels with saturation or value below this (of 255) count as grey, in one extra bin."""
    laplacian_var_min: float = 20.0
    """Reject when any checked frame's Laplacian variance is below this."""
    flow_min: float = 0.2
    """Reject when the mean optical-flow magnitude (pixels/frame at flow_height) is below this."""
    flow_pairs: int = 16
    """Consecutive frame pairs, spread over the video, used for flow and consistency."""
    flow_height: int = 480
    """Frames are downscaled to this height for flow and consistency (never upscaled)."""
    consistency_keep: float = 0.5
    """Share of the filtered videos kept by temporal consistency (top first)."""
    aesthetic_scorer: Optional[str] = None
    """``module:function`` scoring an (H, W, 3) uint8 RGB frame; None switches the aesthetic ranking off."""
    aesthetic_frames: int = 8
    """Frames averaged for the aesthetic score."""
    aesthetic_keep: float = 0.5
    """Share kept by aesthetic score (after the consistency ranking)."""
    workers: int = 2
    """Worker processes."""

    def __post_init__(self):
        if not (0 < self.consistency_keep <= 1 and 0 < self.aesthetic_keep <= 1):
            raise ValueError("consistency_keep and aesthetic_keep must lie in (0, 1]")
        if self.workers < 1 or self.flow_pairs < 1 or self.hue_bins < 1:
            raise ValueError("workers, flow_pairs and hue_bins must be >= 1")


def load_scorer(spec: Optional[str]) -> Any:
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"aesthetic_scorer {spec!r} must look like package.module:function")
    return getattr(importlib.import_module(module), name)


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


def _analyze(args: tuple[str, CurationConfig]) -> dict[str, Any]:
    path, cfg = args
    return analyze_video(path, cfg, load_scorer(cfg.aesthetic_scorer))


def list_inputs(source: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows ``{"path", "caption", ...}`` from a manifest (caption optional) or every video under a directory."""
    src = Path(source)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        return [{"path": str(p), "caption": ""} for p in paths]
    manifest = load_manifest(src, require_caption=False)
    return [{"path": e.path, "caption": e.caption, **e.meta} for e in manifest.entries]


def _read_report(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["path"]] = row
    return done


def _analyze_all(todo: list[str], cfg: CurationConfig, report: Path, progress: bool) -> Iterator[dict[str, Any]]:
    if not todo:
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (torch, DALI)
    with (
        ctx.Pool(min(cfg.workers, len(todo)), initializer=_worker_init) as pool,
        open(report, "a", encoding="utf-8", errors="surrogateescape") as fh,
    ):
        results = pool.imap_unordered(_analyze, [(p, cfg) for p in todo], chunksize=1)
        for row in console.progress(results, total=len(todo), disable=not progress, desc="curate", unit="video"):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()  # one line per finished video: what resume reads back
            yield row


def _keep_top(rows: list[dict[str, Any]], key: str, share: float, reason: str) -> list[dict[str, Any]]:
    """The top ``ceil(share * n)`` rows by ``key`` (ties by path); the others get ``reason``."""
    ranked = sorted(rows, key=lambda r: (-r[key], r["path"]))
    n_keep = math.ceil(share * len(ranked))
    for r in ranked[n_keep:]:
        r["reason"] = reason
    return ranked[:n_keep]


def rank(rows: Sequence[dict[str, Any]], cfg: CurationConfig) -> list[dict[str, Any]]:
    """Apply the two top-share rankings to the rows that passed the filters; set ``kept`` on every row."""
    for r in rows:
        r["kept"] = False
        r["reason"] = r.get("reason") if not r.get("passed_filters") else None
    survivors = [r for r in rows if r.get("passed_filters")]
    survivors = _keep_top(survivors, "consistency", cfg.consistency_keep, "low_consistency")
    if cfg.aesthetic_scorer:
        survivors = _keep_top(survivors, "aesthetic", cfg.aesthetic_keep, "low_aesthetic")
    for r in survivors:
        r["kept"] = True
    return survivors


def curate(
    source: str | os.PathLike,
    out_manifest: str | os.PathLike,
    report: str | os.PathLike,
    cfg: Optional[CurationConfig] = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Filter and rank the videos of ``source``; write the kept manifest and the per-video report.

    Returns a summary: counts of kept videos and of each rejection reason.
    """
    cfg = cfg or CurationConfig()
    inputs = {row["path"]: row for row in list_inputs(source)}
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    done = _read_report(report)
    todo = [p for p in inputs if p not in done]
    if done:
        logger.info("curate: resuming, %d of %d videos already in %s", len(inputs) - len(todo), len(inputs), report)
    for row in _analyze_all(todo, cfg, report, progress):
        done[row["path"]] = row
    rows = [done[p] for p in inputs]  # the input order; report rows of paths no longer in the input are dropped
    kept = rank(rows, cfg)  # sets r["kept"] on every row
    write_manifest([_manifest_row(inputs[r["path"]], r) for r in rows if r["kept"]], out_manifest)
    write_manifest(rows, report)  # final statuses (atomic rewrite)
    summary: dict[str, Any] = {"inputs": len(rows), "kept": len(kept)}
    for r in rows:
        if not r["kept"]:
            summary[r["reason"]] = summary.get(r["reason"], 0) + 1
    return summary


def _manifest_row(source_row: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    meta = {k: stats[k] for k in ("width", "height", "fps", "num_frames", "consistency", "aesthetic") if k in stats}
    return {**source_row, **meta}
