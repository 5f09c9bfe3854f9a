"""Wall time per named phase, CUDA-synchronized at phase edges so asynchronous kernels are counted where they run."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """``with timer("phase"): ...`` adds the block's wall time to ``times[phase]``; ``pop()`` returns and clears them.

    ``sync`` synchronizes CUDA at both edges (off by default in training: a sync per phase costs throughput)."""

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.times: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.times[phase] += time.perf_counter() - t0

    @property
    def seconds(self) -> dict[str, float]:
        return dict(self.times)

    def pop(self) -> dict[str, float]:
        out, self.times = dict(self.times), defaultdict(float)
        return out
