"""Per-video statistics of the paper's curation filters (appendix 6), with OpenCV.

- **Hue entropy** (monochrome detection): Shannon entropy in bits of the frame's hue histogram in HSV. The paper
  does not say how grey pixels count; their hue is meaningless (OpenCV gives 0, or noise in near-black regions), so
  pixels with saturation or value under ``achromatic`` (of 255) go to one extra "achromatic" bin: an all-black,
  all-white or grey frame has entropy ~0, as does a single flat colour. Hue bins are 10 degrees wide (36 bins).
- **Laplacian variance** (blur): ``var(Laplacian(gray))`` at the source resolution.
- **Optical flow** (motion): Farneback flow between consecutive frames, mean magnitude in pixels per source frame,
  on frames downscaled (never upscaled) to ``flow_height`` (480: the training resolution) so the number does not
  grow with the source resolution.
- **Temporal consistency**: VBench's temporal-flickering score, ``1 - mean|f_t - f_{t+1}| / 255`` over consecutive
  frames (model-free; VBench's feature-based scores need networks we do not download).

These are measurements, not decisions: :func:`frame_stats` computes all of them for a video whatever the thresholds
(``engine.data.curation`` decides), so a change of threshold re-decides from the stored numbers without decoding.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import av
import cv2
import numpy as np

from engine.data.probe import probe_video
from engine.data.skips import BadSample


def hue_entropy(rgb: np.ndarray, bins: int = 36, achromatic: int = 20) -> float:
    """Entropy (bits) of the hue histogram of an (H, W, 3) uint8 RGB frame, grey pixels in their own bin."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # H in [0, 180), S and V in [0, 255]
    hue, sat, val = hsv[..., 0].ravel(), hsv[..., 1].ravel(), hsv[..., 2].ravel()
    chroma = (sat >= achromatic) & (val >= achromatic)
    hist = np.bincount((hue[chroma].astype(np.int64) * bins) // 180, minlength=bins).astype(np.float64)
    counts = np.append(hist, np.count_nonzero(~chroma))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 (one bin) into 0.0


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey frame (low = blurry)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def flow_magnitude(prev_gray: np.ndarray, next_gray: np.ndarray) -> float:
    """Mean Farneback optical-flow magnitude (pixels) between two grey frames."""
    flow = cv2.calcOpticalFlowFarneback(prev_gray, next_gray, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # (H, W, 2)
    return float(np.linalg.norm(flow, axis=-1).mean())


def flicker_consistency(a: np.ndarray, b: np.ndarray) -> float:
    """VBench temporal-flickering score of one frame pair: 1 - mean absolute difference / 255."""
    return 1.0 - float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) / 255.0


def _downscale(rgb: np.ndarray, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h <= height:
        return rgb
    return cv2.resize(rgb, (round(w * height / h), height), interpolation=cv2.INTER_AREA)


def _plan(n: int, cfg: Any) -> dict[str, list[int]]:
    """Frame indices each statistic needs, for a video of ``n`` frames."""
    quality = [i for i in cfg.frame_positions if i < n] or [0]  # positions past the end are dropped
    starts = np.unique(np.linspace(0, n - 2, min(cfg.flow_pairs, n - 1)).round().astype(int)) if n > 1 else []
    aesthetic = np.unique(np.linspace(0, n - 1, min(cfg.aesthetic_frames, n)).round().astype(int)).tolist()
    return {"quality": quality, "pairs": [int(s) for s in starts], "aesthetic": aesthetic}


def _decode(path: str, wanted: set[int]) -> dict[int, np.ndarray]:
    frames: dict[int, np.ndarray] = {}
    last = max(wanted)
    with av.open(path) as container:
        stream = container.streams.video[0]
        for n, frame in enumerate(container.decode(stream)):
            if n in wanted:
                frames[n] = frame.to_ndarray(format="rgb24")
            if n >= last:
                break
    return frames


def file_key(path: str) -> dict[str, int]:
    """What identifies the measured file: its size and modification time (empty when it does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def probe_stats(path: str) -> dict[str, Any]:
    """Resolution, fps, frame count and duration from the container (no decoding), or ``error`` and ``detail``."""
    try:
        info = probe_video(path, min_side=1, max_side=1 << 16)
    except BadSample as err:
        return {"error": err.reason, "detail": err.detail}
    return {
        "width": info.width,
        "height": info.height,
        "fps": info.fps,
        "num_frames": info.num_frames,
        "duration": info.num_frames / info.fps,
        "codec": info.codec,
    }


def frame_stats(path: str, num_frames: int, cfg: Any, scorer: Optional[Any] = None) -> dict[str, Any]:
    """Every decoded statistic of one video (whatever the thresholds), with the settings they were measured with."""
    plan = _plan(num_frames, cfg)
    wanted = set(plan["quality"]) | set(plan["aesthetic"]) | {i + d for i in plan["pairs"] for d in (0, 1)}
    try:
        frames = _decode(path, wanted)
    except av.FFmpegError as exc:
        return {"error": "decode_error", "detail": str(exc)}
    quality = [frames[i] for i in plan["quality"] if i in frames]
    if not quality:
        return {"error": "decode_error", "detail": f"{path}: no frame decoded"}
    pairs = [(frames[i], frames[i + 1]) for i in plan["pairs"] if i in frames and i + 1 in frames]
    small = [(_downscale(a, cfg.flow_height), _downscale(b, cfg.flow_height)) for a, b in pairs]
    grays = [(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)) for a, b in small]
    out: dict[str, Any] = {
        "measured_with": measure_settings(cfg),
        "hue_entropy": [hue_entropy(f, cfg.hue_bins, cfg.achromatic) for f in quality],
        "laplacian_var": [laplacian_variance(f) for f in quality],
        "flow_mean": float(np.mean([flow_magnitude(a, b) for a, b in grays])) if grays else 0.0,
        "consistency": float(np.mean([flicker_consistency(a, b) for a, b in small])) if small else 0.0,
    }
    if scorer is not None:
        out["aesthetic"] = float(np.mean([scorer(frames[i]) for i in plan["aesthetic"] if i in frames]))
    return out


# The settings that change what frame_stats measures (the thresholds only change the decisions).
MEASURE_SETTINGS = ("frame_positions", "hue_bins", "achromatic", "flow_pairs", "flow_height")
AESTHETIC_SETTINGS = ("aesthetic_scorer", "aesthetic_frames")


def measure_settings(cfg: Any) -> dict[str, Any]:
    keys = MEASURE_SETTINGS + (AESTHETIC_SETTINGS if cfg.aesthetic_scorer else ())
    return {k: list(v) if isinstance(v := getattr(cfg, k), tuple) else v for k in keys}


def measured_alike(stored: dict[str, Any], cfg: Any) -> bool:
    """Whether statistics measured with ``stored`` settings serve ``cfg`` (a scorer's score only if it is this one)."""
    now = measure_settings(cfg)
    return all(stored.get(k) == v for k, v in now.items())
