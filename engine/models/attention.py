"""One attention function over several kernels: flash-attn 3, flash-attn 2, xformers, torch SDPA.

``auto`` picks the fastest backend that is importable and supports the tensors (CUDA and fp16/bf16 for the
flash/xformers kernels); CPU always uses SDPA. A backend named explicitly but unusable is an error, not a silent
fallback: a user who asked for flash3 on an H100 wants to know it did not load.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

BACKENDS = ("flash3", "flash2", "xformers", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


_LOADED: dict[str, object] = {}
"""Backend -> its imported kernel module, or None when not installed: filled on first use, outside any compiled
region (``WanModel.forward`` resolves its backend before the blocks run), so a compiled block reads a dict and never
imports."""


def _module(backend: str):
    """The imported kernel module of a backend, or None when it is not installed."""
    if backend not in _LOADED:
        name = {"flash3": "flash_attn_interface", "flash2": "flash_attn", "xformers": "xformers.ops"}.get(backend)
        try:
            _LOADED[backend] = None if name is None else importlib.import_module(name)
        except Exception:  # ImportError, or a CUDA-only extension failing to load
            _LOADED[backend] = None
    return _LOADED[backend]


def available_backends() -> list[str]:
    """Backends importable on this machine (SDPA always is)."""
    return [b for b in BACKENDS if b == "sdpa" or _module(b) is not None]


def _supports(backend: str, q: torch.Tensor) -> bool:
    if backend == "sdpa":
        return True
    if _module(backend) is None or not q.is_cuda or q.dtype not in _HALF:
        return False
    if backend == "flash3":  # Hopper only: FA3 builds target sm_90, neither Ampere (8.x) nor Blackwell (10.x, 12.x)
        return torch.cuda.get_device_capability(q.device)[0] == 9
    return True


def resolve_backend(requested: str, q: torch.Tensor) -> str:
    """The backend that will run for these tensors; raises if an explicit request cannot be honoured."""
    if requested == "auto":
        return next(b for b in BACKENDS if _supports(b, q))
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from auto, {', '.join(BACKENDS)}")
    if not _supports(requested, q):
        why = "is not installed" if _module(requested) is None else "needs CUDA fp16/bf16 tensors (sm90 for flash3)"
        raise RuntimeError(f"attention backend {requested!r} {why}; got {q.device} {q.dtype}")
    return requested


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", valid: int | None = None
) -> torch.Tensor:
    """Non-causal softmax attention with scale 1/sqrt(Dh).

    q: (B, Nq, H, Dh); k, v: (B, Nk, H, Dh). Returns (B, Nq, H, Dh) in q.dtype. Sequence lengths are whatever the
    tensors hold: no mask (every sample in a batch has the same latent shape). ``valid``: only the first ``valid``
    tokens are real (q and k the same sequence, padded at its end to split evenly across sequence-parallel ranks):
    the padding keys are cut off before the kernel, so no query attends to them (a key mask that every backend
    honours, at no cost), and the padding queries' outputs are zeros.
    """
    if valid is not None and valid < q.shape[1]:
        out = _attend(q[:, :valid], k[:, :valid], v[:, :valid], backend)
        return torch.cat([out, out.new_zeros(out.shape[0], q.shape[1] - valid, *out.shape[2:])], dim=1)
    return _attend(q, k, v, backend)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    name = resolve_backend(backend, q)
    if name == "flash3":
        out = _module("flash3").flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if name == "flash2":
        return _module("flash2").flash_attn_func(q, k, v)
    if name == "xformers":
        return _module("xformers").memory_efficient_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, Nq, Dh)
    return out.transpose(1, 2)
