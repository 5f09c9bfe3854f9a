"""adaLN modulation: LayerNorm without affine followed by ``x * (1 + scale) + shift`` (Wan2.1 blocks and head).

Layers of this file, top to bottom: the pure-torch reference (the DiT's unfused path and the numerical ground truth);
the Triton kernels (forward: one read of x, one write of y, plus the per-row mean and rstd for backward; backward: one
read of x and dy, one write of dx, and per-program partial sums of d shift and d scale); the launchers; the registered
custom ops and the autograd.Function; the public `adaln_modulate`, which dispatches (kernels/_dispatch.py).

Unfused, the same math reads and writes x about five times (float cast, layer_norm, *, +, cast back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import launch, row_block, split_rows, use_triton
from kernels._rounding import store_rounded


# ----------------------------------------------------------------------------------------------------- reference ---
def adaln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, computed in fp32, returned in x.dtype.

    x: (B, N, D) any float dtype. shift, scale: (B, 1, D), fp32 (the modulation stays fp32, docs/wan.md#forward-pass).
    """
    xf = x.float()
    out = F.layer_norm(xf, (xf.shape[-1],), eps=eps) * (1 + scale) + shift
    return out.to(x.dtype)


# -------------------------------------------------------------------------------------------------------- kernels ---
@triton.jit
def _adaln_fwd_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    n_tokens,
    n_cols,
    stride_mod,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A tile of BLOCK_R whole rows of one batch element. x, y: (B * N, D); shift, scale rows at b * stride_mod."""
    b = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < n_cols
    mask = (tokens < n_tokens)[:, None] & mask_d[None, :]
    rows = b.to(tl.int64) * n_tokens + tokens  # (BLOCK_R,) global row index
    idx = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)  # biased variance, as F.layer_norm
    shift = tl.load(shift_ptr + b * stride_mod + cols, mask=mask_d, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_mod + cols, mask=mask_d, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    store_rounded(y_ptr + idx, y, mask)
    tl.store(mean_ptr + rows, mean, mask=tokens < n_tokens)
    tl.store(rstd_ptr + rows, rstd, mask=tokens < n_tokens)


@triton.jit
def _adaln_bwd_kernel(
    x_ptr,
    dy_ptr,
    scale_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dshift_ptr,
    dscale_ptr,
    n_tokens,
    n_cols,
    stride_mod,
    rows_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [start, start + rows_per_program) of batch b: writes dx, and one partial row of d shift and d scale.

    dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat)) with g = dy * (1 + scale); partials: (B * programs, D).
    """
    chunk, b = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < n_cols
    scale = tl.load(scale_ptr + b * stride_mod + cols, mask=mask_d, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = chunk * rows_per_program
    end = tl.minimum(start + rows_per_program, n_tokens)
    for t0 in range(start, end, BLOCK_R):
        tokens = t0 + tl.arange(0, BLOCK_R)
        mask_r = tokens < end
        mask = mask_r[:, None] & mask_d[None, :]
        rows = b.to(tl.int64) * n_tokens + tokens
        idx = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * (1.0 + scale[None, :])
        c_g = tl.sum(g, axis=1) / n_cols
        c_gx = tl.sum(g * xhat, axis=1) / n_cols
        dx = (g - c_g[:, None] - xhat * c_gx[:, None]) * rstd[:, None]
        store_rounded(dx_ptr + idx, dx, mask)
        dshift += tl.sum(dy, axis=0)
        dscale += tl.sum(dy * xhat, axis=0)
    partial = (b * tl.num_programs(0) + chunk).to(tl.int64) * n_cols + cols
    tl.store(dshift_ptr + partial, dshift, mask=mask_d)
    tl.store(dscale_ptr + partial, dscale, mask=mask_d)


# ------------------------------------------------------------------------------------------------------ launchers ---
def _check_shapes(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"adaln_modulate expects x (B, N, D), got {tuple(x.shape)}")
    want = (x.shape[0], 1, x.shape[2])
    if tuple(shift.shape) != want or tuple(scale.shape) != want:
        raise ValueError(
            f"shift/scale must be {want} for x {tuple(x.shape)}, got {tuple(shift.shape)}, {tuple(scale.shape)}"
        )


def _modulation(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) with unit stride along D; a chunk of the (B, 6, D) modulation keeps its batch stride (no copy)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x, shift, scale, eps: float):
    batch, n_tokens, n_cols = x.shape
    x = x.contiguous()
    shift, scale = _modulation(shift), _modulation(scale)
    if shift.stride(0) != scale.stride(0):  # the kernel takes one batch stride for both
        shift, scale = shift.contiguous(), scale.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty(batch, n_tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_r, block_d = row_block(n_cols)
    grid = (triton.cdiv(n_tokens, block_r), batch)
    args = (x, shift, scale, y, mean, rstd, n_tokens, n_cols, shift.stride(0), eps)
    launch(
        _adaln_fwd_kernel,
        grid,
        args,
        {"BLOCK_R": block_r, "BLOCK_D": block_d},
        tune_key=("n_cols",),
        tile=("BLOCK_R", "BLOCK_D"),
    )
    return y, mean, rstd


def _backward(dy, x, scale, mean, rstd):
    batch, n_tokens, n_cols = x.shape
    dy, x, scale = dy.contiguous(), x.contiguous(), _modulation(scale)
    block_r, block_d = row_block(n_cols)
    programs, rows_per_program = split_rows(n_tokens, block_r, batch, x.device)
    dx = torch.empty_like(x)
    dshift = torch.empty(batch, programs, n_cols, device=x.device, dtype=torch.float32)  # partial sums
    dscale = torch.empty_like(dshift)
    args = (x, dy, scale, mean, rstd, dx, dshift, dscale, n_tokens, n_cols, scale.stride(0), rows_per_program)
    launch(
        _adaln_bwd_kernel,
        (programs, batch),
        args,
        {"BLOCK_R": block_r, "BLOCK_D": block_d},
        tune_key=("n_cols",),
        tile=("BLOCK_R", "BLOCK_D", 3),  # x and dy, and their reductions: 64 elements a thread spilled 8-16 B on sm_90
    )
    return dx, dshift.sum(1, keepdim=True), dscale.sum(1, keepdim=True)  # (B, N, D), (B, 1, D), (B, 1, D)


# ------------------------------------------------------------------------------------- custom ops and autograd ---
@torch.library.custom_op("vidistill::adaln_fwd", mutates_args=())
def _adaln_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y (B, N, D) in x.dtype and the fp32 row statistics mean, rstd (B, N) for the backward."""
    return _forward(x, shift, scale, eps)


@_adaln_fwd.register_fake
def _(x, shift, scale, eps):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("vidistill::adaln_bwd", mutates_args=())
def _adaln_bwd(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (B, N, D) in x.dtype, d shift and d scale (B, 1, D) fp32."""
    return _backward(dy, x, scale, mean, rstd)


@_adaln_bwd.register_fake
def _(dy, x, scale, mean, rstd):
    dmod = x.new_empty((x.shape[0], 1, x.shape[2]), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dmod, torch.empty_like(dmod)


class _AdaLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = torch.ops.vidistill.adaln_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.mod_dtypes = (shift.dtype, scale.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.vidistill.adaln_bwd(dy, x, scale, mean, rstd)
        return dx, dshift.to(ctx.mod_dtypes[0]), dscale.to(ctx.mod_dtypes[1]), None


# --------------------------------------------------------------------------------------------------------- public ---
def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) (no affine) * (1 + scale) + shift: fp32 math, output in x.dtype.

    x: (B, N, D) any float dtype. shift, scale: (B, 1, D), normally fp32. Returns (B, N, D).
    Triton on CUDA tensors (or when forced by VIDISTILL_KERNELS=triton), the reference otherwise.
    """
    if use_triton(x, shift, scale):
        _check_shapes(x, shift, scale)
        return _AdaLN.apply(x, shift, scale, eps)
    return adaln_modulate_reference(x, shift, scale, eps)
