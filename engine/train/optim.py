"""The trained roles' AdamW, on the device or, with ``deepspeed.offload_optimizer``, DeepSpeed's CPU Adam.

ZeRO-Offload keeps the optimizer states (and the fp32 master weights) in CPU memory and steps them there. DeepSpeed
0.19 refuses a client ``torch.optim.AdamW`` for it (``ZeRORuntimeException`` at ``deepspeed.initialize``: a
PyTorch optimizer stepping on the CPU is slow); it wants its own ``DeepSpeedCPUAdam``, a C++ op (``cpu_adam``,
vectorised with AVX) that the install builds with ``DS_BUILD_CPU_ADAM=1`` or that DeepSpeed compiles just in time on
first use with the host's C++ compiler and ninja (about 45 s on this project's CPU machine, then cached under
``~/.cache/torch_extensions``). :func:`check_offload` makes sure of that before any model is built, so a machine
that cannot build it refuses the config key instead of failing after minutes of model loading.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from engine.config import ConfigError

KEY = "deepspeed.offload_optimizer"
STALE_BUILD_LOCK_S = 600  # a just-in-time build takes about a minute; a lock this old is a build that was killed


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:200]


def load_cpu_adam() -> Any:
    """DeepSpeed's ``cpu_adam`` op (prebuilt, or compiled now); ConfigError naming the key when it cannot be had."""
    from deepspeed.ops.op_builder import CPUAdamBuilder  # the class DeepSpeedCPUAdam loads (per accelerator)

    builder = CPUAdamBuilder()
    if not builder.is_compatible(verbose=False):
        raise ConfigError(f"config key `{KEY}`: DeepSpeed's CPU Adam (cpu_adam op) is not supported on this machine")
    check_build_lock(builder.name)
    try:
        return builder.load(verbose=False)
    except Exception as exc:  # a missing compiler or ninja, a failed compile: all say the same to the user
        raise ConfigError(
            f"config key `{KEY}`: DeepSpeed's CPU Adam (cpu_adam op) neither is installed nor builds here "
            f"({_first_line(exc)}); reinstall deepspeed with DS_BUILD_CPU_ADAM=1, or set it to false"
        ) from exc


def check_build_lock(name: str, now: float | None = None) -> None:
    """torch's just-in-time build waits, without end or message, while another build's ``lock`` file exists; a build
    that was killed (Ctrl-C during the first offloaded run) leaves it behind. Such a lock, with no built library
    beside it, is an error naming the file instead of a silent hang."""
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory(name, verbose=False))
    lock = build / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_S and not (build / f"{name}.so").exists():
        raise ConfigError(
            f"config key `{KEY}`: {lock} is {age / 60:.0f} min old: an interrupted build of DeepSpeed's CPU Adam; "
            "if no other job is building it, remove that file and run again"
        )


def check_offload(cfg: Any, zero_stage: int | None = None) -> None:
    """Config-time check of optimizer offload: ZeRO stage 1-3 and a loadable CPU Adam (no-op when it is off)."""
    if not cfg.deepspeed.offload_optimizer:
        return
    stage = cfg.deepspeed.zero_stage if zero_stage is None else zero_stage
    if stage < 1:
        raise ConfigError(f"config key `{KEY}`: needs deepspeed.zero_stage 1, 2 or 3 (ZeRO-Offload), got {stage}")
    load_cpu_adam()


def adamw(
    params: Iterable[torch.nn.Parameter], optim_cfg: Any, lr: float, *, offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW with ``optim``'s betas, eps and weight decay: ``torch.optim.AdamW``, or DeepSpeed's CPU Adam in its
    AdamW mode (decoupled weight decay, the same update) when the optimizer is offloaded."""
    kw = dict(lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(list(params), adamw_mode=True, **kw)
    return torch.optim.AdamW(params, **kw)
