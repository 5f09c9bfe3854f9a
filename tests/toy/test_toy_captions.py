"""Caption grammar (round trip, rejection of text outside it) and the sampled parameters' invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import ToyWorldConfig
from engine.toy.captions import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    DIRECTIONS,
    OBJECT_COLOURS,
    SHAPES,
    ClipParams,
    ObjectParams,
    caption,
    caption_fields,
    parse_caption,
)
from engine.toy.render import GAP, MARGIN, sample_params


@st.composite
def clip_params(draw) -> ClipParams:
    n = draw(st.integers(1, 2))
    colours = draw(st.lists(st.sampled_from(sorted(OBJECT_COLOURS)), min_size=n, max_size=n, unique=True))
    objects = tuple(ObjectParams(c, draw(st.sampled_from(SHAPES)), 10.0, 10.0, 9.0) for c in colours)
    kind = draw(st.sampled_from(BACKGROUND_KINDS))
    pan = draw(st.sampled_from(("none", "left", "right"))) if kind == "texture" else "none"
    return ClipParams(
        objects,
        draw(st.sampled_from(DIRECTIONS)),
        1.0,
        draw(st.sampled_from(sorted(BACKGROUND_COLOURS))),
        kind,
        pan,
        0.5 if pan != "none" else 0.0,
    )


@settings(max_examples=200, deadline=None)
@given(clip_params())
def test_caption_round_trip(p):
    assert parse_caption(caption(p)) == caption_fields(p)


def test_caption_examples():
    red = ObjectParams("red", "circle", 10, 10, 9)
    blue = ObjectParams("blue", "square", 20, 20, 9)
    assert (
        caption(ClipParams((red,), "left", 1.0, "gray", "gradient")) == "a red circle moves left over a gray gradient"
    )
    two = ClipParams((red, blue), "still", 0.0, "sand", "texture", "right", 0.5)
    assert caption(two) == "a red circle and a blue square stay still over a sand texture, camera pans right"


@pytest.mark.parametrize(
    "text",
    [
        "a red circle move left over a gray gradient",  # verb does not agree
        "a red circle and a blue square moves left over a gray gradient",
        "a pink circle moves left over a gray gradient",  # unknown colour
        "a red circle moves sideways over a gray gradient",
        "a red circle moves left over a gray gradient, camera pans up",
        "a red circle moves left",
        "",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_params_dict_round_trip():
    p = sample_params(ToyWorldConfig(two_object_fraction=1.0), 3)
    assert ClipParams.from_dict(p.to_dict()) == p


def test_sampled_params_respect_the_world():
    cfg = ToyWorldConfig()
    seen_two = seen_still = seen_pan = 0
    for i in range(300):
        p = sample_params(cfg, i)
        assert p == sample_params(cfg, i)  # a pure function of (seed, index)
        vx, vy = p.velocity
        for o in p.objects:
            for t in (0, cfg.num_frames - 1):  # straight paths: the end points bound the box
                x, y = o.x + vx * t, o.y + vy * t
                assert x - o.size / 2 >= MARGIN - 1e-6 and x + o.size / 2 <= cfg.width - MARGIN + 1e-6
                assert y - o.size / 2 >= MARGIN - 1e-6 and y + o.size / 2 <= cfg.height - MARGIN + 1e-6
        if len(p.objects) == 2:
            a, b = p.objects
            reach = (a.size + b.size) / 2 + GAP
            assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach
            assert a.colour != b.colour
            seen_two += 1
        assert p.pan == "none" or p.kind == "texture"
        seen_still += p.direction == "still"
        seen_pan += p.pan != "none"
    # The configured shares, loosely (300 draws): each kind of clip exists in the world.
    assert 30 <= seen_two <= 90 and 30 <= seen_still <= 90 and 20 <= seen_pan <= 80
