"""The procedural teacher data source: deterministic in (seed, position), no repeats, held-out prompts excluded,
and a resumed teacher run continues the stream exactly."""

import numpy as np
import pytest
import torch

from engine.config import ToyTeacherConfig, model_preset
from engine.diffusion.flow import FlowSchedule
from engine.toy.captions import caption
from engine.toy.codec import ToyCodec
from engine.toy.procedural import ProceduralSource, held_out_captions, held_out_params
from engine.toy.render import sample_params
from engine.toy.teacher import TeacherTrainer
from engine.toy.text import ToyTextEncoder
from engine.toy.world import ToyWorldConfig

WORLD = ToyWorldConfig(num_clips=64, val_fraction=0.25, seed=3)  # 16 held-out prompts


@pytest.fixture(scope="module")
def codec():
    return ToyCodec.load()


def _source(codec, seed=0, exclude=None):
    return ProceduralSource(WORLD, codec, ToyTextEncoder(dim=16, max_length=20), seed=seed, exclude=exclude)


def test_held_out_prompts_are_the_val_split():
    params = held_out_params(WORLD)
    assert len(params) == WORLD.num_val() == 16
    assert params[0] == sample_params(WORLD, WORLD.num_clips - 16)
    assert held_out_captions(WORLD) == {caption(p) for p in params}


def test_deterministic_in_seed_and_position(codec):
    a, b = _source(codec), _source(codec)
    assert [c.params for c in a.clips(5, 4)] == [b.clip(k).params for k in range(5, 9)]
    la, ca = a.batch(3, 4)
    lb, cb = b.batch(3, 4)  # batch s is stream positions s*B .. s*B + B - 1, whatever came before
    assert torch.equal(la, lb) and torch.equal(ca, cb)
    assert la.shape == (4, codec.z_dim, WORLD.num_frames, WORLD.height // 4, WORLD.width // 4)
    direct = codec.encode(torch.from_numpy(a.frames(a.clips(12, 4))).float().permute(0, 4, 1, 2, 3) / 127.5 - 1)
    torch.testing.assert_close(la, direct)


def test_no_repeats_and_disjoint_from_the_fixed_dataset(codec):
    clips = _source(codec, seed=0).clips(0, 300) + _source(codec, seed=1).clips(0, 300)
    indices = [c.index for c in clips]
    assert len(set(indices)) == len(indices)
    assert min(indices) >= WORLD.num_clips
    keys = {(c.params.seed, c.params.objects) for c in clips}
    assert len(keys) == len(clips)  # distinct draws, not only distinct indices
    fixed = {(p.seed, p.objects) for p in (sample_params(WORLD, i) for i in range(WORLD.num_clips))}
    assert not keys & fixed


def test_held_out_captions_are_never_drawn(codec):
    source = _source(codec)
    held = held_out_captions(WORLD)
    clips = source.clips(0, 1500)
    assert not {c.caption for c in clips} & held
    assert any(c.index % 64 for c in clips)  # some candidates were skipped (else the test proves nothing)
    unfiltered = _source(codec, exclude=frozenset())
    first = unfiltered.clip(0)
    skipping = _source(codec, exclude=frozenset({first.caption}))
    assert skipping.clip(0).index == first.index + 1 and skipping.clip(0).caption != first.caption


def test_teacher_resume_continues_the_stream_exactly(tmp_path, codec):
    def trainer(steps, name):
        cfg = ToyTeacherConfig(
            steps=steps, batch_size=2, warmup_steps=1, save_every=2, out_dir=str(tmp_path / name), data="procedural"
        )
        model_cfg = model_preset("tiny", in_dim=16, out_dim=16, gradient_checkpointing=False)
        return TeacherTrainer(cfg, model_cfg, FlowSchedule(shift=2.0), _source(codec), torch.zeros(1, 20, 16))

    straight = trainer(4, "straight")
    straight.run(progress=False)
    trainer(2, "split").run(progress=False)
    resumed = trainer(4, "split")
    assert resumed.run(progress=False)["resumed"]
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


def test_rejects_bad_positions(codec):
    with pytest.raises(ValueError):
        _source(codec).clip(-1)
    with pytest.raises(ValueError):
        _source(codec, seed=-1)
    assert np.isfinite(_source(codec).batch(0, 2)[0].numpy()).all()
