"""Linear learning-rate warm-up of a trained role (``optim.warmup_steps``, ``interp.warmup_steps``).

Update ``n`` (0-based, counting the role's optimizer updates that were applied) runs at ``lr * min(1, (n + 1) / W)``:
the first update already moves the weights (at lr / W), update W - 1 reaches the full rate. It is a torch ``LambdaLR``
handed to ``deepspeed.initialize``, so DeepSpeed steps it with the optimizer (only when an update is applied: a step it
discards for a non-finite gradient norm does not advance it) and keeps its state in the engine's checkpoint, from which
a resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def warmup_factor(n: int, steps: int) -> float:
    """The factor of the base learning rate at update ``n`` of a ``steps``-update warm-up."""
    return min(1.0, (n + 1) / steps) if steps > 0 else 1.0


def linear_warmup(steps: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None:
    """For ``deepspeed.initialize(lr_scheduler=...)``: None without warm-up (``steps == 0``), else a callable that
    builds the schedule on the optimizer DeepSpeed steps. The factor is a plain function, so the scheduler's state
    holds only its position (``last_epoch``), not the configured length."""
    if steps <= 0:
        return None

    def factor(n: int) -> float:
        return warmup_factor(n, steps)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
