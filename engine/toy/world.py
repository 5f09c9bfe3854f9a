"""The toy world's dataset: configuration, on-first-use generation into a cache, validation and repair.

``ensure_dataset(cfg)`` returns the path of ``manifest.jsonl`` in ``<cache_dir>/toyworld-v<version>-<key>/``, where
``key`` hashes every config field but ``cache_dir``: changing the world makes a new directory, never a mixed one. Each
manifest line holds ``path`` (relative to the manifest), ``caption``, ``fps``, ``frames``, ``width``, ``height``,
``split`` (train/val), ``params`` (:class:`ClipParams` as a dict) and the hashes used to validate the cache.

Repair rules: a missing, partial or mismatched manifest (or ``meta.json``) rebuilds the whole dataset; a clip whose file
is missing or whose bytes do not match the manifest's sha256 is regenerated alone (every clip is a pure function of
``(seed, index)``). Each repair is logged with its reason and counted in :class:`DatasetStatus`. A file lock makes
concurrent callers (several ranks) wait for one builder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.toy.captions import ClipParams, caption
from engine.toy.render import render_clip, sample_params
from engine.toy.videos import PIX_FMTS, frames_hash, read_video, sha256_bytes, sha256_file, write_vp9

log = logging.getLogger(__name__)

ENTRY_KEYS = frozenset({"path", "caption", "split", "params", "file_sha256", "file_bytes", "decoded_sha256"})
GENERATOR_VERSION = 1
"""Bump when rendering or encoding changes: old caches then live in another directory and are left alone."""


@dataclass
class ToyWorldConfig:
    """The procedural toy world (docs/toy-world.md#clips). Defaults: 32x32 pixels, 9 frames at 8 fps, so the toy codec's
    8x8x9 latents are 144 DiT tokens after the (1, 2, 2) patch."""

    cache_dir: str = "cache/toy"
    """Where datasets are generated on first use (one subdirectory per distinct world)."""
    num_clips: int = 1024
    """Clips in the dataset (train + val)."""
    val_fraction: float = 0.1
    """Share of clips (the last ones) marked split=val: held out for codec PSNR and metric references."""
    seed: int = 0
    """Clip i draws all its randomness from numpy.random.default_rng([seed, i])."""
    height: int = 32
    """Frame height in pixels."""
    width: int = 32
    """Frame width in pixels."""
    num_frames: int = 9
    """Frames per clip (odd, so latent F is odd for the half-frame-rate scheme: 9 -> 5 -> 9)."""
    fps: float = 8.0
    """Frame rate written into the files."""
    speeds: tuple[float, ...] = (1.0, 2.0)
    """Object speeds in pixels per frame (travel 8-16 px over 9 frames; halve them for 17 frames)."""
    static_fraction: float = 0.2
    """Share of clips whose objects stay still."""
    two_object_fraction: float = 0.2
    """Share of clips with two objects (distinct colours, same motion)."""
    pan_fraction: float = 0.5
    """Share of texture-background clips whose camera pans left or right."""
    pan_speed: float = 0.5
    """Background drift of a pan in pixels per frame."""
    object_size: tuple[float, float] = (0.31, 0.375)
    """Range of an object's box side as a fraction of min(height, width) (10-12 px at 32x32)."""
    pix_fmt: str = "yuv444p"
    """VP9 chroma format: yuv444p (lossless, DALI CPU == PyAV) or yuv420p (NVDEC-compatible, lossy chroma)."""

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        checks = [
            (self.num_clips >= 1, "num_clips", "must be >= 1"),
            (0 <= self.val_fraction < 1, "val_fraction", "must lie in [0, 1)"),
            (self.height >= 16 and self.width >= 16, "height", "frames must be at least 16x16"),
            (self.num_frames >= 3 and self.num_frames % 2 == 1, "num_frames", "must be odd and >= 3"),
            (self.fps > 0, "fps", "must be positive"),
            (len(self.speeds) >= 1 and min(self.speeds) > 0, "speeds", "needs positive speeds"),
            (all(0 <= f <= 1 for f in self._fractions()), "static_fraction", "fractions must lie in [0, 1]"),
            (0 < self.object_size[0] <= self.object_size[1] < 1, "object_size", "needs 0 < min <= max < 1"),
            (self.pix_fmt in PIX_FMTS, "pix_fmt", f"must be one of {PIX_FMTS}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"toy world `{key}`: {msg} (got {getattr(self, key)!r})")
        travel = max(self.speeds) * (self.num_frames - 1) + self.object_size[1] * min(self.height, self.width) + 2
        if travel > min(self.height, self.width):
            raise ValueError(f"toy world `speeds`: the fastest object travels out of the frame ({travel:.1f} px path)")

    def _fractions(self) -> tuple[float, ...]:
        return self.static_fraction, self.two_object_fraction, self.pan_fraction

    def key(self) -> str:
        """Hash of everything that shapes the data (not where it is cached)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "cache_dir"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def num_val(self) -> int:
        return int(round(self.num_clips * self.val_fraction))


@dataclass
class DatasetStatus:
    """What :func:`sync_dataset` did: ``reasons`` counts (re)generated clips by cause."""

    manifest: Path
    generated: int = 0
    reasons: Counter = field(default_factory=Counter)
    render_seconds: float = 0.0
    encode_seconds: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        per = 1000.0 / max(self.generated, 1)
        return "\n".join(
            [
                f"manifest: {self.manifest}",
                f"clips generated: {self.generated} {dict(self.reasons)}",
                f"time: {self.seconds:.2f} s total (validation included)",
                f"  render: {self.render_seconds:.2f} s ({self.render_seconds * per:.1f} ms/clip)",
                f"  VP9 encode + decode check: {self.encode_seconds:.2f} s ({self.encode_seconds * per:.1f} ms/clip)",
            ]
        )


def dataset_dir(cfg: ToyWorldConfig) -> Path:
    return Path(cfg.cache_dir) / f"toyworld-v{GENERATOR_VERSION}-{cfg.key()}"


def ensure_dataset(cfg: ToyWorldConfig, progress: bool = True) -> Path:
    """Generate, validate or repair the dataset as needed; return the path of its manifest.jsonl."""
    return sync_dataset(cfg, progress=progress).manifest


def sync_dataset(cfg: ToyWorldConfig, progress: bool = True) -> DatasetStatus:
    """:func:`ensure_dataset` with a report of what was generated and how long it took."""
    cfg.validate()
    root = dataset_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    status = DatasetStatus(manifest=root / "manifest.jsonl")
    start = time.perf_counter()
    with _locked(root / ".lock"):
        entries, why = _load_manifest_checked(root, cfg)
        if entries is None:
            fresh = not (root / "clips").exists()  # first use is routine; a damaged cache deserves a warning
            log.log(
                logging.INFO if fresh else logging.WARNING,
                "toy dataset %s: %s; building %d clips",
                root,
                why,
                cfg.num_clips,
            )
            todo = {i: why for i in range(cfg.num_clips)}
            entries = [None] * cfg.num_clips
        else:
            todo = {i: r for i, e in enumerate(entries) if (r := _clip_problem(root, e)) is not None}
            for i, r in todo.items():
                log.warning("toy dataset %s: clip %d %s; regenerating it", root, i, r)
        for i in tqdm(sorted(todo), desc="toy clips", disable=not progress or len(todo) < 50):
            entries[i] = _make_clip(cfg, root, i, status)
            status.reasons[todo[i]] += 1
        status.generated = len(todo)
        if todo:
            _write_manifest(root, cfg, entries)
    status.seconds = time.perf_counter() - start
    return status


# ---------------------------------------------------------------------------------------------------------------------
# One clip
# ---------------------------------------------------------------------------------------------------------------------


def _make_clip(cfg: ToyWorldConfig, root: Path, index: int, status: DatasetStatus) -> dict[str, Any]:
    t0 = time.perf_counter()
    params = sample_params(cfg, index)
    frames = render_clip(params, cfg.height, cfg.width, cfg.num_frames)  # (T, H, W, 3) uint8
    t1 = time.perf_counter()
    rel = f"clips/{index:06d}.webm"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_vp9(tmp, frames, cfg.fps, cfg.pix_fmt)
    decoded = read_video(tmp)  # proves the file decodes; its hash lets `verify --deep` catch decoder drift
    os.replace(tmp, path)
    status.render_seconds += t1 - t0
    status.encode_seconds += time.perf_counter() - t1
    data = path.read_bytes()
    return {
        "path": rel,
        "caption": caption(params),
        "fps": cfg.fps,
        "frames": cfg.num_frames,
        "width": cfg.width,
        "height": cfg.height,
        "split": "val" if index >= cfg.num_clips - cfg.num_val() else "train",
        "params": params.to_dict(),
        "frames_sha256": frames_hash(frames),
        "decoded_sha256": frames_hash(decoded),
        "file_sha256": sha256_bytes(data),
        "file_bytes": len(data),
    }


def _clip_problem(root: Path, entry: dict[str, Any]) -> str | None:
    """Why a manifest entry's file cannot be trusted, or None when it is intact."""
    path = root / entry["path"]
    if not path.is_file():
        return "file missing"
    if path.stat().st_size != entry["file_bytes"] or sha256_file(path) != entry["file_sha256"]:
        return "file corrupted (sha256 mismatch)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------------


def _meta(cfg: ToyWorldConfig) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, "config": d}))  # tuples -> lists


def _write_manifest(root: Path, cfg: ToyWorldConfig, entries: list[dict[str, Any]]) -> None:
    """Manifest then meta, each written to a temp file and renamed: a crash leaves no half-valid pair."""
    (root / "meta.json").unlink(missing_ok=True)
    tmp = root / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    os.replace(tmp, root / "manifest.jsonl")
    tmp = root / "meta.json.tmp"
    tmp.write_text(json.dumps({**_meta(cfg), "num_clips": len(entries)}, sort_keys=True, indent=1))
    os.replace(tmp, root / "meta.json")


def _load_manifest_checked(root: Path, cfg: ToyWorldConfig) -> tuple[list[dict] | None, str]:
    """(entries, "") when manifest and meta are complete and match ``cfg``; else (None, reason)."""
    meta_path, manifest = root / "meta.json", root / "manifest.jsonl"
    if not manifest.is_file() or not meta_path.is_file():
        return None, "missing or partial cache (no manifest/meta)"
    try:
        meta = json.loads(meta_path.read_text())
        entries = read_manifest(manifest)
    except (OSError, ValueError) as exc:
        return None, f"unreadable manifest/meta ({exc})"
    if {k: meta.get(k) for k in ("generator_version", "config")} != _meta(cfg):
        return None, "meta.json does not match the config"
    if len(entries) != cfg.num_clips or meta.get("num_clips") != cfg.num_clips:
        return None, f"partial manifest ({len(entries)} of {cfg.num_clips} clips)"
    if any(not isinstance(e, dict) or not ENTRY_KEYS.issubset(e) for e in entries):
        return None, "manifest entries without their path/hash fields"
    return entries, ""


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Entries of a manifest.jsonl; raises ValueError naming the first bad line."""
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
    return entries


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield


# ---------------------------------------------------------------------------------------------------------------------
# Reading the dataset back
# ---------------------------------------------------------------------------------------------------------------------


def load_clips(
    manifest: str | Path, split: str | None = None, limit: int | None = None
) -> tuple[np.ndarray, list[ClipParams], list[str]]:
    """Decode clips of a manifest (optionally one split, the first ``limit``): uint8 ``(N, T, H, W, 3)``, their
    parameters and captions."""
    manifest = Path(manifest)
    entries = [e for e in read_manifest(manifest) if split is None or e["split"] == split][:limit]
    if not entries:
        raise ValueError(f"{manifest}: no clips in split {split!r}")
    videos = np.stack([read_video(manifest.parent / e["path"]) for e in entries])
    return videos, [ClipParams.from_dict(e["params"]) for e in entries], [e["caption"] for e in entries]


def verify_dataset(cfg: ToyWorldConfig, deep: bool = False) -> Counter:
    """Check the cache without repairing it; counts of "ok" and of each problem. ``deep`` also decodes every file and
    compares its pixels with the hash recorded when it was written."""
    root = dataset_dir(cfg)
    entries, why = _load_manifest_checked(root, cfg)
    if entries is None:
        return Counter({why: cfg.num_clips})
    counts: Counter = Counter()
    for e in entries:
        problem = _clip_problem(root, e)
        if problem is None and deep:
            try:
                if frames_hash(read_video(root / e["path"])) != e["decoded_sha256"]:
                    problem = "decoded pixels differ from the recorded hash"
            except Exception as exc:  # av.FFmpegError and friends: report, do not stop
                problem = f"decode failed ({type(exc).__name__})"
        counts[problem or "ok"] += 1
    return counts
