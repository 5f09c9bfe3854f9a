"""Reading ``.pt`` files that may come from someone else: nothing read from disk runs code.

``torch.load`` unpickles, and a pickle can call any function while it loads (``__reduce__``). Every ``.pt`` file the
engine reads goes through :func:`load`: ``torch.load(weights_only=True)``, which rebuilds tensors, containers and
numbers only and refuses anything else, plus a short list of classes a caller names (``allow``). DeepSpeed reads
its own checkpoint files with ``weights_only=False`` (``engine.load_checkpoint`` and ``zero_to_fp32``); inside
:func:`deepspeed_loads` every ``torch.load`` is :func:`load` with the classes DeepSpeed's states hold
(:func:`deepspeed_classes`: its loss scaler, the ZeRO stage enum, its parameter-fragment address; plain data
classes, rebuilt from their fields). A file holding anything else is refused with :class:`UnsafeFileError`, one line
naming the file and what it holds, before any of it is used.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


class UnsafeFileError(Exception):
    """A ``.pt`` file holds objects other than tensors and plain data (it could run code when unpickled)."""


def deepspeed_classes() -> list[type]:
    """The classes DeepSpeed's checkpoint files hold besides tensors and plain data (DeepSpeed 0.19)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _what(exc: Exception) -> str:
    """The unpickler's reason from torch's several-paragraph message (``Unsupported global: GLOBAL posix.system``,
    ``Trying to load unsupported GLOBAL ...``): its own line, else the first paragraph that is not general advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if found:
        reason = found.group(1).split(" was not an allowed global")[0]
    else:
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        advice = ("Weights only load failed", "Check the documentation")
        reason = next((p for p in paragraphs if not p.startswith(advice)), paragraphs[0] if paragraphs else "?")
    return reason.splitlines()[0].strip().rstrip(".")[:200]


def load(f: str | Path, *, allow: Sequence[type] = (), _torch_load=None, **kwargs):
    """``torch.load(f, weights_only=True, **kwargs)`` with the classes ``allow`` besides tensors and plain data;
    raises :class:`UnsafeFileError` naming ``f`` when the file holds anything else."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return (_torch_load or torch.load)(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{f}: refused to load: it holds more than tensors and plain data ({_what(exc)}); unpickling it "
            "could run code (use checkpoints from sources you trust)"
        ) from None


@contextlib.contextmanager
def deepspeed_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block (DeepSpeed's checkpoint loading, ``zero_to_fp32``) is weights-only with
    :func:`deepspeed_classes` allowed."""
    original, allow = torch.load, deepspeed_classes()

    def weights_only_load(f, *args, **kwargs):
        if args:  # torch.load(f, map_location, pickle_module, ...): only map_location is meaningful here
            kwargs.setdefault("map_location", args[0])
        return load(f, allow=allow, _torch_load=original, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


def inside(root: str | Path, name: str, what: str) -> Path:
    """``root / name`` for a file name read from a file (an index, a manifest): refused with ValueError unless it stays
    inside ``root`` (no absolute path, no ``..`` out of it, no link out of it)."""
    root = Path(root)
    path = root / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{what}: {name!r} is not a file inside {root}")
    return path
