"""Process-group helpers: one place that knows whether we run distributed, and how ranks agree."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


def init(timeout_minutes: int = 30) -> None:
    """Join the process group started by `deepspeed` or `torchrun` (NCCL on CUDA, gloo on CPU); a lone process
    with no launcher becomes rank 0 of 1."""
    if dist.is_initialized():
        return
    from engine.train.orphans import die_with_parent

    die_with_parent()  # a worker started by torchrun/deepspeed dies with its launcher
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # no launcher: this process is the whole job and serves its own store; port 0 lets the kernel pick a free port
    # when the store binds (a port chosen beforehand can be taken by another job in between)
    os.environ.setdefault("MASTER_PORT", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
    atexit.register(_leave)  # also when the job ends by an exception or its caller never calls shutdown()
    if world_size() > 1:
        host_group()  # collective: created here, in the same order on every rank


def shutdown() -> None:
    """Leave the process group cleanly at the end of a job (every rank): the ranks meet, then every group's
    communication threads stop while the interpreter is still whole (see :func:`_leave`)."""
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()
    _leave()


def _leave() -> None:
    """Destroy every process group now. Registered with atexit by :func:`init`, so that it also runs when a job ends
    by an exception or its caller never calls :func:`shutdown`. No barrier: at exit the other ranks may be gone.
    Destroying does not stop gloo's native threads while DeepSpeed's engines and parameters still hold the groups
    (they do until interpreter teardown): :func:`exit_process` is how a worker ends without that teardown."""
    global _LAYOUT, _HOST_GROUP
    _LAYOUT = _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int | None) -> NoReturn:
    """End a worker process with ``code`` (None: 0) without interpreter teardown. The process groups are left, the
    thread-exit hooks run and the non-daemon threads are waited for (as the interpreter would), every atexit handler
    runs (logging and any writer still open are flushed), then the process exits at once. What interpreter teardown
    would do next, with gloo's worker and socket threads still running under groups DeepSpeed holds, made finished
    2-rank jobs die of SIGABRT now and then ("terminate called without an active exception") after their results
    were written. Call it from a script's ``__main__`` once its work is done."""
    _leave()
    if threading.current_thread() is threading.main_thread():
        threading._shutdown()  # what the interpreter does first: thread-exit hooks (executors), non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
            stream.flush()
    os._exit(int(code or 0))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns t."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_true(flag: bool | torch.Tensor, device: torch.device | str = "cpu") -> bool:
    """True when flag (a bool, or a bool tensor on the device: then one host sync in all) holds on every rank (one
    small collective)."""
    if isinstance(flag, torch.Tensor):
        t = flag.detach().reshape(1).to(device=device, dtype=torch.float32)
    else:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def all_max(value: float, device: torch.device | str = "cpu") -> float:
    """The largest ``value`` over ranks (one small collective)."""
    t = torch.tensor([float(value)], device=device)
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


_HOST_GROUP = None


def host_group():
    """A gloo group of every rank for control decisions on host values: its collectives never touch a device stream,
    so they cost no host-device synchronization (only the ranks' hosts meet). The default group when it is gloo."""
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _HOST_GROUP


def host_max(value: int) -> int:
    """The largest integer ``value`` over ranks, agreed on the hosts (:func:`host_group`): no device sync."""
    if not (dist.is_initialized() and world_size() > 1):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)  # a host tensor on every platform
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return int(t[0])


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on each), in rank order."""
    if not (dist.is_initialized() and world_size() > 1):
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not (dist.is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Sequence parallelism: the ranks split into groups of ``size`` consecutive ranks that share their samples
# ---------------------------------------------------------------------------------------------------------------------


class SequenceLayout:
    """Where this rank stands when ``parallel.sequence_parallel`` = ``size`` > 1: rank r is position ``r % size`` of
    sequence-parallel group ``r // size`` (consecutive ranks: on one node, where the all-to-alls are cheapest). The
    ranks of one group hold one sample's tokens between them, so they read the same batches and draw the same noise:
    the data-parallel rank is the group's index, the data-parallel world the number of groups. ``group`` is this
    rank's sequence-parallel process group, ``data_group`` the ranks at its position in every group (None: the whole
    world, or this rank alone)."""

    def __init__(self, size: int, group, data_group):
        self.size, self.group, self.data_group = size, group, data_group

    @property
    def rank(self) -> int:
        return rank() % self.size


_LAYOUT: SequenceLayout | None = None


def init_sequence_parallel(size: int) -> SequenceLayout | None:
    """Collective (every rank, after :func:`init`): create the groups of ``size`` (a divisor of the world size,
    checked by the caller naming the config key). 1 undoes any previous layout."""
    global _LAYOUT
    world = world_size()
    if size < 1 or world % size:
        raise ValueError(f"sequence-parallel size {size} does not divide the world size {world}")
    if size == 1:
        _LAYOUT = None
        return None
    if _LAYOUT is not None and _LAYOUT.size == size:
        return _LAYOUT
    mine = data_mine = None
    for g in range(world // size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(g * size, (g + 1) * size)))
        if rank() // size == g:
            mine = group
    if world // size > 1:
        for p in range(size):
            group = dist.new_group(list(range(p, world, size)))
            if rank() % size == p:
                data_mine = group
    _LAYOUT = SequenceLayout(size, mine, data_mine)
    return _LAYOUT


def sequence_layout() -> SequenceLayout | None:
    """The layout :func:`init_sequence_parallel` made, or None without sequence parallelism."""
    return _LAYOUT


def sequence_parallel_size() -> int:
    return 1 if _LAYOUT is None else _LAYOUT.size


def data_rank() -> int:
    """This rank's data-parallel index: which samples it reads (the same for every rank of a sequence-parallel
    group)."""
    return rank() // sequence_parallel_size()


def data_world_size() -> int:
    """Data-parallel ranks: the world size over the sequence-parallel degree."""
    return world_size() // sequence_parallel_size()


def is_data_leader() -> bool:
    """Position 0 of its sequence-parallel group (every rank without sequence parallelism): the rank that speaks for
    its group's samples (writes its videos)."""
    return rank() % sequence_parallel_size() == 0


def data_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over the data-parallel ranks (each sample counted once, not once per rank of its
    sequence-parallel group); returns t."""
    if not (dist.is_initialized() and data_world_size() > 1):
        return t
    group = None if _LAYOUT is None else _LAYOUT.data_group
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
