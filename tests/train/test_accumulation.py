"""Gradient accumulation on the loop and the learning-rate warm-up, on every kind of engine (one process).

Accumulating k micro-batches of size b is one update of micro-batch k b: same weights after several updates (fp32).
An update with a non-finite micro-batch is skipped as a whole and leaves no trace. The warm-up follows
lr min(1, (n + 1) / W) over the applied updates and a resumed run continues it.
"""

import pytest
import torch

from engine.train import dist
from engine.train.engines import TorchEngine
from engine.train.loop import Loop, LoopSettings, Update
from engine.train.timer import PhaseTimer
from engine.train.warmup import linear_warmup, warmup_factor

KINDS = ["torch", "zero0", "zero1", "zero3"]
B, K, STEPS = 2, 3, 4  # micro-batch, micro-batches per update, updates
LR = 1e-2


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K * B samples of update ``step`` (a function of the step, so a resumed run sees the same)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(K * B, 8, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(K * B, 1, generator=g)


def _engine(kind: str, micro: int, accum: int, warmup: int = 0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    if kind == "torch":
        assert warmup == 0
        return TorchEngine(model, opt, max_grad_norm=1.0, grad_accum_steps=accum)
    import deepspeed

    dist.init()
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": int(kind[-1]), "stage3_param_persistence_threshold": 20},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, lr_scheduler=linear_warmup(warmup))
    return engine


class _Method:
    """One update per step over the step's K * B samples, in ``micros`` micro-batches; ``nan_at`` = {(step, micro)}
    makes that micro-batch's loss NaN (its gradients stay finite); ``grad_nan_at`` = {step} makes that update's
    gradients NaN (its loss stays finite)."""

    name = "toy"

    def __init__(self, engine, micros: int, nan_at=(), grad_nan_at=()):
        self.engines, self.timer, self.micros = {"net": engine}, PhaseTimer(), micros
        self.samples_per_step = K * B
        self.nan_at, self.grad_nan_at = set(nan_at), set(grad_nan_at)
        self.lrs: list[float] = []
        self.data = _data

    def updates(self, step, batch):
        from tests.distill.ds_worker import NanGrad

        engine = self.engines["net"]
        self.lrs.append(engine.optimizer.param_groups[0]["lr"])
        x, y = self.data(step)
        for i, (xi, yi) in enumerate(zip(x.chunk(self.micros), y.chunk(self.micros))):
            out = engine(xi)
            if step in self.grad_nan_at:
                out = NanGrad.apply(out)
            loss = (out - yi).square().mean()
            if (step, i) in self.nan_at:  # a NaN that no gradient carries: only the loss check can catch it
                loss = loss + torch.tensor(float("nan"))
            yield Update("net", loss, {"loss": loss.detach()}, micro=i, micros=self.micros)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def rank_state_dict(self):
        return {}

    def load_rank_state_dict(self, state):
        pass

    def log_scalars(self, seconds, steps):
        return {}


def _weights(engine):
    return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]


def _loop(tmp_path, name, method, max_steps=STEPS, every=1000):
    settings = LoopSettings(tmp_path / name, max_steps=max_steps, every_steps=every, keep_last=2, progress_bar=False)
    settings.tensorboard = False
    return Loop(settings, method)


def _train(loop, steps):
    rows = []
    for _ in range(steps):
        rows.append(loop.train_step())
        loop.step += 1
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_k_micro_batches_equal_one_update_of_the_large_batch(tmp_path, kind):
    big = _loop(tmp_path, "big", _Method(_engine(kind, K * B, 1), micros=1))
    acc = _loop(tmp_path, "acc", _Method(_engine(kind, B, K), micros=K))
    before = _weights(acc.method.engines["net"])
    rows_big, rows_acc = _train(big, STEPS), _train(acc, STEPS)
    got, want = _weights(acc.method.engines["net"]), _weights(big.method.engines["net"])
    assert not all(torch.equal(a, b) for a, b in zip(before, got))  # it trained
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the logged loss of an accumulated update is the mean over its micro-batches, i.e. the large batch's loss
    for r_big, r_acc in zip(rows_big, rows_acc):
        assert r_acc["loss"].item() == pytest.approx(r_big["loss"].item(), rel=1e-6)
    if kind != "torch":
        assert acc.method.engines["net"].global_steps == big.method.engines["net"].global_steps == STEPS


@pytest.mark.parametrize("bad_micro", [0, K - 1])
@pytest.mark.parametrize("kind", KINDS)
def test_a_non_finite_micro_batch_skips_the_whole_update_without_a_trace(tmp_path, kind, bad_micro):
    """[update 0 with one NaN micro-batch, update 1] leaves the weights and optimizer of [update 1] alone."""
    poisoned = _loop(tmp_path, "poisoned", _Method(_engine(kind, B, K), micros=K, nan_at={(0, bad_micro)}))
    engine = poisoned.method.engines["net"]
    before = _weights(engine)
    _train(poisoned, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(engine)))
    assert poisoned.skipped == {"net": 1} and poisoned.nonfinite == {"net": {"loss": 1}}  # one update, not k
    _train(poisoned, 1)
    assert poisoned.in_a_row == {"net": 0}

    class _Second(_Method):  # a clean engine that sees update 1 only
        def updates(self, step, batch):
            yield from super().updates(step + 1, batch)

    clean = _loop(tmp_path, "clean", _Second(_engine(kind, B, K), micros=K))
    _train(clean, 1)
    after, want = _weights(engine), _weights(clean.method.engines["net"])
    assert all(torch.isfinite(a).all() for a in after)
    assert all(torch.equal(a, b) for a, b in zip(after, want))  # nothing of the skipped update leaked


def test_an_update_that_does_not_match_the_engines_accumulation_is_refused(tmp_path):
    loop = _loop(tmp_path, "mismatch", _Method(_engine("torch", B, 2), micros=1))
    with pytest.raises(RuntimeError, match="micro-batch 1 of 1 of an update, but its engine accumulates 2"):
        _train(loop, 1)


@pytest.mark.parametrize("kind", ["zero0", "zero3"])
def test_warmup_follows_the_formula_and_skipped_updates_do_not_advance_it(tmp_path, kind):
    w = 4
    method = _Method(_engine(kind, B, K, warmup=w), micros=K, nan_at={(2, 1)}, grad_nan_at={4})
    _train(_loop(tmp_path, "warm", method), 8)
    applied = [0, 1, 2, 2, 3, 3, 4, 5]  # update index n at each step: steps 2 (NaN loss) and 4 (NaN grads) skipped
    assert method.lrs == pytest.approx([LR * min(1.0, (n + 1) / w) for n in applied], rel=1e-12, abs=0)
    assert [warmup_factor(n, w) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind", ["zero0", "zero3"])
def test_a_run_resumed_mid_warmup_continues_the_schedule_exactly(tmp_path, kind):
    w, steps = 5, 6
    straight = _Method(_engine(kind, B, K, warmup=w), micros=K)
    _loop(tmp_path, "straight", straight, max_steps=steps).run()
    first = _Method(_engine(kind, B, K, warmup=w), micros=K)
    _loop(tmp_path, "split", first, max_steps=2, every=2).run()  # stops (and saves) inside the warm-up
    second = _Method(_engine(kind, B, K, warmup=w), micros=K)
    loop = _loop(tmp_path, "split", second, max_steps=steps, every=2)
    loop.run()
    assert loop.resumed_from is not None and loop.resumed_from.name == "step_00000002"
    assert first.lrs + second.lrs == straight.lrs  # lr of update 2 is 3/5 of lr, not 1/5 (a restarted warm-up)
    assert straight.lrs == pytest.approx([LR * min(1.0, (n + 1) / w) for n in range(steps)], rel=1e-12, abs=0)
    got, want = _weights(second.engines["net"]), _weights(straight.engines["net"])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("kind", ["zero0", "zero3"])
def test_the_warmup_rate_is_the_rate_the_optimizer_applies(tmp_path, kind):
    """AdamW's first update moves every weight by about its learning rate: with a 4-update warm-up, a quarter."""
    deltas = []
    for warmup in (0, 4):
        engine = _engine(kind, B, K, warmup=warmup)
        before = _weights(engine)
        _train(_loop(tmp_path, f"rate{warmup}", _Method(engine, micros=K)), 1)
        deltas.append(torch.cat([(a - b).flatten() for a, b in zip(_weights(engine), before)]).abs())
    full, warm = deltas
    assert full.median().item() == pytest.approx(LR, rel=0.05)
    torch.testing.assert_close(warm, full / 4, rtol=1e-3, atol=1e-7)
