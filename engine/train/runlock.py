"""One job per run directory: ``<run_dir>/.lock``, taken by rank 0 when a job starts and released when it ends.

The lock is an ``fcntl.flock`` on the open file (released by the kernel however the process ends, also on SIGKILL),
and the file names its holder: ``{"host", "pid", "started"}`` on one line. A second job on the same directory is
refused with one line naming the holder. Where ``flock`` reaches every node (local disks, NFSv4, Lustre with
``-o flock``) that is all; as a second guard, a file left by a live process of this host is refused even when the
flock was granted. A file left by a process that is gone (same host, pid not alive), or by another host whose flock
is no longer held, is a stale lock: reported in one line and taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from engine.config import ConfigError
from engine.train import dist

LOCK_NAME = ".lock"


class RunDirBusyError(ConfigError):
    """Another job holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} started {holder.get('started', '?')}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {"host": "?", "pid": "?", "started": f"(unreadable lock file: {text[:60]!r})"}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """``RunLock.acquire(run_dir)`` or raise :class:`RunDirBusyError`; ``release()`` removes the file."""

    def __init__(self, path: Path, fd: int, took_over: dict | None):
        self.path, self.fd, self.took_over = path, fd, took_over

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        path = Path(run_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirBusyError(
                    f"config key `logging.run_dir`: {run_dir} is in use by another job ({_describe(holder)}; "
                    f"lock {path}): stop that job, or use another logging.run_dir"
                ) from None
            try:  # the holder may have released and removed the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = _read(fd)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        pid = holder.get("pid")
        if holder.get("host") == me["host"] and isinstance(pid, int) and pid != me["pid"] and _alive(pid):
            os.close(fd)
            raise RunDirBusyError(
                f"config key `logging.run_dir`: {run_dir} is in use by another job ({_describe(holder)}, alive; "
                f"lock {path}): stop that job, or use another logging.run_dir"
            )
        record = {**me, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(path, fd, holder or None)

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: a waiting job re-opens the path and finds a fresh file
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[RunLock | None]:
    """Collective when distributed: rank 0 takes the lock of ``run_dir`` for the body; every rank raises
    :class:`RunDirBusyError` when it is held elsewhere. Yields the lock on rank 0, None on the others."""
    lock, error = None, None
    if dist.is_main():
        try:
            lock = RunLock.acquire(run_dir)
        except RunDirBusyError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"config key `logging.run_dir`: cannot lock {Path(run_dir) / LOCK_NAME}: {exc}"
    error = dist.broadcast_object(error)
    if error is not None:
        raise RunDirBusyError(error)
    if lock is not None and lock.took_over:
        print(
            f"took over the stale lock of {run_dir} ({_describe(lock.took_over)}: no process holds it)",
            file=sys.stderr,
            flush=True,
        )
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
