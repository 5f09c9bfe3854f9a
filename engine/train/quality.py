"""Quality monitors: the sample videos written during distillation, scored, and compared with the teacher's.

At every sample step the sample videos (``logging.sample_*``) are scored on rank 0 with measures that need no extra
model: ``saturation`` (mean HSV saturation of the decoded frames, OpenCV), ``frame_diff`` (mean absolute change
between consecutive frames, 0-1: a motion figure) and ``latent_temporal_variance`` (the population variance over
latent frames, averaged over channels and positions: the quantity the temporal regularization raises). A world may add
its own scores (the toy world: every metric of ``engine/toy/metrics.py`` against the captions of its sample prompts).

Before the first scores the teacher samples the same prompts and seeds once (``logging.quality.teacher_reference``;
50 steps with CFG, collective like the student's samples), scored the same way and cached in
``<run_dir>/quality/teacher.json`` keyed by the teacher's weights and the sampler. A score that drifts past its
margin against the teacher's figure (saturation up, motion down) is a warning line in ``train.log``. Every scored
step is one JSON line of ``<run_dir>/quality/scores.jsonl`` and TensorBoard scalars ``quality/<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.config import RunConfig
from engine.fsutil import atomic_write_text

Scorer = Callable[[torch.Tensor], dict[str, float]]
"""(N, 3, T, H, W) videos in [-1, 1] -> world-specific scores (means over the videos)."""

WATCHED = {"saturation": "up", "frame_diff": "down", "travel": "down", "saturation_ratio": "up"}
"""Scores compared with the teacher's figure, and the direction that is a regression."""


def _uint8(videos: torch.Tensor) -> np.ndarray:
    """(N, 3, T, H, W) in [-1, 1] -> uint8 (N, T, H, W, 3)."""
    x = ((videos.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous().numpy()


def video_scores(latents: torch.Tensor, videos: torch.Tensor) -> dict[str, float]:
    """The model-free scores of (N, C, F, h, w) latents and their (N, 3, T, H, W) decoded videos in [-1, 1]."""
    clips = _uint8(videos)
    sat = [
        np.mean([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2HSV)[..., 1].mean() / 255.0 for f in clip])
        for clip in clips
    ]
    frames = clips.astype(np.float32) / 255.0
    diff = np.abs(np.diff(frames, axis=1)).mean(axis=(1, 2, 3, 4)) if frames.shape[1] > 1 else np.zeros(len(clips))
    lat = latents.float()
    variance = lat.var(dim=2, unbiased=False).mean(dim=(1, 2, 3)) if lat.shape[2] > 1 else torch.zeros(len(lat))
    return {
        "saturation": float(np.mean(sat)),
        "frame_diff": float(np.mean(diff)),
        "latent_temporal_variance": float(variance.mean()),
    }


@dataclass
class Margins:
    saturation: float
    """Relative rise of saturation over the teacher's that is warned about."""
    motion: float
    """Relative fall of motion (frame_diff, and travel where a world measures it) under the teacher's."""

    def of(self, name: str) -> float:
        return self.saturation if name.startswith("saturation") else self.motion


def drift_warnings(scores: dict[str, float], teacher: dict[str, float], margins: Margins) -> list[str]:
    """One line per watched score past its margin against the teacher's figure."""
    out = []
    for name, bad in WATCHED.items():
        if name not in scores or name not in teacher or not np.isfinite(teacher[name]) or teacher[name] <= 0:
            continue
        rel = scores[name] / teacher[name] - 1.0
        margin = margins.of(name)
        if (bad == "up" and rel > margin) or (bad == "down" and rel < -margin):
            word = "above" if rel > 0 else "below"
            out.append(
                f"{name} {scores[name]:.4g} is {abs(rel):.0%} {word} the teacher's {teacher[name]:.4g} "
                f"(logging.quality margin {margin:.0%})"
            )
    return out


class QualityMonitor:
    """Rank 0: scores a sample step's videos, keeps the teacher's figures, writes ``quality/`` and warns."""

    def __init__(self, cfg: RunConfig, scorer: Scorer | None = None, teacher_key: dict | None = None):
        q = cfg.logging.quality
        self.dir = Path(cfg.logging.run_dir) / "quality"
        self.scorer = scorer
        self.margins = Margins(q.saturation_margin, q.motion_margin)
        self.teacher_key = teacher_key
        self.teacher: dict[str, float] | None = None
        if teacher_key is not None:
            path = self.dir / "teacher.json"
            if path.is_file():
                cached = json.loads(path.read_text())
                if cached.get("key") == teacher_key:
                    self.teacher = cached["scores"]

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_key is not None and self.teacher is None

    def score(self, latents: torch.Tensor, videos: torch.Tensor) -> dict[str, float]:
        scores = video_scores(latents, videos)
        if self.scorer is not None:
            scores |= {k: float(v) for k, v in self.scorer(videos).items()}
        return scores

    def set_teacher(self, latents: torch.Tensor, videos: torch.Tensor) -> None:
        self.teacher = self.score(latents, videos)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "teacher.json", json.dumps({"key": self.teacher_key, "scores": self.teacher}))

    def report(self, step: int, latents: torch.Tensor, videos: torch.Tensor) -> dict:
        """{"scores", "warnings"} of one sample step; the scores are appended to ``quality/scores.jsonl``."""
        scores = self.score(latents, videos)
        warnings = drift_warnings(scores, self.teacher, self.margins) if self.teacher else []
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "scores.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")
        return {"scores": scores, "warnings": warnings, "teacher": self.teacher or {}}


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of a JSONL score file up to ``step`` (a resumed run redoes the steps after its checkpoint)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(rows):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
