"""Workers that do not outlive their launcher: :func:`die_with_parent` makes a worker started by torchrun or
DeepSpeed's launcher (:data:`LAUNCHER_ENV`) get SIGKILL when its launcher dies (Linux ``prctl(PR_SET_PDEATHSIG)``),
so that killing the launcher with SIGKILL leaves no worker training on beside a re-run."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_SIZE")
"""Set in a worker's environment by torchrun and by DeepSpeed's per-node launcher (``dist.init`` sets neither)."""


def die_with_parent() -> bool:
    """Ask the kernel for SIGKILL when the launcher that started this worker dies (Linux; a worker only: a process
    run by hand, e.g. under nohup, is left alone). Returns whether it is armed."""
    started_by_launcher = any(k in os.environ for k in LAUNCHER_ENV)
    if not started_by_launcher or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
    return True
