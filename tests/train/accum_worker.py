"""Worker of the 2-rank ZeRO-3 accumulation and EMA tests (tests/train/test_accumulation_distributed.py).

    torchrun --nproc_per_node 2 tests/train/accum_worker.py OUT.json

Each rank trains on its own samples. Rank 0 writes OUT.json: how far K accumulated micro-batches are from one update
of the large batch, whether a NaN micro-batch on rank 1 alone skips the update on both ranks without a trace, and how
far the partitioned generator EMA is from a reference computed on the gathered full parameters.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from engine.distill.ema import PartitionedEMA
from engine.train import dist
from tests.train.test_accumulation import B, K, _data, _engine, _loop, _Method, _train

STEPS, DECAY, START = 5, 0.7, 2


def _full(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def _method(engine, micros, **kw):
    m = _Method(engine, micros, **kw)
    m.data = lambda step: _data(1000 * dist.rank() + step)  # every rank its own samples
    return m


def main() -> None:
    out, tmp = Path(sys.argv[1]), Path(sys.argv[1]).parent
    dist.init()
    report = {"world": dist.world_size()}

    big = _loop(tmp, "big", _method(_engine("zero3", K * B, 1), 1))
    acc = _loop(tmp, "acc", _method(_engine("zero3", B, K), K))
    _train(big, STEPS)
    _train(acc, STEPS)
    a, b = _full(acc.method.engines["net"]), _full(big.method.engines["net"])
    report["accum_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    report["accum_max_rel"] = max(float(((a[k] - b[k]).abs() / b[k].abs().clamp(min=1e-3)).max()) for k in a)

    nan_at = {(0, 1)} if dist.rank() == 1 else set()  # rank 1's second micro-batch of update 0 only
    poisoned = _loop(tmp, "poisoned", _method(_engine("zero3", B, K), K, nan_at=nan_at))
    before = _full(poisoned.method.engines["net"])
    _train(poisoned, 1)
    after = _full(poisoned.method.engines["net"])
    report["skipped"] = poisoned.skipped
    report["untouched"] = all(torch.equal(before[k], after[k]) for k in before)

    # the EMA of the partitions against a reference on the gathered full parameters (float64)
    engine = _engine("zero3", B, K)
    loop = _loop(tmp, "ema", _method(engine, K))
    ema = PartitionedEMA(engine, DECAY, START)
    report["persistent"] = sum(bool(getattr(p, "ds_persist", False)) for p in engine.module.parameters())
    report["partitioned"] = sum(not getattr(p, "ds_persist", False) for p in engine.module.parameters())
    ref = {k: v.double() for k, v in _full(engine).items()}
    for step in range(STEPS):
        _train(loop, 1)
        ema.update(step)
        full = _full(engine)
        for k in ref:
            ref[k] = full[k].double() if step < START else DECAY * ref[k] + (1 - DECAY) * full[k].double()
    raw = _full(engine)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with ema.swapped_in():
        averaged = _full(engine)
        with torch.no_grad():
            y_ema = engine.module(x)  # collective forward on the swapped partitions (persistent ones included)
    with torch.no_grad():
        y_raw = engine.module(x)
        plain.load_state_dict({k: v.float() for k, v in ref.items()})
        y_ref = plain(x)
        plain.load_state_dict(raw)
        y_plain = plain(x)
    restored = _full(engine)
    report["ema_max_diff"] = max(float((averaged[k].double() - ref[k]).abs().max()) for k in ref)
    report["ema_vs_raw"] = max(float((averaged[k] - raw[k]).abs().max()) for k in ref)
    report["ema_forward_diff"] = float((y_ema - y_ref).abs().max())
    report["raw_forward_diff"] = float((y_raw - y_plain).abs().max())
    report["raw_restored"] = all(torch.equal(raw[k], restored[k]) for k in raw)
    report["local_shapes"] = {k: list(v.shape) for k, v in ema.state_dict().items()}
    report["full_shapes"] = {k: list(v.shape) for k, v in raw.items()}
    if dist.is_main():
        out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
