"""Why a training job stopped on its own: each is reported by the launchers as one line and a non-zero exit."""

from __future__ import annotations

import sys


class TrainingStopped(RuntimeError):
    """A job that cannot go on without losing or corrupting work (checkpoints, non-finite values)."""

    exit_code = 1
    label = "error"
    shown = True
    """Whether this process prints the line (a stop every rank takes alike is printed by rank 0 only)."""


def report(prog: str, exc: TrainingStopped) -> int:
    """The launchers' answer to a stopped job: one line on stderr, and the exit status."""
    if exc.shown:
        print(f"{prog}: {exc.label}: {exc}", file=sys.stderr)
    return exc.exit_code
