"""Procedural clips: draw a seeded random :class:`ClipParams` as RGB frames.

Frames are drawn at ``SUPERSAMPLE`` times the target resolution and area-averaged down, so edges are anti-aliased and
sub-pixel positions are real. Every random draw of clip ``i`` comes from ``numpy.random.default_rng([seed, i])``: a clip
can be regenerated alone (a corrupted cache file) and comes out identical.
"""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import cv2
import numpy as np

from engine.toy.captions import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    OBJECT_COLOURS,
    SHAPES,
    ClipParams,
    ObjectParams,
    velocity_of,
)

if TYPE_CHECKING:  # world.py imports this module
    from engine.config import ToyWorldConfig

SUPERSAMPLE = 4
MARGIN = 1.0  # pixels kept between an object's box and the frame edge, in every frame
GAP = 3.0  # pixels between the boxes of two objects: keeps them separate connected components after blur
TEXTURE_CELL = 4  # pixels per random value of the texture noise (low frequency: the DiT can learn it)
GRADIENT_SPAN = 0.12  # value difference across a gradient background
TEXTURE_AMPLITUDE = 0.07  # value standard deviation of a texture background


def rgb_of(hsv: tuple[float, float, float]) -> np.ndarray:
    """(hue degrees, saturation, value) -> RGB floats in [0, 1], shape (3,)."""
    h, s, v = hsv
    return np.array(colorsys.hsv_to_rgb(h / 360.0, s, v), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def _centre_range(length: float, size: float, travel: float) -> tuple[float, float]:
    """Frame-0 centres along one axis that keep the box inside the frame for a signed travel over the clip."""
    lo = size / 2 + MARGIN - min(0.0, travel)
    hi = length - size / 2 - MARGIN - max(0.0, travel)
    if hi < lo:
        raise ValueError(f"an object of {size:.1f} px travelling {travel:.1f} px does not fit in {length} px")
    return lo, hi


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two (x, y, size) boxes are at least GAP pixels apart along x or y."""
    reach = (a[2] + b[2]) / 2 + GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _place(rng, cfg: ToyWorldConfig, n: int, velocity: tuple[float, float]) -> list[tuple[float, float, float]]:
    """(x, y, size) of n objects; both move with the same velocity, so apart at frame 0 means apart always."""
    lo, hi = (s * min(cfg.height, cfg.width) for s in cfg.object_size)
    if n == 2:
        hi = (lo + hi) / 2  # two objects share the frame: keep them at the small end
    steps = cfg.num_frames - 1
    for _ in range(1000):
        boxes = []
        for _ in range(n):
            size = float(rng.uniform(lo, hi))
            x = float(rng.uniform(*_centre_range(cfg.width, size, velocity[0] * steps)))
            y = float(rng.uniform(*_centre_range(cfg.height, size, velocity[1] * steps)))
            boxes.append((x, y, size))
        if n == 1 or _apart(boxes[0], boxes[1]):
            return boxes
    raise ValueError(f"could not place {n} objects apart in {cfg.width}x{cfg.height} px: lower object_size")


def sample_params(cfg: ToyWorldConfig, index: int) -> ClipParams:
    """The parameters of clip ``index`` of the world (a pure function of ``cfg.seed`` and ``index``)."""
    rng = np.random.default_rng([cfg.seed, index])
    n = 2 if rng.random() < cfg.two_object_fraction else 1
    still = rng.random() < cfg.static_fraction
    direction = "still" if still else _pick(rng, ("left", "right", "up", "down"))
    speed = 0.0 if still else float(cfg.speeds[int(rng.integers(len(cfg.speeds)))])
    kind = _pick(rng, BACKGROUND_KINDS)
    background = _pick(rng, list(BACKGROUND_COLOURS))
    pan = _pick(rng, ("left", "right")) if kind == "texture" and rng.random() < cfg.pan_fraction else "none"
    colours = [str(c) for c in rng.permutation(list(OBJECT_COLOURS))[:n]]  # distinct colours within a clip
    shapes = [_pick(rng, SHAPES) for _ in range(n)]
    boxes = _place(rng, cfg, n, velocity_of(direction, speed))
    objects = tuple(ObjectParams(c, s, x, y, size) for c, s, (x, y, size) in zip(colours, shapes, boxes))
    pan_speed = cfg.pan_speed if pan != "none" else 0.0
    return ClipParams(objects, direction, speed, background, kind, pan, pan_speed, seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------------------------------
# Drawing (all coordinates in output pixels; the grids sample pixel centres of the supersampled canvas)
# ---------------------------------------------------------------------------------------------------------------------


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a supersampled (height, width) frame, each (height * S, width * S)."""
    ys = (np.arange(height * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs = (np.arange(width * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    return np.meshgrid(xs, ys)


def shape_mask(shape: str, cx: float, cy: float, size: float, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) inside a size x size box (circle: diameter = size; square: side =
    0.9 size, about the circle's area; triangle: base = height = size, apex up)."""
    dx, dy = X - cx, Y - cy
    half = size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= 0.45 * size) & (np.abs(dy) <= 0.45 * size)
    if shape == "triangle":
        # Inside when below the two slanted edges and above the base; |dx| <= (dy + half) / 2 spans base = size.
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _value_field(p: ClipParams, height: int, canvas_width: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value of the background over a supersampled canvas, shape (height * S, canvas_width * S)."""
    v0 = BACKGROUND_COLOURS[p.background][2]
    hs, ws = height * SUPERSAMPLE, canvas_width * SUPERSAMPLE
    if p.kind == "background":
        return np.full((hs, ws), v0, np.float32)
    if p.kind == "gradient":
        angle = np.deg2rad(45.0 * int(rng.integers(8)))
        X, Y = _grid(height, canvas_width)
        proj = (X / canvas_width - 0.5) * np.cos(angle) + (Y / height - 0.5) * np.sin(angle)
        return (v0 + GRADIENT_SPAN * proj).astype(np.float32)
    coarse = rng.standard_normal((height // TEXTURE_CELL + 2, canvas_width // TEXTURE_CELL + 2)).astype(np.float32)
    smooth = cv2.resize(coarse, (ws, hs), interpolation=cv2.INTER_CUBIC)
    smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-6)
    return np.clip(v0 + TEXTURE_AMPLITUDE * smooth, v0 - 0.15, v0 + 0.15).astype(np.float32)


def _pan_offsets(p: ClipParams, num_frames: int) -> tuple[int, list[int]]:
    """Extra canvas width and each frame's crop offset, in supersampled pixels. Panning right moves the view right
    over the canvas, so the background drifts left on screen."""
    step = int(round(p.pan_speed * SUPERSAMPLE))
    extra = step * (num_frames - 1)
    if p.pan == "right":
        return extra, [step * t for t in range(num_frames)]
    if p.pan == "left":
        return extra, [extra - step * t for t in range(num_frames)]
    return 0, [0] * num_frames


def render_clip(p: ClipParams, height: int, width: int, num_frames: int) -> np.ndarray:
    """The clip's frames, uint8 (T, H, W, 3) RGB."""
    rng = np.random.default_rng(p.seed)
    extra, offsets = _pan_offsets(p, num_frames)
    canvas_width = width + -(-extra // SUPERSAMPLE)  # ceil: the canvas covers every crop
    value = _value_field(p, height, canvas_width, rng)  # (H*S, Wc*S)
    unit = rgb_of((*BACKGROUND_COLOURS[p.background][:2], 1.0))  # fixed hue and saturation: RGB is linear in value
    X, Y = _grid(height, width)
    vx, vy = p.velocity
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        crop = value[:, offsets[t] : offsets[t] + width * SUPERSAMPLE]  # (H*S, W*S)
        img = crop[..., None] * unit  # (H*S, W*S, 3)
        for o in p.objects:
            img[shape_mask(o.shape, o.x + vx * t, o.y + vy * t, o.size, X, Y)] = rgb_of(OBJECT_COLOURS[o.colour])
        small = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)  # (H, W, 3)
        frames[t] = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
    return frames
