"""The loop's gradient guard on every kind of engine: an update whose gradients are not finite (its loss is) is
skipped and leaves no trace: the weights and the optimizer state after [poisoned, good] equal those after [good]."""

import pytest
import torch

from engine.train import dist
from engine.train.engines import TorchEngine
from engine.train.loop import Loop, LoopSettings, Update
from engine.train.timer import PhaseTimer
from tests.distill.ds_worker import NanGrad


class _Method:
    name, samples_per_step = "toy", 1

    def __init__(self, engine):
        self.engines, self.timer = {"net": engine}, PhaseTimer()


def _engine(kind: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if kind == "torch":
        return TorchEngine(model, opt, max_grad_norm=1.0)
    import deepspeed

    dist.init()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": int(kind[-1]), "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _update(engine, x, poison=False):
    out = engine(x)
    return Update("net", (NanGrad.apply(out) if poison else out).square().mean())


def _weights(engine):
    return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("kind", ["torch", "zero0", "zero1", "zero2", "zero3"])
def test_non_finite_gradients_skip_the_update_without_a_trace(tmp_path, kind):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    settings = LoopSettings(tmp_path / kind, max_steps=1, every_steps=1, keep_last=1, progress_bar=False)
    poisoned = Loop(settings, _Method(_engine(kind)))
    engine = poisoned.method.engines["net"]
    before = _weights(engine)
    assert poisoned._apply(_update(engine, x, poison=True)) is False
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(engine)))
    assert poisoned.skipped == {"net": 1} and poisoned.nonfinite == {"net": {"grad_norm": 1}}
    assert poisoned._apply(_update(engine, x)) is True and poisoned.in_a_row == {"net": 0}
    clean = Loop(LoopSettings(tmp_path / f"{kind}-clean", 1, 1, 1, progress_bar=False), _Method(_engine(kind)))
    assert clean._apply(_update(clean.method.engines["net"], x)) is True
    after, want = _weights(engine), _weights(clean.method.engines["net"])
    assert all(torch.isfinite(a).all() for a in after)
    assert all(torch.equal(a, b) for a, b in zip(after, want))  # nothing of the poisoned update leaked
