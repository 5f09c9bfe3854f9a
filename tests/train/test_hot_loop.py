"""The hot loop on the device's terms: host syncs per update, ZeRO-3's prefetch trace, the loss check folded into the
gradient check (docs/architecture.md#the-hot-loop).

One real distillation job on 2 gloo ranks (tests/train/step_probe_worker.py: ds_worker's world, a tiny teacher,
ZeRO-3) counts, per trainer step, the calls that make the host wait for the device and DeepSpeed's trace
invalidations per role. Seed 1 is a seed whose first generator pass is a no-grad rollout (the case that used to
invalidate the generator's trace at every generator update).
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.train import guards
from engine.train.loop import Loop, LoopSettings, Update
from engine.train.timer import PhaseTimer
from tests.distill.test_trainer_distributed import RUN_YAML, teacher  # noqa: F401 (a fixture)
from tests.train.test_guards import _engine, _Method, _weights

WORKER = Path(__file__).with_name("step_probe_worker.py")
STEPS, LOG_EVERY, CYCLE = 20, 4, 5
WARMUP = 6
"""Steps whose intervals hold DeepSpeed's first trace recordings (each engine records on its first passes and checks
the trace against the other ranks, one host sync per submodule; the teacher's second pass is the second generator
step) and the first rope-table build: excluded from the per-step bound."""

HOST_SIDE = {
    ("__int__", "engine/distill/method.py:_rollout_input"): "the exit step drawn from the shared CPU generator",
    ("item", "deepspeed/runtime/zero/stage3.py:step_with_gradscaler"): "torch.optim's step counter (a CPU tensor)",
    ("__int__", "engine/train/dist.py:host_max"): "the signal check: a host tensor all-reduced over a gloo group",
}
"""Reads of tensors that live on the host on every platform: no device sync on a GPU."""


@pytest.fixture(scope="module")
def probe(tmp_path_factory, teacher):  # noqa: F811
    tmp = tmp_path_factory.mktemp("probe")
    run_dir, out = tmp / "run", tmp / "probe.json"
    cfg = tmp / "run.yaml"
    cfg.write_text(RUN_YAML.format(teacher=teacher, steps=STEPS, every=1000, run_dir=run_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER)]
    cmd += [str(out), str(cfg), "train.seed=1", f"logging.log_every={LOG_EVERY}"]
    cmd += ["checkpoint.export=false", "logging.tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _device_syncs(calls: list[str]) -> list[str]:
    return [c for c in calls if tuple(c.split(" ", 1)) not in HOST_SIDE]


@pytest.mark.distributed
def test_at_most_one_host_sync_per_update_outside_log_steps(probe):
    rows = probe["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    checked = 0
    for r in rows:
        ran_after_log = (r["step"] - 1) % LOG_EVERY == 0  # the interval holds the log step before it
        if r["step"] <= WARMUP or ran_after_log:
            continue
        device = _device_syncs(r["syncs"])
        assert 1 <= len(device) <= r["updates"], (r["step"], r["updates"], collections.Counter(device))
        checked += 1
    assert checked == 11  # steps 7-20 but 9, 13, 17 (after a log step); generator steps 11 and 16 among them
    # the probe sees the engine's reads: a log step brings the window's metrics to the host in one transfer
    log_row = next(r for r in rows if r["step"] == 2 * LOG_EVERY + 1)
    assert "tolist engine/train/loop.py:means" in log_row["syncs"]


@pytest.mark.distributed
def test_zero3_traces_stay_valid_through_the_5_to_1_cycle(probe):
    rows = probe["rows"]
    for r in rows[CYCLE:]:  # after the first cycle: no role ever drops its trace or forwards without one
        assert r["invalidated"] == {"teacher": 0, "generator": 0, "critic": 0}, r["step"]
        assert r["unprefetched_forwards"] == {"teacher": 0, "generator": 0, "critic": 0}, r["step"]
    first = collections.Counter()
    for r in rows[:CYCLE]:
        first.update(r["invalidated"])
    assert first["teacher"] == 0 and first["generator"] <= 1 and first["critic"] <= 1
    assert probe["dropped"]["generator"] == 1  # this seed starts the generator on a no-grad pass: the keeper acted


def _loss_update(engine, x, nan_loss: bool):
    out = engine(x)
    loss = out.square().mean()
    return Update("net", loss + float("nan") if nan_loss else loss)


@pytest.mark.parametrize("kind", ["torch", "zero0", "zero1", "zero2", "zero3"])
def test_a_non_finite_loss_is_caught_by_the_gradient_check_and_named(tmp_path, kind):
    """No host sync decides the loss before backward at a boundary: the NaN reaches the gradients, the step's own
    check discards them, and the skip is still counted as a non-finite loss; nothing of it reaches the weights."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    loop = Loop(LoopSettings(tmp_path / kind, 1, 1, 1, progress_bar=False), _Method(_engine(kind)))
    engine = loop.method.engines["net"]
    before = _weights(engine)
    assert loop._apply(_loss_update(engine, x, nan_loss=True)) is False
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(engine)))
    assert loop.skipped == {"net": 1} and loop.nonfinite == {"net": {"loss": 1}}
    assert loop._apply(_loss_update(engine, x, nan_loss=False)) is True
    clean = Loop(LoopSettings(tmp_path / f"{kind}-clean", 1, 1, 1, progress_bar=False), _Method(_engine(kind)))
    assert clean._apply(_loss_update(clean.method.engines["net"], x, nan_loss=False)) is True
    assert all(torch.equal(a, b) for a, b in zip(_weights(engine), _weights(clean.method.engines["net"])))


def test_nan_unless_changes_no_bit_of_a_finite_loss_and_poisons_a_non_finite_one():
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    (ref,) = torch.autograd.grad((x @ w.T).square().mean(), w)
    loss = (x @ w.T).square().mean()
    folded = guards.nan_unless(torch.isfinite(loss), loss)
    assert torch.equal(folded, loss)
    (got,) = torch.autograd.grad(folded, w)
    assert torch.equal(got, ref)
    bad = (x @ w.T).square().mean() + float("nan")  # NaN that does not depend on w: the gradient alone is finite
    (g,) = torch.autograd.grad(guards.nan_unless(torch.isfinite(bad), bad), w)
    assert torch.isnan(g).all()


def test_phase_timer_pop_returns_the_window_and_clears_it():
    timer = PhaseTimer(events=True)  # CUDA events on a GPU, wall-clock here
    with timer("a"):
        sum(range(10000))
    with timer("a"):
        pass
    times = timer.pop()
    assert set(times) == {"a"} and times["a"] > 0 and timer.pop() == {}


@pytest.mark.gpu
def test_phase_timer_events_never_synchronize_inside_a_step(monkeypatch):
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a) or real(*a))
    timer = PhaseTimer(events=True)
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        with timer("matmul"):
            a = (a @ a).tanh()
        with timer("idle"):
            pass
    assert calls == []  # no sync at any edge
    times = timer.pop()  # read here, at the "log step"
    assert times["matmul"] > times["idle"] >= 0
