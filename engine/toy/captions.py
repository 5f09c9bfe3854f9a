"""The toy world's vocabulary, per-clip parameters and caption grammar.

A caption is a pure function of a clip's parameters and parses back into the captioned fields::

    a red circle moves left over a gray gradient
    a blue square and a green triangle stay still over a sand texture, camera pans right

Grammar (one template, fixed word positions for one object, so a tiny text encoder plus a tiny DiT can learn it)::

    caption  := objects verb " over a " BG_COLOUR " " BG_KIND [", camera pans " PAN]
    objects  := "a " COLOUR " " SHAPE [" and a " COLOUR " " SHAPE]
    verb     := " moves " DIRECTION | " stays still"      (one object)
              | " move " DIRECTION  | " stay still"       (two objects)

Directions are screen directions of the objects. ``camera pans left`` means the camera turns left, so the background
texture drifts right on screen; objects keep their captioned screen motion. Position, size, speed and the gradient
orientation or texture pattern are not captioned: they are the world's nuisance variables, stored in the manifest.

Object colours share one saturation (0.6) and value (0.85) and differ only in hue; backgrounds are darker (value
<= 0.55) and weakly saturated (<= 0.2), never white. Metrics rely on this split: a pixel whose HSV saturation exceeds
``OBJECT_SATURATION_THRESHOLD`` belongs to an object (engine/toy/vision.py).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from engine.toy_words import (  # the words, shared with the config schema's filter check
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    DIRECTIONS,
    OBJECT_COLOURS,
    SHAPES,
)

# Midway between the objects' saturation (0.6) and the most saturated background (0.2).
OBJECT_SATURATION_THRESHOLD = 0.4


@dataclass(frozen=True)
class ObjectParams:
    """One shape. ``x``, ``y``: centre in pixels at frame 0 (x right, y down); ``size``: bounding-box side in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class ClipParams:
    """Everything that determines a clip. ``speed`` is in pixels per frame (objects), ``pan_speed`` likewise
    (background); ``seed`` drives the gradient orientation and the texture pattern."""

    objects: tuple[ObjectParams, ...]
    direction: str
    speed: float
    background: str
    kind: str
    pan: str = "none"
    pan_speed: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ClipParams:
        objects = tuple(ObjectParams(**o) for o in d["objects"])
        return ClipParams(**{**d, "objects": objects})

    @property
    def velocity(self) -> tuple[float, float]:
        """(dx, dy) in pixels per frame."""
        return velocity_of(self.direction, self.speed)


def velocity_of(direction: str, speed: float) -> tuple[float, float]:
    """(dx, dy) in pixels per frame of a screen direction (x right, y down)."""
    ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[direction]
    return ux * speed, uy * speed


def caption_fields(p: ClipParams) -> dict[str, Any]:
    """The parameters a caption carries (what :func:`parse_caption` recovers)."""
    return {
        "objects": tuple((o.colour, o.shape) for o in p.objects),
        "direction": p.direction,
        "background": p.background,
        "kind": p.kind,
        "pan": p.pan,
    }


def caption(p: ClipParams) -> str:
    """The clip's caption (see the module docstring for the grammar)."""
    if not 1 <= len(p.objects) <= 2:
        raise ValueError(f"a clip holds one or two objects, got {len(p.objects)}")
    subject = " and ".join(f"a {o.colour} {o.shape}" for o in p.objects)
    plural = len(p.objects) == 2
    if p.direction == "still":
        verb = "stay still" if plural else "stays still"
    else:
        verb = f"{'move' if plural else 'moves'} {p.direction}"
    text = f"{subject} {verb} over a {p.background} {p.kind}"
    if p.pan != "none":
        text += f", camera pans {p.pan}"
    return text


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_OBJ = rf"a ({_alt(OBJECT_COLOURS)}) ({_alt(SHAPES)})"
_CAPTION_RE = re.compile(
    rf"^{_OBJ}(?: and {_OBJ})? (?:(?:moves?) ({_alt(DIRECTIONS[:4])})|(stays? still))"
    rf" over a ({_alt(BACKGROUND_COLOURS)}) ({_alt(BACKGROUND_KINDS)})(?:, camera pans (left|right))?$"
)


def parse_caption(text: str) -> dict[str, Any]:
    """Inverse of :func:`caption` on the captioned fields; raises ValueError on text outside the grammar."""
    m = _CAPTION_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not a toy-world caption: {text!r}")
    c1, s1, c2, s2, direction, still, background, kind, pan = m.groups()
    objects = ((c1, s1),) if c2 is None else ((c1, s1), (c2, s2))
    verb = still.split()[0] if still else text.split(" over ")[0].split()[-2]
    if verb.endswith("s") != (len(objects) == 1):  # "moves"/"stays" for one object, "move"/"stay" for two
        raise ValueError(f"verb does not agree with the number of objects: {text!r}")
    return {
        "objects": objects,
        "direction": "still" if still else direction,
        "background": background,
        "kind": kind,
        "pan": pan or "none",
    }


def matches(fields: dict[str, Any], f: Any) -> bool:
    """Whether captioned fields (:func:`caption_fields` of a clip, or :func:`parse_caption` of a caption) fall in the
    subset a ``CaptionFilter`` names: every non-empty field of ``f`` lists the clip's value (for colours and shapes:
    the value of one of its objects)."""
    colours = {c for c, _ in fields["objects"]}
    shapes = {s for _, s in fields["objects"]}
    checks = (
        (f.kinds, {fields["kind"]}),
        (f.backgrounds, {fields["background"]}),
        (f.colours, colours),
        (f.shapes, shapes),
        (f.directions, {fields["direction"]}),
        (f.pans, {fields["pan"]}),
    )
    return all(not want or bool(set(want) & have) for want, have in checks)
