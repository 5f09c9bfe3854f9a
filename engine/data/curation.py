"""Data curation (paper appendix 6, docs/method.md#data-curation): filter raw videos, rank survivors, write a manifest.

Stages, in order (a video's ``reason`` is the first it fails):

1. resolution: width >= 1280 and height >= 720 (``low_resolution``); length: enough source frames for one training
   clip of ``clip_frames`` frames at ``clip_fps`` (the recipe's ``data.num_frames`` and ``data.fps``; ``too_short``);
2. frames 1, 21, 41, 61: hue entropy >= 0.60 (``monochrome``) and Laplacian variance >= 20.0 (``blurry``) on *each*;
3. mean optical-flow magnitude >= 0.2 (``static``);
4. keep the top 50% by temporal consistency (``low_consistency``);
5. keep the top 50% by aesthetic score (``low_aesthetic``) -- only when a scorer is configured: the paper's model is
   not something we download, so ``aesthetic_scorer="package.module:function"`` plugs one in (``function(rgb)``
   takes an (H, W, 3) uint8 frame and returns a float; 8 frames are averaged).

The report stores measurements, not verdicts. Each row holds the file's size and modification time, the container's
numbers (``curation_stats.probe_stats``) and, for a video that passes stage 1, every decoded statistic
(``curation_stats.frame_stats``, with the settings they were measured with). Measuring runs in a process pool (in
this process with one worker); each row is appended to the JSONL report as it arrives, so a killed run resumes. Every
run then decides from the stored numbers with the current thresholds (``reason_of``, ``rank``) and rewrites the report
with the derived ``kept`` and ``reason``, which are never read back. A video is measured again only when its file
changed (size or mtime), when it was measured with other measuring settings (``curation_stats.MEASURE_SETTINGS``, the
aesthetic scorer), or when it now passes stage 1 and has no decoded statistics yet: a changed threshold costs no
decoding.

Input errors: a manifest listing a path twice is refused (``ManifestError`` naming the lines); skipped manifest rows
are counted in the summary (``manifest_row:<reason>``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
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
from engine.data.curation_stats import file_key, frame_stats, measured_alike, probe_stats
from engine.data.manifest import ManifestError, load_manifest, write_manifest
from engine.data.probe import clip_span

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
    """Worker processes (1: measure in this process)."""
    clip_frames: int = 81
    """Frames of one training clip (the recipe's data.num_frames); shorter videos are ``too_short`` (1: no minimum)."""
    clip_fps: float = 16.0
    """Frame rate the training clip is sampled at (the recipe's data.fps)."""

    def __post_init__(self):
        if not (0 < self.consistency_keep <= 1 and 0 < self.aesthetic_keep <= 1):
            raise ValueError("consistency_keep and aesthetic_keep must lie in (0, 1]")
        if self.workers < 1 or self.flow_pairs < 1 or self.hue_bins < 1 or self.clip_frames < 1:
            raise ValueError("workers, flow_pairs, hue_bins and clip_frames must be >= 1")
        if not (math.isfinite(self.clip_fps) and self.clip_fps > 0):
            raise ValueError("clip_fps must be a positive number")


UNITS = {
    "min_width": "pixels",
    "min_height": "pixels",
    "frame_positions": "0-based frame indices, comma-separated",
    "hue_entropy_min": "bits",
    "hue_bins": "bins",
    "achromatic": "8-bit level, 0-255",
    "laplacian_var_min": "8-bit grey level squared",
    "flow_min": "pixels per source frame, at flow_height",
    "flow_pairs": "frame pairs",
    "flow_height": "pixels",
    "consistency_keep": "share, (0, 1]",
    "aesthetic_scorer": "package.module:function",
    "aesthetic_frames": "frames",
    "aesthetic_keep": "share, (0, 1]",
    "workers": "processes",
    "clip_frames": "frames",
    "clip_fps": "frames per second",
}
"""The unit of each CurationConfig field (``launcher/curate.py --help`` lists them)."""


def describe_fields() -> list[tuple[str, Any, str, str]]:
    """(key, default, unit, one-line doc) of every CurationConfig field, in declaration order."""
    body = ast.parse(inspect.getsource(CurationConfig)).body[0].body
    docs = {
        a.target.id: b.value.value
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }
    defaults = CurationConfig()
    return [(f.name, getattr(defaults, f.name), UNITS[f.name], docs[f.name]) for f in dataclasses.fields(defaults)]


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


def _measure(args: tuple[str, CurationConfig]) -> dict[str, Any]:
    """The report row of one video: file identity, container numbers and (past stage 1) the decoded statistics."""
    path, cfg = args
    row: dict[str, Any] = {"path": path, **file_key(path), **probe_stats(path)}
    if _probe_reason(row, cfg) is None:
        row.update(frame_stats(path, row["num_frames"], cfg, load_scorer(cfg.aesthetic_scorer)))
    return row


def frames_needed(fps: float, cfg: CurationConfig) -> int:
    """Source frames at ``fps`` that one training clip of ``cfg.clip_frames`` at ``cfg.clip_fps`` takes."""
    return int(clip_span(cfg.clip_frames, fps, cfg.clip_fps)[-1]) + 1


def _probe_reason(row: dict[str, Any], cfg: CurationConfig) -> Optional[str]:
    """Stage 1, from the container's numbers: unreadable, ``low_resolution`` or ``too_short`` (None: passed)."""
    if "error" in row:
        return f"unreadable:{row['error']}"
    if row["width"] < cfg.min_width or row["height"] < cfg.min_height:
        return "low_resolution"
    if row["num_frames"] < frames_needed(row["fps"], cfg):
        return "too_short"
    return None


def reason_of(row: dict[str, Any], cfg: CurationConfig) -> Optional[str]:
    """The first filter a measured video fails with ``cfg``'s thresholds; None when it passes them all."""
    reason = _probe_reason(row, cfg)
    if reason is not None:
        return reason
    if min(row["hue_entropy"]) < cfg.hue_entropy_min:
        return "monochrome"
    if min(row["laplacian_var"]) < cfg.laplacian_var_min:
        return "blurry"
    if row["flow_mean"] < cfg.flow_min:
        return "static"
    return None


def _stale(row: Optional[dict[str, Any]], path: str, cfg: CurationConfig) -> bool:
    """Whether ``row`` (from the report) cannot decide ``path`` with ``cfg``, so the video is measured again."""
    if row is None or {k: row.get(k) for k in ("size", "mtime_ns") if k in row} != file_key(path):
        return True  # never measured, or the file changed (or appeared, or went away)
    if _probe_reason(row, cfg) is not None:
        return False  # decided by the container's numbers
    return not ("hue_entropy" in row and measured_alike(row.get("measured_with", {}), cfg))


def list_inputs(source: str | os.PathLike, skipped: Optional[dict[str, int]] = None) -> list[dict[str, Any]]:
    """Rows ``{"path", "caption", ...}`` from a manifest (caption optional) or every video under a directory.

    Skipped manifest rows are counted into ``skipped`` by reason. A path listed twice raises :class:`ManifestError`
    naming its lines: which row's caption to keep is the user's call, not ours.
    """
    src = Path(source)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        return [{"path": str(p), "caption": ""} for p in paths]
    manifest = load_manifest(src, require_caption=False)
    if skipped is not None:
        skipped.update(manifest.skipped.counts)
    lines: dict[str, list[str]] = {}
    for e in manifest.entries:
        lines.setdefault(os.path.normpath(e.path), []).append(e.where.removeprefix("line "))
    dups = [f"{p} (lines {', '.join(w)})" for p, w in lines.items() if len(w) > 1]
    if dups:
        more = f"; and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise ManifestError(
            f"manifest {src}: {len(dups)} path(s) listed more than once: {'; '.join(dups[:5])}{more}; keep one row "
            "per video"
        )
    return [{"path": e.path, "caption": e.caption, **e.meta} for e in manifest.entries]


def _read_report(path: Path) -> dict[str, dict[str, Any]]:
    """The measurements of the report, by path; the verdicts of an earlier run (``kept``, ``reason``) are dropped."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["path"]] = {k: v for k, v in row.items() if k not in ("kept", "reason")}
    return done


def _analyze_all(todo: list[str], cfg: CurationConfig, report: Path, progress: bool) -> Iterator[dict[str, Any]]:
    if not todo:
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (torch, DALI)
    with (
        ctx.Pool(min(cfg.workers, len(todo)), initializer=_worker_init) if cfg.workers > 1 else _NoPool() as pool,
        open(report, "a", encoding="utf-8", errors="surrogateescape") as fh,
    ):
        results = pool.imap_unordered(_measure, [(p, cfg) for p in todo], chunksize=1)
        for row in console.progress(results, total=len(todo), disable=not progress, desc="curate", unit="video"):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()  # one line per finished video: what resume reads back
            yield row


class _NoPool:
    """One worker: measure in this process (no start-up cost, and what runs can be observed)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, items, chunksize=1):
        return map(fn, items)


def _keep_top(rows: list[dict[str, Any]], key: str, share: float, reason: str) -> list[dict[str, Any]]:
    """The top ``ceil(share * n)`` rows by ``key`` (ties by path); the others get ``reason``."""
    ranked = sorted(rows, key=lambda r: (-r[key], r["path"]))
    n_keep = math.ceil(share * len(ranked))
    for r in ranked[n_keep:]:
        r["reason"] = reason
    return ranked[:n_keep]


def rank(rows: Sequence[dict[str, Any]], cfg: CurationConfig) -> list[dict[str, Any]]:
    """Decide every measured row with ``cfg`` (``reason_of``), then apply the two top-share rankings to the rows that
    passed the filters; sets ``kept`` and ``reason`` on every row."""
    for r in rows:
        r["kept"] = False
        r["reason"] = reason_of(r, cfg)
    survivors = [r for r in rows if r["reason"] is None]
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

    Returns a summary: counts of kept videos, of each rejection reason and of skipped manifest rows
    (``manifest_row:<reason>``). Raises :class:`ManifestError` for a path listed twice.
    """
    cfg = cfg or CurationConfig()
    skipped: dict[str, int] = {}
    inputs = {row["path"]: row for row in list_inputs(source, skipped)}
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    done = _read_report(report)
    todo = [p for p in inputs if _stale(done.get(p), p, cfg)]
    if done:
        logger.info("curate: %d of %d videos decided from the measurements in %s, %d to measure",
                    len(inputs) - len(todo), len(inputs), report, len(todo))  # fmt: skip
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
    summary.update({f"manifest_row:{k}": v for k, v in sorted(skipped.items())})
    return summary


def _manifest_row(source_row: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    meta = {k: stats[k] for k in ("width", "height", "fps", "num_frames", "consistency", "aesthetic") if k in stats}
    return {**source_row, **meta}
