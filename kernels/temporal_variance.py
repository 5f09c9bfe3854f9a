"""Temporal variance and the truncated temporal regularization loss (docs/method.md#temporal-regularization, Eq. 8).

    v    = mean over (B, C, H, W) of Var_F(x)          population variance over the frame axis of (B, C, F, H, W)
    loss = -log((v + eps) ^ power)   if that is >= tau, else 0 (value and gradient)

Layers of this file, top to bottom: the pure-torch reference; the Triton kernels (one pass over the latents that
writes a per-program partial sum, a one-program finalize that sums the partials in a fixed order and applies the
truncation on device, a backward that writes d loss / dx directly); the launchers; the registered custom ops and the
autograd.Function; the public `temporal_loss`, which dispatches (kernels/_dispatch.py).

Nothing here synchronizes with the host: the truncation is a device-side select, and the backward reads the
incoming gradient, v and the keep flag from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import launch, use_triton
from kernels._rounding import store_rounded

# Frames held in registers per chunk. Latents have F <= 21 (81 video frames), one chunk; longer clips loop and merge
# chunks with Chan's parallel-variance update, so any F works in one read of x.
_MAX_BLOCK_F = 32
_TILE_ELEMS = 4096  # elements of the (BLOCK_F, BLOCK_S) tile held by one program
_FINALIZE_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------- reference ---
def temporal_variance_reference(
    x: torch.Tensor, eps: float, power: float, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated temporal loss and the mean temporal variance, both 0-d fp32 tensors.

    x: (B, C, F, H, W) any float dtype; the statistics are computed in fp32. The gradient reaches x through `loss`
    only (`v` is returned detached). Below tau the loss is 0 with zero gradient, chosen by torch.where on device.
    """
    _check_input(x)
    v = x.float().var(dim=2, unbiased=False).mean()  # population variance over F, mean over (B, C, H, W)
    loss = -torch.log((v + eps) ** power)
    loss = torch.where(loss >= tau, loss, torch.zeros_like(loss))
    return loss, v.detach()


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5 or not x.is_floating_point():
        raise ValueError(f"temporal loss expects float latents (B, C, F, H, W), got {tuple(x.shape)} {x.dtype}")


# -------------------------------------------------------------------------------------------------------- kernels ---
@triton.jit
def _variance_partial_kernel(
    x_ptr, partial_ptr, n_frames, n_space, n_sblocks, BLOCK_F: tl.constexpr, BLOCK_S: tl.constexpr
):
    """One (row, spatial block): sum over its BLOCK_S positions of the population variance over frames.

    x: (R, F, S) contiguous with R = B * C, S = H * W. partial: (R * n_sblocks,) fp32.
    """
    pid = tl.program_id(0)
    row, sblock = pid // n_sblocks, pid % n_sblocks
    offs_s = sblock * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < n_space
    base = x_ptr + row.to(tl.int64) * n_frames * n_space
    mean = tl.zeros([BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S], dtype=tl.float32)
    for f0 in range(0, n_frames, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask = (offs_f < n_frames)[:, None] & mask_s[None, :]
        x = tl.load(base + offs_f[:, None] * n_space + offs_s[None, :], mask=mask, other=0.0).to(tl.float32)
        n_a = f0 * 1.0  # frames merged so far
        n_b = tl.minimum(n_frames - f0, BLOCK_F) * 1.0  # frames in this chunk
        mean_b = tl.sum(x, axis=0) / n_b
        centered = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(centered * centered, axis=0)
        # Chan et al. merge of (n_a, mean, m2) with (n_b, mean_b, m2_b): stable, one read of x.
        delta = mean_b - mean
        n_ab = n_a + n_b
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta * delta * (n_a * n_b / n_ab)
    var = tl.where(mask_s, m2 / (n_frames * 1.0), 0.0)
    tl.store(partial_ptr + pid, tl.sum(var, axis=0))


@triton.jit
def _finalize_kernel(
    partial_ptr, n_partials, loss_ptr, v_ptr, keep_ptr, inv_count, eps, power, tau, BLOCK: tl.constexpr
):
    """Sum the partials in a fixed order (deterministic), then v, the loss and the truncation, all on device."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
    v = tl.sum(acc, axis=0) * inv_count
    loss = -power * tl.log(v + eps)  # = -log((v + eps)^power), v + eps > 0
    keep = loss >= tau
    tl.store(v_ptr, v)
    tl.store(loss_ptr, tl.where(keep, loss, 0.0))
    tl.store(keep_ptr, keep.to(tl.float32))


@triton.jit
def _backward_kernel(
    x_ptr,
    dx_ptr,
    grad_loss_ptr,
    v_ptr,
    keep_ptr,
    n_frames,
    n_space,
    n_sblocks,
    inv_count,
    eps,
    power,
    BLOCK_F: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """dx = g * keep * (-power / (v + eps)) * 2 / (F * count) * (x - mean_F(x)), the centering done in registers.

    x, dx: (R, F, S) contiguous. grad_loss, v, keep: 0-d fp32 on device (no host round trip).
    """
    pid = tl.program_id(0)
    row, sblock = pid // n_sblocks, pid % n_sblocks
    offs_s = sblock * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < n_space
    offset = row.to(tl.int64) * n_frames * n_space
    inv_f = 1.0 / (n_frames * 1.0)
    g = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(keep_ptr)
    coef = g * (-power / (tl.load(v_ptr) + eps)) * 2.0 * inv_f * inv_count
    if ONE_CHUNK:  # every frame fits in the tile: read x once
        offs_f = tl.arange(0, BLOCK_F)
        mask = (offs_f < n_frames)[:, None] & mask_s[None, :]
        idx = offset + offs_f[:, None] * n_space + offs_s[None, :]
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) * inv_f
        store_rounded(dx_ptr + idx, (coef * (x - mean[None, :])), mask)
    else:  # long clips: one pass for the mean, one for the gradient
        total = tl.zeros([BLOCK_S], dtype=tl.float32)
        for f0 in range(0, n_frames, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask = (offs_f < n_frames)[:, None] & mask_s[None, :]
            idx = offset + offs_f[:, None] * n_space + offs_s[None, :]
            total += tl.sum(tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32), axis=0)
        mean = total * inv_f
        for f0 in range(0, n_frames, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask = (offs_f < n_frames)[:, None] & mask_s[None, :]
            idx = offset + offs_f[:, None] * n_space + offs_s[None, :]
            x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            store_rounded(dx_ptr + idx, (coef * (x - mean[None, :])), mask)


# ------------------------------------------------------------------------------------------------------ launchers ---
def _blocks(n_frames: int, n_space: int) -> tuple[int, int, int]:
    """(BLOCK_F, BLOCK_S, number of spatial blocks) for x viewed as (R, F, S)."""
    block_f = min(triton.next_power_of_2(n_frames), _MAX_BLOCK_F)
    block_s = min(triton.next_power_of_2(n_space), max(16, _TILE_ELEMS // block_f))
    return block_f, block_s, triton.cdiv(n_space, block_s)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = x.shape
    return x.contiguous().view(b * c, f, h * w)  # (R, F, S)


def _forward(x: torch.Tensor, eps: float, power: float, tau: float) -> tuple[torch.Tensor, ...]:
    xr = _as_rows(x)  # (R, F, S)
    n_rows, n_frames, n_space = xr.shape
    block_f, block_s, n_sblocks = _blocks(n_frames, n_space)
    partial = torch.empty(n_rows * n_sblocks, device=x.device, dtype=torch.float32)
    args = (xr, partial, n_frames, n_space, n_sblocks)
    constexprs = {"BLOCK_F": block_f, "BLOCK_S": block_s}
    launch(
        _variance_partial_kernel,
        (n_rows * n_sblocks,),
        args,
        constexprs,
        tune_key=("n_frames", "n_space"),
        tile=("BLOCK_F", "BLOCK_S"),
    )
    loss, v, keep = (torch.empty((), device=x.device, dtype=torch.float32) for _ in range(3))
    inv_count = 1.0 / (n_rows * n_space)
    _finalize_kernel[(1,)](partial, partial.numel(), loss, v, keep, inv_count, eps, power, tau, BLOCK=_FINALIZE_BLOCK)
    return loss, v, keep


def _backward(grad_loss, x, v, keep, eps: float, power: float) -> torch.Tensor:
    xr = _as_rows(x)  # (R, F, S)
    n_rows, n_frames, n_space = xr.shape
    block_f, block_s, n_sblocks = _blocks(n_frames, n_space)
    dx = torch.empty_like(xr)
    args = (xr, dx, grad_loss, v, keep, n_frames, n_space, n_sblocks, 1.0 / (n_rows * n_space), eps, power)
    constexprs = {"BLOCK_F": block_f, "BLOCK_S": block_s, "ONE_CHUNK": n_frames <= block_f}
    launch(
        _backward_kernel,
        (n_rows * n_sblocks,),
        args,
        constexprs,
        tune_key=("n_frames", "n_space"),
        tile=("BLOCK_F", "BLOCK_S"),
    )
    return dx.view(x.shape)  # (B, C, F, H, W)


# ------------------------------------------------------------------------------------- custom ops and autograd ---
@torch.library.custom_op("vidistill::temporal_loss_fwd", mutates_args=())
def _temporal_loss_fwd(
    x: torch.Tensor, eps: float, power: float, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, v, keep): 0-d fp32; keep is 1.0 where the loss is kept, 0.0 where truncated."""
    return _forward(x, eps, power, tau)


@_temporal_loss_fwd.register_fake
def _(x, eps, power, tau):
    return tuple(x.new_empty((), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("vidistill::temporal_loss_bwd", mutates_args=())
def _temporal_loss_bwd(
    grad_loss: torch.Tensor, x: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, eps: float, power: float
) -> torch.Tensor:
    """d loss / dx, shaped and typed like x (B, C, F, H, W)."""
    return _backward(grad_loss, x, v, keep, eps, power)


@_temporal_loss_bwd.register_fake
def _(grad_loss, x, v, keep, eps, power):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class _TemporalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, power, tau):
        loss, v, keep = torch.ops.vidistill.temporal_loss_fwd(x, eps, power, tau)
        ctx.save_for_backward(x, v, keep)
        ctx.eps, ctx.power = eps, power
        ctx.mark_non_differentiable(v)
        return loss, v

    @staticmethod
    def backward(ctx, grad_loss, grad_v):
        x, v, keep = ctx.saved_tensors
        dx = torch.ops.vidistill.temporal_loss_bwd(grad_loss.contiguous(), x, v, keep, ctx.eps, ctx.power)
        return dx, None, None, None


# --------------------------------------------------------------------------------------------------------- public ---
def temporal_loss(x: torch.Tensor, eps: float, power: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated temporal loss and mean temporal variance (same contract as `temporal_variance_reference`).

    x: (B, C, F, H, W) any float dtype. Returns (loss, v), 0-d fp32; gradients reach x through loss only.
    Triton on CUDA tensors (or when forced by VIDISTILL_KERNELS=triton), the reference otherwise.
    """
    _check_input(x)
    if use_triton(x):
        return _TemporalLoss.apply(x, eps, power, tau)
    return temporal_variance_reference(x, eps, power, tau)
