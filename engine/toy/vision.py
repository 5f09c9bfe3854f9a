"""What a toy clip shows, measured from its pixels alone (OpenCV): objects, their colour and shape, motion.

Input: one clip, uint8 RGB ``(T, H, W, 3)``. The toy palette makes segmentation a threshold: object colours have HSV
saturation 0.6, backgrounds at most 0.2 (engine/toy/captions.py), so a pixel belongs to an object when its saturation
exceeds ``OBJECT_SATURATION_THRESHOLD``. No morphology is applied: a cracked or fragmented object must show up as
several components. :func:`analyze_clip` measures everything once; engine/toy/metrics.py aggregates over clips.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import cv2
import numpy as np

from engine.toy.captions import OBJECT_COLOURS, OBJECT_SATURATION_THRESHOLD, SHAPES
from engine.toy.render import SUPERSAMPLE, shape_mask

MIN_AREA_FRACTION = 4 / 1024  # components under 4 px at 32x32 are specks of noise, not objects
SHAPE_AREA = {"circle": np.pi / 4, "square": 0.81, "triangle": 0.5}  # area / size^2 as drawn by render.shape_mask
FLOW_TOP_FRACTION = 0.05  # motion of a frame pair = mean flow magnitude of its fastest 5% pixels (objects are ~5%)


@dataclass
class Component:
    """One connected object region in one frame: area (px), centroid, best-fitting shape template, nearest palette
    colour and mean RGB (0-255)."""

    area: int
    cx: float
    cy: float
    shape: str
    colour: str
    rgb: np.ndarray


@dataclass
class ClipAnalysis:
    """Per-frame components (largest first) and clip-level measurements."""

    components: list[list[Component]]
    saturation: float  # mean HSV saturation in [0, 1]
    motion: float  # optical-flow motion score, pixels per frame
    travel: tuple[float, float]  # fitted displacement of the objects' centroid over the clip, pixels (x right, y down)
    features: np.ndarray  # (NUM_FEATURES,) per-clip features for the Frechet distance
    flicker: float = 0.0  # flow-compensated change of brightness between frames, in value units (0-1)
    jitter: float = 0.0  # RMS distance (px) of the per-frame centroids from their fitted straight path


FEATURE_NAMES = (
    "mean_r", "mean_g", "mean_b", "saturation", "value", "value_spatial_std", "frame_diff", "motion",
    "object_area", "num_components", "travel_x", "travel_y",
)  # fmt: skip
# Left out on purpose: features almost constant on real clips (object saturation, object-area variation: std < 0.01)
# dominate a standardized distance, so the codec's 0.01 shift of object saturation moved the FD by more than freezing
# every frame did (measured). Saturation and instance stability have their own metrics.
NUM_FEATURES = len(FEATURE_NAMES)


def hsv_frames(clip: np.ndarray) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) -> OpenCV HSV (T, H, W, 3): hue 0-179, saturation and value 0-255."""
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2HSV) for f in clip])


def object_mask(hsv: np.ndarray) -> np.ndarray:
    """Boolean (T, H, W): pixels saturated enough to belong to an object."""
    return hsv[..., 1] > OBJECT_SATURATION_THRESHOLD * 255.0


def frame_components(mask: np.ndarray, rgb: np.ndarray) -> tuple[list[Component], np.ndarray]:
    """Connected components (8-connectivity) of one frame's mask (H, W), specks dropped, largest first; and the mask
    with the specks removed (H, W)."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    min_area = MIN_AREA_FRACTION * mask.size
    out, kept = [], []
    for i in range(1, n):  # label 0 is the background
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        region = labels == i
        shape = shape_name(*coverage(rgb, region, mask))
        mean_rgb = rgb[region].mean(axis=0)
        out.append(Component(area, *map(float, centroids[i]), shape, colour_name(mean_rgb), mean_rgb))
        kept.append(i)
    return sorted(out, key=lambda c: -c.area), np.isin(labels, kept)


def colour_name(rgb: np.ndarray) -> str:
    """Nearest object colour by hue (circular distance)."""
    hue = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))[0] * 360.0
    return min(OBJECT_COLOURS, key=lambda name: abs((OBJECT_COLOURS[name][0] - hue + 180.0) % 360.0 - 180.0))


def coverage(frame: np.ndarray, region: np.ndarray, objects: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Soft coverage in [0, 1] of one object over a patch around it: each pixel's RGB is written as a linear mix of
    the object's colour and the local background's (area-averaged anti-aliasing and blur are such mixes).

    frame (H, W, 3) uint8; region (H, W) bool, this component; objects (H, W) bool, every object pixel of the frame.
    Returns (alpha (h, w), top, left) of the patch: the region's box grown by 2 px.
    """
    ys, xs = np.nonzero(region)
    top, left = max(0, ys.min() - 2), max(0, xs.min() - 2)
    bottom, right = min(region.shape[0], ys.max() + 3), min(region.shape[1], xs.max() + 3)
    patch = frame[top:bottom, left:right].astype(np.float64)  # (h, w, 3)
    own, every = region[top:bottom, left:right], objects[top:bottom, left:right]
    near = _dilate(own)  # the anti-aliased edge lies within a pixel of the thresholded mask
    ring = ~_dilate(every)
    obj, bg = np.median(patch[own], axis=0), (np.median(patch[ring], axis=0) if ring.any() else None)
    if bg is None or np.sum((obj - bg) ** 2) < 1.0:
        return own.astype(np.float64), top, left
    d = obj - bg
    alpha = np.clip((patch - bg) @ d / (d @ d), 0.0, 1.0)  # (h, w)
    alpha[~near | _dilate(every & ~own)] = 0.0  # not this object: far pixels and other objects' halos
    return alpha, top, left


def _dilate(mask: np.ndarray) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def shape_name(alpha: np.ndarray, top: int = 0, left: int = 0) -> str:
    """The shape that best explains a coverage patch: each shape is drawn as in the world (render.shape_mask) with the
    patch's area and centroid, and the soft IoU sum(min) / sum(max) picks the best. Thresholded masks were not
    enough: a circle's mask fattens by ~0.5 px on a background of similar hue and then fits the square (measured)."""
    area = alpha.sum()
    if area <= 0:
        return "none"
    rows, cols = np.indices(alpha.shape)
    cx, cy = (alpha * (cols + 0.5)).sum() / area + left, (alpha * (rows + 0.5)).sum() / area + top
    h, w = alpha.shape
    xs = left + (np.arange(w * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = top + (np.arange(h * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    X, Y = np.meshgrid(xs, ys)  # (h*S, w*S) sub-pixel centres in frame coordinates
    scores = {}
    for shape in SHAPES:
        size = np.sqrt(area / SHAPE_AREA[shape])
        centre_y = cy - size / 6 if shape == "triangle" else cy  # a triangle's centroid: size/6 below its box centre
        cov = shape_mask(shape, cx, centre_y, size, X, Y).reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
        scores[shape] = np.minimum(alpha, cov).sum() / np.maximum(alpha, cov).sum()
    return max(scores, key=scores.get)


def frame_flows(value: np.ndarray) -> list[np.ndarray]:
    """Farneback flow (H, W, 2) from each frame to the next of a uint8 (T, H, W) channel."""
    return [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 2, 9, 3, 5, 1.1, 0) for a, b in zip(value[:-1], value[1:])]


def motion_score(flows: list[np.ndarray]) -> float:
    """Mean over frame pairs of the mean flow magnitude of the fastest 5% pixels, in pixels per frame.

    Flow runs on the HSV value channel (:func:`frame_flows` of ``hsv[..., 2]``): every object colour is brighter (value
    0.85) than every background (<= 0.55), while grey levels of, e.g., blue on slate are nearly equal (measured: on
    grey, 1 px/frame clips scored as low as 0.09; on value, >= 0.9). Identical frames score ~0.1 (Farneback noise in
    flat regions). Flicker scores as motion too: the flow field follows any change of brightness.
    """
    scores = []
    for flow in flows:
        mag = np.sort(np.linalg.norm(flow, axis=-1).ravel())
        scores.append(mag[-max(1, int(FLOW_TOP_FRACTION * mag.size)) :].mean())
    return float(np.mean(scores)) if scores else 0.0


def flicker_score(value: np.ndarray, flows: list[np.ndarray]) -> float:
    """Mean absolute difference (value units, 0-1) between each frame and the next one warped back along the flow,
    over the pixels and frame pairs: what motion does not explain. Smooth motion is explained by the flow and
    scores near zero; brightness flicker, objects popping in and out and texture boiling do not warp away."""
    if len(value) < 2:
        return 0.0
    h, w = value.shape[1:]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    errors = []
    for a, b, flow in zip(value[:-1], value[1:], flows):
        back = cv2.remap(b, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        errors.append(np.abs(back.astype(np.float32) - a.astype(np.float32)).mean() / 255.0)
    return float(np.mean(errors))


def _centroids(mask: np.ndarray) -> tuple[list[int], list[float], list[float]]:
    """Frame indices with object pixels and the centroid (x, y) of those pixels in each."""
    t_axis, xs, ys = [], [], []
    for t, m in enumerate(mask):
        yy, xx = np.nonzero(m)
        if len(xx):
            t_axis.append(t)
            xs.append(xx.mean())
            ys.append(yy.mean())
    return t_axis, xs, ys


def centroid_travel(mask: np.ndarray) -> tuple[float, float]:
    """Displacement (dx, dy) of the object pixels' centroid from first to last frame, from a least-squares line through
    the per-frame centroids (frames without object pixels are skipped; NaN when fewer than two have some)."""
    t_axis, xs, ys = _centroids(mask)
    if len(t_axis) < 2:
        return float("nan"), float("nan")
    span = len(mask) - 1
    return float(np.polyfit(t_axis, xs, 1)[0] * span), float(np.polyfit(t_axis, ys, 1)[0] * span)


def centroid_jitter(mask: np.ndarray) -> float:
    """RMS distance (px) of the per-frame centroids from the least-squares straight path through them: 0 for objects
    that stay put or move at constant velocity, large for objects that shake back and forth; NaN when fewer than
    three frames have object pixels."""
    t_axis, xs, ys = _centroids(mask)
    if len(t_axis) < 3:
        return float("nan")
    t = np.asarray(t_axis, dtype=np.float64)
    residuals = [np.asarray(v) - np.polyval(np.polyfit(t, v, 1), t) for v in (xs, ys)]
    return float(np.sqrt(np.mean(residuals[0] ** 2 + residuals[1] ** 2)))


def analyze_clip(clip: np.ndarray) -> ClipAnalysis:
    """All per-clip measurements of a uint8 RGB clip (T, H, W, 3)."""
    hsv = hsv_frames(clip)  # (T, H, W, 3)
    per_frame = [frame_components(m, f) for m, f in zip(object_mask(hsv), clip)]
    comps = [c for c, _ in per_frame]
    mask = np.stack([k for _, k in per_frame])  # (T, H, W), specks removed: they would bias the centroid
    travel = centroid_travel(mask)
    flows = frame_flows(hsv[..., 2])
    motion = motion_score(flows)
    saturation = float(hsv[..., 1].mean() / 255.0)
    features = _features(clip, hsv, mask, comps, motion, travel)
    flicker = flicker_score(hsv[..., 2], flows)
    return ClipAnalysis(comps, saturation, motion, travel, features, flicker, centroid_jitter(mask))


def _features(clip, hsv, mask, comps, motion: float, travel: tuple[float, float]) -> np.ndarray:
    """(NUM_FEATURES,) float64, in the order of FEATURE_NAMES."""
    rgb = clip.reshape(-1, 3).mean(axis=0) / 255.0
    sat, val = hsv[..., 1] / 255.0, hsv[..., 2] / 255.0
    areas = mask.reshape(len(mask), -1).mean(axis=1)  # (T,) object share of each frame
    tx, ty = (0.0, 0.0) if np.isnan(travel[0]) else travel
    diff = float(np.abs(np.diff(clip.astype(np.float32), axis=0)).mean() / 255.0) if len(clip) > 1 else 0.0
    return np.array(
        [*rgb, sat.mean(), val.mean(), val.std(axis=(1, 2)).mean(), diff, motion,
         areas.mean(), np.mean([len(c) for c in comps]), tx, ty],
        dtype=np.float64,
    )  # fmt: skip
