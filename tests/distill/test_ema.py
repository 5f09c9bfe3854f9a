"""The generator EMA on unpartitioned parameters (ZeRO stages 0-2, every rank the whole model): the update rule
against a float64 reference, the swap used by sample videos and the export, its checkpoint state."""

from types import SimpleNamespace

import pytest
import torch

from engine.distill.ema import PartitionedEMA
from engine.train.checkpoint import TrainCheckpointError


def _engine():
    torch.manual_seed(0)
    return SimpleNamespace(module=torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))


def _perturb(module, step):
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_the_update_rule_and_the_swap():
    engine, decay, start = _engine(), 0.9, 2
    ema = PartitionedEMA(engine, decay, start)
    ref = {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
    for step in range(6):
        _perturb(engine.module, step)  # an optimizer update
        ema.update(step)
        for n, p in engine.module.named_parameters():
            w = p.detach().double()
            ref[n] = w.clone() if step < start else decay * ref[n] + (1 - decay) * w
    raw = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    x = torch.randn(3, 4)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    plain.load_state_dict({n: v.float() for n, v in ref.items()})
    with ema.swapped_in():
        for n, p in engine.module.named_parameters():
            torch.testing.assert_close(p.detach().double(), ref[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(engine.module(x), plain(x), rtol=0, atol=1e-6)
    assert all(torch.equal(p, raw[n]) for n, p in engine.module.named_parameters())  # the trained weights are back
    assert any((raw[n].double() - ref[n]).abs().max() > 1e-3 for n in raw)


def test_state_round_trip_and_bad_state():
    engine = _engine()
    ema = PartitionedEMA(engine, 0.5, 0)
    _perturb(engine.module, 0)
    ema.update(0)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    other = PartitionedEMA(engine, 0.5, 0)  # built from the current weights
    other.load_state_dict(saved)
    assert all(torch.equal(other.shadow[k], saved[k]) for k in saved)
    other.load_state_dict(None)  # a checkpoint without an EMA: start from the weights
    assert all(torch.equal(other.shadow[n], p.detach()) for n, p in engine.module.named_parameters())
    with pytest.raises(TrainCheckpointError, match="generator EMA in the checkpoint does not match the model"):
        other.load_state_dict({**saved, "0.weight": torch.zeros(3)})
