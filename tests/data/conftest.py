"""Shared fixtures: tiny VP9/H.264 clips and manifests, written once per session into a temp dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.data.manifest import ManifestEntry
from tests.data.clips import write_clip

NUM_GOOD = 6


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """Six VP9 clips (24 fps, 30 frames, sizes 64x48 and 48x64), one H.264 clip."""
    d = tmp_path_factory.mktemp("clips")
    for i in range(NUM_GOOD):
        w, h = (64, 48) if i % 2 == 0 else (48, 64)
        write_clip(d / f"vp9_{i}", codec="vp9", num_frames=30, width=w, height=h, seed=i)
    write_clip(d / "h264_0", codec="h264", num_frames=30, width=64, height=48, seed=7)
    return d


@pytest.fixture(scope="session")
def vp9_entries(clip_dir) -> list[ManifestEntry]:
    paths = sorted(clip_dir.glob("vp9_*.webm"))
    return [ManifestEntry(i, str(p), f"a clip number {i}") for i, p in enumerate(paths)]


@pytest.fixture(scope="session")
def h264_path(clip_dir) -> str:
    return str(clip_dir / "h264_0.mp4")
