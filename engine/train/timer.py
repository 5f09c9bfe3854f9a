"""Time per named phase: wall-clock on the host, CUDA events in training, or CUDA-synchronized wall time.

Modes (``PhaseTimer(events=..., sync=...)``):

* default: host wall-clock between the edges (on CUDA that is the time to *launch* the phase's kernels);
* ``events=True`` (training, ``logging.phase_timing``): on CUDA a pair of ``torch.cuda.Event(enable_timing=True)``
  recorded on the current stream at the edges, read with ``elapsed_time`` only when the times are asked for
  (:meth:`pop` at a log step): the device time between the edges, with no host sync inside a step, so ZeRO-3's
  all-gathers and reduce-scatters keep overlapping with compute. Without CUDA it is the host wall-clock;
* ``sync=True`` (generation): ``torch.cuda.synchronize()`` at both edges, then wall-clock: exact per call, at the
  price of a sync per edge; for code outside the training step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

_FOLD_AT = 256  # pending event pairs before finished ones are folded in (a non-blocking query, no sync)


class PhaseTimer:
    """``with timer("phase"): ...`` adds the block's time to the phase; ``pop()`` returns the seconds per phase since
    the last ``pop()`` and clears them."""

    def __init__(self, sync: bool = False, events: bool = False):
        cuda = torch.cuda.is_available()
        self.events = events and cuda
        self.sync = sync and cuda and not self.events
        self.times: dict[str, float] = defaultdict(float)
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, phase: str):
        if self.events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((phase, start, end))
            if len(self.pending) >= _FOLD_AT:
                self._fold(block=False)
            return
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.times[phase] += time.perf_counter() - t0

    def _fold(self, block: bool) -> None:
        """Add the finished event pairs (all of them when ``block``: waits for the last) to the times."""
        if block and self.pending:
            self.pending[-1][2].synchronize()
        keep = []
        for phase, start, end in self.pending:
            if block or end.query():
                self.times[phase] += start.elapsed_time(end) / 1000.0
            else:
                keep.append((phase, start, end))
        self.pending = keep

    @property
    def seconds(self) -> dict[str, float]:
        self._fold(block=True)
        return dict(self.times)

    def pop(self) -> dict[str, float]:
        self._fold(block=True)
        out, self.times = dict(self.times), defaultdict(float)
        return out
