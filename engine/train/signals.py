"""Stopping a training job by signal without losing its work, and workers that do not outlive their launcher.

SIGTERM (what schedulers send some time before SIGKILL; torchrun forwards its own SIGTERM and SIGINT to every worker)
and SIGINT (Ctrl-C) only set a flag while the loop runs. At every step boundary the ranks agree on it with one 1-element
all-reduce (MAX of the signal number, 0 for none), so a signal that reached one rank only stops every rank at the same
step. The loop then saves a checkpoint (unless it just saved one at that step) and stops with :class:`Interrupted`: rank
0's launcher prints one line naming the checkpoint, and every rank exits with 128 + the signal number. Further signals
are ignored from the first one to the exit (Ctrl-C under torchrun delivers SIGINT twice, from the terminal and from
torchrun; torchrun sends SIGTERM to the ranks still running when one has exited), so that the save and the report are
not cut short; SIGKILL still ends the job at once, and a checkpoint save that is cut short is removed by the next run.
Outside the step loop (building, resuming, the final samples and export) the handlers the process had before apply.

Cost: the all-reduce runs on the hosts (a gloo group of host tensors, ``dist.host_max``), so it never waits for a
device stream: no host-device synchronization, only the ranks' hosts meeting once per step over 8 bytes. Hosts run
ahead of their devices, so this does not stall the devices.

:func:`engine.train.orphans.die_with_parent` makes a worker started by a launcher get SIGKILL when its launcher
dies, so that killing the launcher with SIGKILL leaves no worker training on.
"""

from __future__ import annotations

import os
import signal
import threading

from engine.train import dist
from engine.train.errors import TrainingStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(TrainingStopped):
    """The job was asked to stop by a signal and saved a checkpoint at a step boundary."""

    label = "stopped"

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.exit_code = 128 + signum
        self.shown = dist.is_main()


class StopOnSignal:
    """``install()`` the handlers, ``requested()`` at each step boundary (collective), ``restore()`` when done."""

    def __init__(self):
        self.signum: int | None = None
        self.stopping = False  # acted on: signals stay ignored until the process exits
        self._previous: dict[int, object] = {}

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum  # acted on at the next step boundary; later signals are ignored

    def requested(self) -> int:
        """Collective: 0, or the signal to stop for when any rank received one (the same number on every rank)."""
        signum = dist.host_max(self.signum or 0)  # on the hosts (gloo): no device sync
        if signum and self._previous:  # from here to the exit (also the interpreter's teardown) signals are ignored
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        self.stopping = signum > 0
        return signum

    def restore(self, redeliver: bool = False) -> None:
        """Put the previous handlers back; with ``redeliver``, a signal that came too late for the last step boundary
        is sent again, to them. Nothing changes once a stop is under way."""
        if self.stopping:
            return
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
        if redeliver and self.signum is not None:
            signum, self.signum = self.signum, None
            os.kill(os.getpid(), signum)


def name(signum: int) -> str:
    return signal.Signals(signum).name
