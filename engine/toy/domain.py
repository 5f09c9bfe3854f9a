"""Target domains of the toy world, read back from pixels: which background a clip shows, and the share of clips in a
domain (distillation and fine-tuning in one stage, docs/toy-world.md#domains).

A domain is a :class:`~engine.config.CaptionFilter` (e.g. ``kinds: [texture]``). Training selects its clips by their
parameters (``engine.toy.captions.matches``); generated clips have no parameters, so :func:`background_of` recovers
the background from the frames. Object pixels (HSV saturation over the palette split, engine/toy/vision.py) and a
2 px ring around them are masked out; a plane ``a + b x + c y`` is fitted by least squares to the remaining HSV value
per frame, and the medians over frames of its slope ``|(b, c)|`` and of the residual's standard deviation tell the
three kinds apart (engine/toy/render.py draws them):

- ``texture``: low-frequency noise of standard deviation 0.07 that no plane explains (residual >= 0.058 on real
  clips, through the codec too);
- ``gradient``: a linear ramp of 0.12 across the frame (slope >= 0.117, residual <= 0.008 through the codec);
- ``background`` (a solid colour): neither (slope <= 0.005, residual <= 0.010 through the codec).

Measured on 300 rendered clips of the default world, raw and through the toy codec; the thresholds lie between the
classes' extremes. The background colour is the palette colour nearest the masked pixels' mean RGB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import cv2
import numpy as np
import torch

from engine.toy.captions import BACKGROUND_COLOURS
from engine.toy.render import rgb_of
from engine.toy.videos import to_uint8
from engine.toy.vision import hsv_frames, object_mask

TEXTURE_RESIDUAL = 0.025  # plane-fit residual std (value units) above which the background is a texture
GRADIENT_SLOPE = 0.06  # fitted value change across the frame above which it is a gradient
RING = np.ones((5, 5), np.uint8)  # object pixels grown by 2 px: their anti-aliased edges are not background
PIXEL_FIELDS = ("kinds", "backgrounds")  # the CaptionFilter fields :func:`domain_predicate` can read from pixels


def _palette_rgb() -> dict[str, np.ndarray]:
    """Mean RGB (0-255) of each background colour as drawn (its value v0 on the colour's hue and saturation)."""
    return {name: rgb_of(hsv) * 255.0 for name, hsv in BACKGROUND_COLOURS.items()}


def background_stats(clip: np.ndarray) -> tuple[float, float, np.ndarray] | None:
    """(residual std, slope, mean RGB) of a uint8 RGB clip's background (T, H, W, 3): medians over frames; None when
    no frame has background pixels."""
    hsv = hsv_frames(clip)
    objects = object_mask(hsv)
    height, width = clip.shape[1:3]
    rows = []
    for t in range(len(clip)):
        keep = ~cv2.dilate(objects[t].astype(np.uint8), RING).astype(bool)
        ys, xs = np.nonzero(keep)
        if len(xs) < 3:
            continue
        value = hsv[t, ys, xs, 2].astype(np.float64) / 255.0
        design = np.stack([np.ones(len(xs)), (xs + 0.5) / width - 0.5, (ys + 0.5) / height - 0.5], axis=1)
        coef, *_ = np.linalg.lstsq(design, value, rcond=None)
        rows.append((np.std(value - design @ coef), np.hypot(coef[1], coef[2]), *clip[t, ys, xs].mean(axis=0)))
    if not rows:
        return None
    med = np.median(np.array(rows), axis=0)
    return float(med[0]), float(med[1]), med[2:]


def background_of(clip: np.ndarray) -> tuple[str, str]:
    """(kind, colour) of a uint8 RGB clip's background: kind in BACKGROUND_KINDS, colour in BACKGROUND_COLOURS;
    ("none", "none") when objects cover every frame."""
    stats = background_stats(clip)
    if stats is None:
        return "none", "none"
    residual, slope, rgb = stats
    kind = "texture" if residual > TEXTURE_RESIDUAL else "gradient" if slope > GRADIENT_SLOPE else "background"
    palette = _palette_rgb()
    colour = min(palette, key=lambda name: float(np.sum((palette[name] - rgb) ** 2)))
    return kind, colour


def domain_predicate(f) -> Callable[[np.ndarray], bool]:
    """A predicate on uint8 RGB clips for a ``CaptionFilter`` over the background (``kinds``, ``backgrounds``): the
    pixel counterpart of ``engine.toy.captions.matches``. Other fields are refused (not read from pixels here)."""
    other = [name for name in ("colours", "shapes", "directions", "pans") if getattr(f, name)]
    if other:
        raise ValueError(f"domain_predicate reads {PIXEL_FIELDS} from pixels, not {other}")

    def predicate(clip: np.ndarray) -> bool:
        kind, colour = background_of(clip)
        return (not f.kinds or kind in f.kinds) and (not f.backgrounds or colour in f.backgrounds)

    return predicate


def domain_share(videos: torch.Tensor | np.ndarray | Iterable[np.ndarray], predicate: Callable[[np.ndarray], bool]):
    """The share of clips for which ``predicate`` holds. ``videos``: uint8 RGB (N, T, H, W, 3), a float torch batch
    (N, 3, T, H, W) in [-1, 1] (decoded latents), or an iterable of uint8 clips."""
    if isinstance(videos, torch.Tensor):
        videos = to_uint8(videos)
    hits = [bool(predicate(np.asarray(clip))) for clip in videos]
    if not hits:
        raise ValueError("domain_share of no clips")
    return sum(hits) / len(hits)
