"""An exponential moving average of the generator's weights (``method.ema``), kept where the weights live.

Under ZeRO-3 every rank averages its own partition of each parameter (``param.ds_tensor``) and nothing is gathered:
the EMA costs one fp32 copy of the rank's partition and no communication. At ZeRO stages 0-2 each rank holds the
whole model and averages all of it. Only trained parameters are averaged: with ``model.lora`` the adapters (the
frozen base weights never move, so their average is themselves). The average is kept in fp32 whatever the training
dtype (a bf16 average would drop most of an update at decay 0.99).

After each generator update the loop applied at trainer step ``n``: below ``start_step`` the EMA is a copy of the
weights; from it on, ``ema <- decay ema + (1 - decay) w``. Each rank checkpoints its own part (the trainer's per-rank
file, a weights-only torch file), so a resumed run continues it exactly. For sample videos and the export the EMA is
swapped into the parameters' partitions for the duration of a block (:meth:`PartitionedEMA.swapped_in`), so the
existing gathering export writes the full averaged weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.train.checkpoint import TrainCheckpointError


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class PartitionedEMA:
    def __init__(self, engine, decay: float, start_step: int):
        """``engine``: the generator's DeepSpeed engine (or any object with ``.module``)."""
        self.engine, self.decay, self.start_step = engine, decay, start_step
        self.params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        self.zero3 = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shadow = self._copy()

    @torch.no_grad()
    def _copy(self) -> dict[str, torch.Tensor]:
        return {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After an applied generator update at trainer step ``step`` (device ops only, no host sync)."""
        for n, p in self.params.items():
            local = _local(p).detach()
            if step < self.start_step:
                self.shadow[n].copy_(local)
            else:
                self.shadow[n].lerp_(local.float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        """This rank's EMA from its checkpoint file; None (a checkpoint written without the EMA) starts it from the
        resumed weights."""
        if state is None:
            self.shadow = self._copy()
            return
        want = {n: tuple(t.shape) for n, t in self.shadow.items()}
        have = {n: tuple(t.shape) for n, t in state.items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or [n for n in want if want[n] != have[n]]
            raise TrainCheckpointError(f"the generator EMA in the checkpoint does not match the model: {diff[:5]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)

    def _release(self) -> None:
        """ZeRO-3: partition every parameter (persistent ones included), so the next use gathers the partitions."""
        if self.zero3:
            self.engine.optimizer.parameter_offload.partition_all_parameters()

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the generator's parameters hold the EMA (under ZeRO-3 its partitions; a forward or a
        ``GatheredParameters`` gathers the averaged weights); the trained weights are back after it. Collective under
        ZeRO-3 only through what the block itself gathers."""
        self._release()
        raw = {}
        for n, p in self.params.items():
            local = _local(p)
            raw[n] = local.detach().clone()
            local.copy_(self.shadow[n])
        try:
            yield
        finally:
            self._release()
            for n, p in self.params.items():
                _local(p).copy_(raw[n])
