"""Atomic file writes whose result honours the umask.

A file that exists is complete: it is written under a unique temporary name in its directory and renamed over the
target. ``tempfile.mkstemp`` creates that temporary file 0600 and safetensors' ``save_file`` forces 0600 even on a
file that exists, and the rename keeps the mode: without :func:`fix_mode`, checkpoints, caches and exports would be
private to their owner whatever the umask says. Here the file ends ``0o666 & ~umask`` (0644 under umask 022, 0600
under 077), like any file ``open(path, "w")`` creates.

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))    # any writer that takes a path
    atomic_write_text(path, json.dumps(index))
    atomic_write_bytes(path, data)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional


def current_umask() -> int:
    """This process's umask, read without changing it where /proc allows (os.umask can only set it, which would
    briefly give other threads a 0 umask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def fix_mode(path: str | os.PathLike) -> None:
    """Give ``path`` (a file made by mkstemp, safetensors, ...) the mode a plain ``open`` would have given it."""
    os.chmod(path, default_file_mode())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; when the block succeeds it gets the umask's mode and replaces
    ``path``, when it raises it is removed. The temporary name (``<name>.<random>.tmp``) is unique per writer, so
    ranks writing the same file at once never write into each other's file; the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fix_mode(tmp)  # after the writer: safetensors resets an existing file to 0600
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any], *, fsync: bool = False) -> Path:
    """``write_fn(tmp_path)`` writes the content (``torch.save``, safetensors ``save_file``, an encoder...); the
    result replaces ``path`` atomically with the umask's mode. Returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        write_fn(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(
    path: str | os.PathLike,
    text: str,
    *,
    encoding: str = "utf-8",
    errors: Optional[str] = None,
    fsync: bool = False,
) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding=encoding, errors=errors) as f:
            f.write(text)

    return atomic_write(path, write, fsync=fsync)
