"""Gradient accumulation on the loop (engine/train/loop.py): an optimizer update of ``k`` micro-batches.

A method yields the ``k`` micro-batches of one update as ``Update(..., micro=i, micros=k)``. The loop runs
``backward`` + ``step`` on each: DeepSpeed (and :class:`engine.train.engines.TorchEngine`) scales every micro-batch's
loss by ``1/k``, accumulates the gradients and applies the optimizer only at its accumulation boundary, the last
micro-batch. The non-finite decision is one per update, at that boundary: the finiteness of every micro-batch's loss
stays on the device (no host sync per micro-batch) and is folded into the last micro-batch's backward
(``guards.nan_unless``), so an update with a non-finite micro-batch on some rank fails the step's own gradient check
(DeepSpeed's under ZeRO, the loop's elsewhere) and is skipped on every rank, its accumulated gradients dropped with
the optimizer and its learning-rate schedule untouched. What the update logs are the means
over its micro-batches (:class:`MicroMetrics`).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.train import guards


def accumulation_steps(engine) -> int:
    return int(engine.gradient_accumulation_steps()) if hasattr(engine, "gradient_accumulation_steps") else 1


def check_boundary(engine, update, want: bool) -> None:
    """The engine's accumulation boundary must fall on the update's last micro-batch: a method that yields another
    number of micro-batches than the engine accumulates would apply the optimizer in the middle of an update."""
    if guards.at_boundary(engine) != want:
        raise RuntimeError(
            f"{update.role}: micro-batch {update.micro + 1} of {update.micros} of an update, but its engine "
            f"accumulates {accumulation_steps(engine)} micro-batches per optimizer step"
        )


def merge_checks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The named finiteness flags of two micro-batches: a part is finite when it is in both."""
    out = dict(a)
    for k, v in b.items():
        v = v.detach().reshape(()).bool()
        out[k] = out[k] & v if k in out else v
    return out


class FiniteFlags:
    """Per role, the finiteness of the loss (and of its named parts) of the micro-batches an update has run so far, on
    the device."""

    def __init__(self):
        self.flags: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def add(self, update) -> None:
        """A micro-batch before the last: no host sync."""
        finite, checks = self.flags.pop(update.role) if update.micro else (None, {})
        ok = torch.isfinite(update.loss.detach()).reshape(())
        self.flags[update.role] = (ok if finite is None else finite & ok, merge_checks(checks, update.checks))

    def finite(self, update) -> torch.Tensor:
        """At the update's last micro-batch: whether this rank's micro-batches were all finite, a device bool (no host
        sync); the earlier ones' named parts are folded into ``update.checks``."""
        last = torch.isfinite(update.loss.detach()).all()
        if update.micros == 1:
            return last
        finite, checks = self.flags.pop(update.role)
        update.checks = merge_checks(checks, update.checks)
        return finite & last


class MicroMetrics:
    """The means of each metric over the micro-batches of an update, on the device; ``{}`` before its last one."""

    def __init__(self):
        self.sums: dict[str, dict[str, tuple[torch.Tensor, int]]] = {}

    def add(self, update) -> dict[str, torch.Tensor]:
        if update.micro == 0:
            self.sums[update.role] = {}
        sums = self.sums[update.role]
        for k, v in update.metrics.items():
            v = torch.as_tensor(v).detach().float().reshape(())
            s, n = sums.get(k, (0.0, 0))
            sums[k] = (v + s, n + 1)
        if update.micro < update.micros - 1:
            return {}
        return {k: s / n for k, (s, n) in self.sums.pop(update.role).items()}


class MicroBatches:
    """A loop source of ``k`` batches per step (the micro-batches of its updates) over a source with ``next_batch``
    or an iterable one; its state is the wrapped source's position."""

    def __init__(self, source: Any, k: int):
        self.source, self.k, self._it = source, k, None

    def _next(self):
        if hasattr(self.source, "next_batch"):
            return self.source.next_batch()
        if self._it is None:
            self._it = iter(self.source)
        return next(self._it)

    def next_batch(self) -> list:
        return [self._next() for _ in range(self.k)]

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
        self._it = None
