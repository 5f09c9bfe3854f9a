"""Toy-world metrics on decoded pixel videos: the failure modes of few-step distillation, measured.

Every metric takes clips as uint8 RGB ``(N, T, H, W, 3)`` (torch ``(N, 3, T, H, W)`` in [-1, 1] is converted at the
boundary) plus each clip's :class:`ClipParams` (the caption's content), and a :class:`Reference` calibrated on real
clips of the dataset (:func:`calibrate`). ``compute_metrics`` returns, each a mean over clips:

- ``saturation``: mean HSV saturation of all pixels; ``saturation_ratio``: that over the real clips' (> 1:
  oversaturation, the DMD "blow-out").
- ``dynamic_degree``: share of clips whose optical-flow motion score exceeds the real-calibrated threshold (midway
  between real static clips' 99th percentile and real moving clips' 1st); ``motion``: mean score (px/frame);
  ``travel``: mean centroid travel (px) of clips whose caption says the objects move (static-motion collapse).
  The flow score counts flicker as motion; two measures tell them apart: ``flicker``, the mean flow-compensated
  brightness change between frames (value units 0-1; what the motion does not explain), and ``jitter``, the mean RMS
  distance (px) of the objects' per-frame centroid from its fitted straight path (shaking, not travelling).
- ``instance_preservation``: share of clips where every frame has exactly as many connected object components as the
  caption has objects, each within ``AREA_TOLERANCE`` of its clip-median area (no splitting, merging, vanishing).
- ``colour_accuracy``, ``shape_accuracy``, ``direction_accuracy``: share of clips whose colours, shapes (of the
  largest components, majority over frames) and motion direction (fitted centroid travel, "still" under the
  real-calibrated travel) match the caption; ``prompt_alignment``: all three right.
- ``frechet_distance``: Frechet distance between Gaussians fitted to per-clip features (engine/toy/vision.py
  FEATURE_NAMES), standardized by the real clips' mean and std so every feature weighs alike.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.toy.captions import ClipParams
from engine.toy.videos import to_uint8
from engine.toy.vision import ClipAnalysis, analyze_clip

AREA_TOLERANCE = 0.35  # real clips: <= 0.22 (1024 default clips, 99th pct 0.08); a split object keeps ~half its area
METRICS = (
    "saturation", "saturation_ratio", "dynamic_degree", "motion", "travel", "flicker", "jitter",
    "instance_preservation", "colour_accuracy", "shape_accuracy", "direction_accuracy", "prompt_alignment",
    "frechet_distance",
)  # fmt: skip


@dataclass
class Reference:
    """Statistics of real clips that other clips are measured against (JSON-serializable via ``to_dict``)."""

    saturation: float
    dynamic_threshold: float  # motion score (px/frame) above which a clip counts as dynamic
    still_travel: float  # centroid travel (px) under which objects count as still
    feature_mean: list[float]  # (D,) per-clip feature means
    feature_std: list[float]  # (D,) and standard deviations
    feature_cov: list[list[float]]  # (D, D) covariance of the standardized features
    num_clips: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Reference:
        return Reference(**d)


def analyze(videos: np.ndarray | torch.Tensor) -> list[ClipAnalysis]:
    """Per-clip measurements of uint8 ``(N, T, H, W, 3)`` or float ``(N, 3, T, H, W)`` videos."""
    return [analyze_clip(clip) for clip in to_uint8(videos)]


def _moving(p: ClipParams) -> bool:
    return p.direction != "still" or p.pan != "none"


def calibrate(videos: np.ndarray | torch.Tensor, params: Sequence[ClipParams]) -> Reference:
    """Reference statistics from real clips; needs both static and moving ones. Calibrate on one split (train) and
    report real metrics on another (val), so the real row is not scored on its own calibration."""
    clips = analyze(videos)
    _check_lengths(clips, params)
    motion = np.array([c.motion for c in clips])
    moving = np.array([_moving(p) for p in params])
    if moving.all() or not moving.any():
        raise ValueError("calibration needs both static and moving real clips")
    threshold = 0.5 * (np.percentile(motion[~moving], 99) + np.percentile(motion[moving], 1))
    object_moves = np.array([p.direction != "still" for p in params])
    travel = np.array([np.hypot(*c.travel) for c in clips])[object_moves]
    feats = np.stack([c.features for c in clips])  # (N, NUM_FEATURES)
    std = feats.std(axis=0) + 1e-6  # a constant feature must not divide by zero
    z = (feats - feats.mean(axis=0)) / std
    return Reference(
        saturation=float(np.mean([c.saturation for c in clips])),
        dynamic_threshold=float(threshold),
        still_travel=float(0.5 * np.nanpercentile(travel, 5)),
        feature_mean=feats.mean(axis=0).tolist(),
        feature_std=std.tolist(),
        feature_cov=np.cov(z, rowvar=False).tolist(),
        num_clips=len(clips),
    )


def _check_lengths(clips: Sequence, params: Sequence) -> None:
    if len(clips) != len(params):
        raise ValueError(f"{len(clips)} videos but {len(params)} parameter sets")


# ---------------------------------------------------------------------------------------------------------------------
# Per-clip judgements
# ---------------------------------------------------------------------------------------------------------------------


def instance_preserved(clip: ClipAnalysis, num_objects: int, tolerance: float = AREA_TOLERANCE) -> bool:
    """Every frame shows ``num_objects`` components, each (by size rank) within ``tolerance`` of its median area."""
    if any(len(frame) != num_objects for frame in clip.components):
        return False
    areas = np.array([[c.area for c in frame] for frame in clip.components], dtype=float)  # (T, n), largest first
    median = np.median(areas, axis=0)
    return bool(np.all(np.abs(areas / median - 1.0) <= tolerance))


def direction_of(travel: tuple[float, float], still_travel: float) -> str:
    """Screen direction of a centroid travel (x right, y down); "still" under ``still_travel``; "none" if unknown."""
    dx, dy = travel
    if np.isnan(dx) or np.isnan(dy):
        return "none"
    if max(abs(dx), abs(dy)) < still_travel:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _majority(values: list[tuple]) -> tuple:
    return Counter(values).most_common(1)[0][0] if values else ()


def recovered(clip: ClipAnalysis, num_objects: int, still_travel: float) -> dict:
    """Colours and shapes (sorted tuples) of the ``num_objects`` largest components, majority over frames, and the
    motion direction."""
    frames = [f[:num_objects] for f in clip.components if f]
    colours = _majority([tuple(sorted(c.colour for c in f)) for f in frames])
    shapes = _majority([tuple(sorted(c.shape for c in f)) for f in frames])
    return {"colours": colours, "shapes": shapes, "direction": direction_of(clip.travel, still_travel)}


# ---------------------------------------------------------------------------------------------------------------------
# Aggregates
# ---------------------------------------------------------------------------------------------------------------------


def gaussian_frechet(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_b^1/2 S_a S_b^1/2)^1/2)`` (symmetric square roots by eigh, float64)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    root_b = _sqrtm_psd(cov_b)
    cross = _sqrtm_psd(root_b @ cov_a @ root_b)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of rows (N, D); zero covariance for a single row."""
    cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    return x.mean(axis=0), np.atleast_2d(cov)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    evals, evecs = np.linalg.eigh((m + m.T) / 2)
    return (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T


def compute_metrics(
    videos: np.ndarray | torch.Tensor,
    params: Sequence[ClipParams],
    reference: Reference,
) -> dict[str, float]:
    """Every metric of the module docstring over a batch of clips (videos uint8 ``(N, T, H, W, 3)`` or float
    ``(N, 3, T, H, W)`` in [-1, 1]; ``params[i]`` is clip i's ClipParams)."""
    clips = analyze(videos)
    _check_lengths(clips, params)
    got = [recovered(c, len(p.objects), reference.still_travel) for c, p in zip(clips, params)]
    colour_ok = [g["colours"] == tuple(sorted(o.colour for o in p.objects)) for g, p in zip(got, params)]
    shape_ok = [g["shapes"] == tuple(sorted(o.shape for o in p.objects)) for g, p in zip(got, params)]
    direction_ok = [g["direction"] == p.direction for g, p in zip(got, params)]
    saturation = float(np.mean([c.saturation for c in clips]))
    travels = [np.nan_to_num(np.hypot(*c.travel)) for c, p in zip(clips, params) if p.direction != "still"]
    return {
        "saturation": saturation,
        "saturation_ratio": saturation / reference.saturation,
        "dynamic_degree": float(np.mean([c.motion > reference.dynamic_threshold for c in clips])),
        "motion": float(np.mean([c.motion for c in clips])),
        "travel": float(np.mean(travels)) if travels else float("nan"),
        "flicker": float(np.mean([c.flicker for c in clips])),
        "jitter": _nanmean([c.jitter for c in clips]),
        "instance_preservation": float(np.mean([instance_preserved(c, len(p.objects)) for c, p in zip(clips, params)])),
        "colour_accuracy": float(np.mean(colour_ok)),
        "shape_accuracy": float(np.mean(shape_ok)),
        "direction_accuracy": float(np.mean(direction_ok)),
        "prompt_alignment": float(np.mean([all(x) for x in zip(colour_ok, shape_ok, direction_ok)])),
        "frechet_distance": _fd_to_reference(np.stack([c.features for c in clips]), reference),
    }


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _fd_to_reference(features: np.ndarray, reference: Reference) -> float:
    """FD between the clips' standardized features and the real ones (mean 0, the reference's covariance)."""
    z = (features - np.asarray(reference.feature_mean)) / np.asarray(reference.feature_std)  # (N, D)
    mu, cov = _moments(z)
    return gaussian_frechet(mu, cov, np.zeros_like(mu), np.asarray(reference.feature_cov))


def format_table(columns: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = METRICS) -> str:
    """A Markdown table: one row per metric, one column per named result (e.g. real, teacher, student)."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in metrics:
        cells = [f"{columns[n][m]:.3f}" if m in columns[n] else "-" for n in names]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
