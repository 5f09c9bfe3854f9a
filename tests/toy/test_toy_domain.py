"""Target domains of the toy world: caption filters on parameters and captions, and the background read back from
pixels (rendered clips, their VP9 files, and the same clips through the toy codec)."""

import numpy as np
import pytest
import torch

from engine.config import CaptionFilter, ToyWorldConfig
from engine.toy.captions import BACKGROUND_COLOURS, BACKGROUND_KINDS, caption, caption_fields, matches, parse_caption
from engine.toy.codec import ASSET, ToyCodec
from engine.toy.domain import background_of, domain_predicate, domain_share
from engine.toy.render import render_clip, sample_params
from engine.toy.videos import to_tensor, to_uint8

NUM = 150


@pytest.fixture(scope="module")
def rendered():
    """150 clips of a world the codec never saw (seed 3): uint8 videos and their parameters."""
    cfg = ToyWorldConfig(seed=3)
    params = [sample_params(cfg, i) for i in range(NUM)]
    return np.stack([render_clip(p, cfg.height, cfg.width, cfg.num_frames) for p in params]), params


def test_filters_select_on_parameters_and_captions_alike(rendered):
    _, params = rendered
    filters = [
        CaptionFilter(),
        CaptionFilter(kinds=["texture"]),
        CaptionFilter(kinds=["gradient", "background"], backgrounds=["sand"]),
        CaptionFilter(colours=["red"], directions=["left", "still"]),
        CaptionFilter(shapes=["circle"], pans=["left"]),
    ]
    for f in filters:
        by_params = [matches(caption_fields(p), f) for p in params]
        assert by_params == [matches(parse_caption(caption(p)), f) for p in params]
        if f.is_empty():
            assert all(by_params)
        else:
            assert 0 < sum(by_params) < NUM  # a real subset of this world
    p = next(q for q in params if len(q.objects) == 2)
    (c1, s1), (c2, _) = caption_fields(p)["objects"]
    assert matches(caption_fields(p), CaptionFilter(colours=[c2]))  # either object's colour counts
    assert not matches(caption_fields(p), CaptionFilter(colours=[c1], kinds=[k for k in BACKGROUND_KINDS
                                                                             if k != p.kind]))  # fmt: skip
    assert matches(caption_fields(p), CaptionFilter(shapes=[s1], backgrounds=[p.background]))


@pytest.mark.parametrize("through_codec", [False, True], ids=["rendered", "codec"])
def test_background_kind_and_colour_from_pixels(rendered, through_codec):
    videos, params = rendered
    if through_codec:  # what generated clips go through: latents decoded by the toy codec
        codec = ToyCodec.load(ASSET)
        with torch.no_grad():
            videos = to_uint8(codec.decode(codec.encode(to_tensor(videos))))
    got = [background_of(v) for v in videos]
    kinds = [k for k, _ in got]
    assert {p.kind for p in params} == set(BACKGROUND_KINDS)
    assert kinds == [p.kind for p in params]  # every clip, every kind
    colours = np.mean([c == p.background for (_, c), p in zip(got, params)])
    assert colours >= 0.95 and {c for _, c in got} <= set(BACKGROUND_COLOURS)


def test_background_kind_of_decoded_files(small_clips):
    videos, params, _ = small_clips  # VP9 files of the session's small dataset
    assert [background_of(v)[0] for v in videos] == [p.kind for p in params]


def test_domain_share_counts_the_predicate(rendered):
    videos, params = rendered
    f = CaptionFilter(kinds=["texture"])
    want = np.mean([p.kind == "texture" for p in params])
    assert domain_share(videos, domain_predicate(f)) == pytest.approx(want)
    assert domain_share(to_tensor(videos[:30]), domain_predicate(f)) == pytest.approx(
        np.mean([p.kind == "texture" for p in params[:30]])
    )  # a decoded float batch (N, 3, T, H, W) in [-1, 1]
    solid = [i for i, p in enumerate(params) if p.kind == "background"]
    assert domain_share(videos[solid], domain_predicate(CaptionFilter(kinds=["background"]))) == 1.0
    both = CaptionFilter(kinds=["gradient"], backgrounds=["moss"])
    want = np.mean([p.kind == "gradient" and p.background == "moss" for p in params])
    assert domain_share(list(videos), domain_predicate(both)) == pytest.approx(want, abs=0.02)
    with pytest.raises(ValueError, match="colours"):
        domain_predicate(CaptionFilter(colours=["red"]))
    with pytest.raises(ValueError, match="no clips"):
        domain_share([], domain_predicate(f))


def test_a_clip_without_background_pixels():
    clip = np.zeros((3, 16, 16, 3), np.uint8)
    clip[..., 0] = 220  # saturated red everywhere: every pixel is an object pixel
    assert background_of(clip) == ("none", "none")
    assert domain_share([clip], domain_predicate(CaptionFilter(kinds=["texture"]))) == 0.0
