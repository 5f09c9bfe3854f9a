"""One job per run directory: the lock file, its holder line, refusal, stale takeover, release."""

import json
import os
import socket
import subprocess
import sys

import pytest

from engine.config import ConfigError
from engine.train.runlock import LOCK_NAME, RunDirBusyError, RunLock, hold


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_holder_and_refuses_a_second_job(tmp_path):
    lock = RunLock.acquire(tmp_path)
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["started"]
    with pytest.raises(RunDirBusyError, match=f"is in use by another job \\(host .* pid {os.getpid()} started"):
        RunLock.acquire(tmp_path)  # a second open file description: flock refuses it, as it would another process
    assert issubclass(RunDirBusyError, ConfigError)  # launchers print it as one line
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock.acquire(tmp_path).release()  # free again


def test_a_lock_held_by_another_process_is_refused(tmp_path):
    code = (
        "import sys, time; from engine.train.runlock import RunLock; "
        f"RunLock.acquire({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=f"pid {child.pid} "), hold(tmp_path):
            pass
    finally:
        child.kill()
        child.wait()
    with hold(tmp_path) as lock:  # the kernel released the flock of the killed holder: its file is stale
        assert lock.took_over["pid"] == child.pid


def test_a_live_pid_in_the_file_is_refused_even_when_flock_is_granted(tmp_path):
    """Where flock does not reach (some shared filesystems), the pid check still guards this host's jobs."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": socket.gethostname(), "pid": sleeper.pid, "started": "earlier"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(record) + "\n")
        with pytest.raises(RunDirBusyError, match=f"pid {sleeper.pid} started earlier, alive"):
            RunLock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "x"}) + "\n")
    with hold(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"took over the stale lock of {tmp_path} (host" in err and f"pid {pid}" in err
    assert not (tmp_path / LOCK_NAME).exists()
