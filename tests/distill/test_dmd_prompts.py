"""Distillation and fine-tuning in one stage, toy world: the DMD prompts and the regression pairs come from separately
configured sources (data.dmd_prompts, data.filter), each in its own sharded order, and both positions resume exactly.
The Wan world's variants are in test_wan_world.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.toy.captions import parse_caption
from engine.toy.data import toy_tensors
from engine.toy.parts import toy_parts
from engine.worlds.prompts import read_prompt_file
from engine.worlds.source import SplitSource, TensorSource
from engine.worlds.toy import toy_world

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "configs" / "toy.yaml"
TARGET = ["data.filter.kinds=[texture]"]
BROAD = ["data.dmd_prompts.source=toy"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


def cfg_of(cache, *overrides):
    return load_config(TOY, ["toy.num_clips=48", f"toy.cache_dir={cache}", *overrides])


@pytest.fixture(scope="module")
def train(cache):
    """The train split (tensors, captions) and a map from a context row's bytes to its caption."""
    cfg = cfg_of(cache)
    parts = toy_parts(cfg)
    t = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
    return t, {t.context[i].numpy().tobytes(): t.captions[i] for i in range(len(t.captions))}


def captions_of(context: torch.Tensor, by_row: dict) -> list[str]:
    return [by_row[row.numpy().tobytes()] for row in context]


def test_default_keeps_one_tensor_source(cache):
    world = toy_world(cfg_of(cache), training=True)
    assert type(world.source) is TensorSource  # the path the golden losses pin
    assert world.source.latents.shape[0] == 43  # the whole train split (48 clips, 5 held out)


def test_prompts_from_the_world_pairs_from_the_target_domain(cache, train):
    t, by_row = train
    world = toy_world(cfg_of(cache, *TARGET, *BROAD), training=True)
    assert isinstance(world.source, SplitSource)
    pairs, prompts = [], []
    for _ in range(30):  # several epochs of both streams
        b = world.source.next_batch()
        assert b.real_latents.shape == (4, 16, 9, 8, 8) and b.prompts.shape == (4, 20, 32)
        real = captions_of(b.real_context, by_row)
        pairs += real
        prompts += captions_of(b.prompts, by_row)
        for cap, lat in zip(real, b.real_latents):  # each latent is its caption's clip
            assert torch.equal(lat, t.latents[t.captions.index(cap)])
    assert {parse_caption(c)["kind"] for c in pairs} == {"texture"}
    assert set(pairs) == {c for c in t.captions if parse_caption(c)["kind"] == "texture"}  # every target clip
    assert {parse_caption(c)["kind"] for c in prompts} == {"background", "gradient", "texture"}
    assert set(prompts) == set(t.captions)  # the whole train split, over its epochs


def test_a_filtered_prompt_set_and_same_prompts_from_a_filtered_domain(cache, train):
    _, by_row = train
    world = toy_world(cfg_of(cache, "data.dmd_prompts.source=toy", "data.dmd_prompts.filter.kinds=[gradient]"),
                      training=True)  # fmt: skip
    b = [world.source.next_batch() for _ in range(10)]
    assert {parse_caption(c)["kind"] for x in b for c in captions_of(x.prompts, by_row)} == {"gradient"}
    assert len({c for x in b for c in captions_of(x.real_context, by_row)}) > 20  # pairs: the whole train split
    same = toy_world(cfg_of(cache, *TARGET), training=True)  # source=same: prompts are drawn from the target pairs
    assert isinstance(same.source, TensorSource) and same.source.latents.shape[0] < 43
    x = same.source.next_batch()
    assert {parse_caption(c)["kind"] for c in captions_of(torch.cat([x.prompts, x.real_context]), by_row)} == {
        "texture"
    }


def test_both_streams_resume_exactly(cache):
    cfg = cfg_of(cache, *TARGET, *BROAD)
    first = toy_world(cfg, training=True).source
    for _ in range(7):  # past the end of the pairs' first epoch (20 clips, 4 a batch) but not the prompts' (43)
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # the checkpoint stores it as JSON-like data
    assert state["pairs"]["epoch"] == 1 and state["prompts"]["epoch"] == 0
    tail = [first.next_batch() for _ in range(12)]
    resumed = toy_world(cfg, training=True).source
    resumed.next_batch()  # a running stream must give way to the loaded position
    resumed.load_state_dict(state)
    for want, got in zip(tail, [resumed.next_batch() for _ in range(12)]):
        assert torch.equal(want.prompts, got.prompts) and torch.equal(want.real_latents, got.real_latents)
        assert torch.equal(want.real_context, got.real_context)
    plain = toy_world(cfg_of(cache), training=True).source
    with pytest.raises(ValueError, match="separate DMD prompts"):
        plain.load_state_dict(state)
    with pytest.raises(ValueError, match="without separate DMD prompts"):
        resumed.load_state_dict(plain.state_dict())


def test_two_ranks_read_disjoint_shards_of_both_streams(cache, train, monkeypatch):
    _, by_row = train
    from engine.train import dist

    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        src = toy_world(cfg_of(cache, *TARGET, *BROAD), training=True).source
        b = [src.next_batch() for _ in range(2)]  # 8 of each rank's 10 pairs and 21-22 prompts: within epoch 0
        seen[rank] = (
            [c for x in b for c in captions_of(x.real_context, by_row)],
            [c for x in b for c in captions_of(x.prompts, by_row)],
        )
    for k in (0, 1):  # every caption of a stream is one clip: disjoint shards have no caption in common
        assert not set(seen[0][k]) & set(seen[1][k])


def test_prompts_from_a_file_of_toy_captions(cache, train, tmp_path):
    t, by_row = train
    chosen = [c for c in t.captions if parse_caption(c)["kind"] == "background"][:6]
    path = tmp_path / "prompts.txt"
    path.write_text("# solid backgrounds\n\n" + "\n".join(chosen) + "\n")
    assert read_prompt_file(str(path)) == chosen
    world = toy_world(cfg_of(cache, "data.dmd_prompts.source=file", f"data.dmd_prompts.path={path}"), training=True)
    got = {c for _ in range(6) for c in captions_of(world.source.next_batch().prompts, by_row)}
    assert got == set(chosen)
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": c}) + "\n" for c in chosen[:3]) + json.dumps({"prompt": chosen[3]}))
    assert read_prompt_file(str(jsonl)) == chosen[:4]
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(chosen[:5]) + "\na cat on a sofa\n")
    with pytest.raises(ConfigError, match=r"`data.dmd_prompts.path`: .*bad.txt prompt 6"):
        toy_world(cfg_of(cache, "data.dmd_prompts.source=file", f"data.dmd_prompts.path={bad}"), training=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"caption": chosen[0]}) + "\n{not json\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_prompt_file(str(broken))
    with pytest.raises(ConfigError, match="`data.dmd_prompts.path`: .* holds no prompt"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        read_prompt_file(str(tmp_path / "empty.txt"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.filter.kinds=[stripes]"], "data.filter.kinds"),
        (["data.dmd_prompts.source=toy", "data.dmd_prompts.filter.colours=[pink]"], "data.dmd_prompts.filter.colours"),
        (["data.dmd_prompts.filter.kinds=[texture]"], "data.dmd_prompts.filter"),  # read only with source=toy
        (["data.dmd_prompts.source=file"], "data.dmd_prompts.path"),
        (["data.dmd_prompts.path=p.txt"], "data.dmd_prompts.path"),
        (["data.dmd_prompts.source=cache", "data.dmd_prompts.cache_dir=c"], "data.dmd_prompts.source"),
        (["data.dmd_prompts.cache_dir=c"], "data.dmd_prompts.cache_dir"),
        (["method.dmd.enabled=false", "method.regression.enabled=false", "method.temporal.enabled=false"], "method"),
        (["method.dmd.enabled=false", "method.regression.weight=0", "method.temporal.weight=0"], "method"),
        (["method.dmd.enabled=false"], "method.critic_per_generator"),  # no critic between generator updates
    ],
)  # fmt: skip
def test_config_errors_name_the_key(cache, overrides, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        cfg_of(cache, *overrides)


def test_a_regression_only_config_is_allowed(cache):
    cfg = cfg_of(cache, "method.dmd.enabled=false", "method.critic_per_generator=1", "method.temporal.enabled=false")
    assert cfg.method.regression.enabled


def test_a_target_domain_too_small_for_the_batch_is_refused_before_rendering(tmp_path):
    cfg = cfg_of(tmp_path, "data.filter.kinds=[texture]", "data.filter.backgrounds=[sand]",
                 "data.filter.directions=[up]")  # fmt: skip
    with pytest.raises(ConfigError, match=r"`data.filter`: \d+ matching toy training clips cannot fill"):
        toy_world(cfg, training=True)
    assert not any(tmp_path.iterdir())  # nothing was rendered


def launch(run_dir: Path, cache: Path, config: str, *overrides: str, nproc: int = 1):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(REPO / "launcher" / "run.py"), "--config", str(REPO / "configs" / config)]
    cmd += [f"logging.run_dir={run_dir}", f"toy.cache_dir={cache}", "toy.num_clips=48", "deepspeed.dtype=fp32",
            "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.every_steps=1",
            "checkpoint.export=false", "logging.log_every=1", "method.critic_per_generator=1", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


def logged(run_dir: Path, step: int) -> str:
    lines = [ln for ln in (run_dir / "train.log").read_text().splitlines() if f" step {step} loss" in ln]
    assert len(lines) == 1, lines
    return lines[0].split(f" step {step} ", 1)[1].split(" mfu=")[0]


def values(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split() if "=" in kv)}


@pytest.mark.distributed
def test_single_stage_recipe_runs_and_resumes_both_streams(cache, tmp_path):
    """configs/toy-ft-single.yaml (2 ranks, ZeRO-3, a generator update every step): two steps straight, and one step
    then a resumed second, log the same losses (loss_reg reads the pairs' stream, loss_dmd and loss_critic the
    prompts'): the resumed run continued both streams where the checkpoint left them."""
    straight = launch(tmp_path / "straight", cache, "toy-ft-single.yaml", "train.max_steps=2", nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "resumed"
    first = launch(run, cache, "toy-ft-single.yaml", "train.max_steps=1", nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    again = launch(run, cache, "toy-ft-single.yaml", "train.max_steps=2", nproc=2)
    assert again.returncode == 0 and "finished at step 2" in again.stdout, again.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    assert logged(run, 1) == logged(tmp_path / "straight", 1)
    assert logged(run, 2) == logged(tmp_path / "straight", 2)
    assert all(f"{k}=" in logged(run, 2) for k in ("loss_reg", "loss_dmd", "loss_critic"))


@pytest.mark.distributed
def test_distill_then_fine_tune_in_sequence(cache, tmp_path):
    """(a) configs/toy-ft-dmd.yaml, then (c) configs/toy-ft-then.yaml from (a)'s export: regression alone on the
    target domain, no critic update (DMD off), checkpoints and the export written under ZeRO-3 on 2 ranks."""
    first = tmp_path / "a"
    a = launch(first, cache, "toy-ft-dmd.yaml", "train.max_steps=1", "checkpoint.export=true", nproc=2)
    assert a.returncode == 0, a.stderr[-3000:]
    assert values(logged(first, 1))["loss_reg"] == 0  # (a) has no regression term
    student = first / "export" / "transformer"
    then = tmp_path / "c"
    c = launch(then, cache, "toy-ft-then.yaml", "train.max_steps=2", "checkpoint.export=true",
               f"model.checkpoint={student}", nproc=2)  # fmt: skip
    assert c.returncode == 0 and "finished at step 2" in c.stdout, c.stderr[-3000:]
    losses = values(logged(then, 2))
    assert "loss_critic" not in losses and losses["loss_dmd"] == 0 and losses["loss_reg"] > 0
    from engine.models.checkpoint import load_weights
    from engine.models.wan import WanModel

    cfg = load_config(REPO / "configs" / "toy-ft-then.yaml", [f"model.checkpoint={student}"])
    before, after = WanModel(cfg.model), WanModel(cfg.model)
    load_weights(before, student)
    load_weights(after, then / "export" / "transformer")
    assert not torch.equal(before.head.head.weight, after.head.head.weight)  # the fine-tune trained the student
