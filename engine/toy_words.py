"""The toy world's words: object colours, background colours and kinds, shapes, directions, camera pans, and the
words each field of a caption filter may list. Plain data with no imports, so that the config schema
(``engine.config``, which checks filters) and the toy world (``engine.toy.captions``) share them without depending on
each other."""

from __future__ import annotations

# name -> (hue in degrees, saturation, value). Hues ~60 degrees apart so a colour survives compression and blur.
OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.6, 0.85),
    "yellow": (55.0, 0.6, 0.85),
    "green": (125.0, 0.6, 0.85),
    "cyan": (185.0, 0.6, 0.85),
    "blue": (230.0, 0.6, 0.85),
    "purple": (285.0, 0.6, 0.85),
}
# Weakly saturated, mid-dark: objects stand out in both saturation and value, and saturation has room to blow out.
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "gray": (0.0, 0.0, 0.50),
    "sand": (40.0, 0.2, 0.55),
    "slate": (215.0, 0.2, 0.45),
    "moss": (90.0, 0.2, 0.42),
    "plum": (320.0, 0.18, 0.42),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down", "still")
BACKGROUND_KINDS = ("background", "gradient", "texture")  # "background" = a solid colour
PANS = ("none", "left", "right")

FILTER_VOCABULARY: dict[str, tuple[str, ...]] = {
    "kinds": BACKGROUND_KINDS,
    "backgrounds": tuple(BACKGROUND_COLOURS),
    "colours": tuple(OBJECT_COLOURS),
    "shapes": SHAPES,
    "directions": DIRECTIONS,
    "pans": PANS,
}
"""The words each field of a caption filter (``engine.config.CaptionFilter``) may list."""
