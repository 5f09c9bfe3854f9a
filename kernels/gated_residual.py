"""Gated residual add ``x + y * gate`` (Wan2.1 self-attention and FFN outputs).

Layers of this file, top to bottom: the pure-torch reference (the DiT's unfused path and the numerical ground truth);
the Triton kernels (forward: read x and y, write out; backward: read d out and y, write d y and per-program partial
sums of d gate; d x is d out itself, no copy); the launchers; the registered custom ops and the autograd.Function;
the public `gated_residual`, which dispatches (kernels/_dispatch.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import launch, row_block, split_rows, use_triton
from kernels._rounding import store_rounded


# ----------------------------------------------------------------------------------------------------- reference ---
def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate computed in fp32, returned in x.dtype.

    x, y: (B, N, D) same dtype. gate: (B, 1, D) fp32.
    """
    return (x.float() + y.float() * gate).to(x.dtype)


# -------------------------------------------------------------------------------------------------------- kernels ---
@triton.jit
def _gated_fwd_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    n_tokens,
    n_cols,
    stride_gate,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A tile of BLOCK_R rows of batch b. x, y, out: (B * N, D); gate row at b * stride_gate."""
    b = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < n_cols
    mask = (tokens < n_tokens)[:, None] & mask_d[None, :]
    idx = (b.to(tl.int64) * n_tokens + tokens)[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate + cols, mask=mask_d, other=0.0).to(tl.float32)
    store_rounded(out_ptr + idx, (x + y * gate[None, :]), mask)


@triton.jit
def _gated_bwd_kernel(
    dout_ptr,
    y_ptr,
    gate_ptr,
    dy_ptr,
    dgate_ptr,
    n_tokens,
    n_cols,
    stride_gate,
    rows_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [start, start + rows_per_program) of batch b: dy = dout * gate, and a partial row of d gate = sum dout * y.

    dgate partials: (B * programs, D) fp32.
    """
    chunk, b = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < n_cols
    gate = tl.load(gate_ptr + b * stride_gate + cols, mask=mask_d, other=0.0).to(tl.float32)
    dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = chunk * rows_per_program
    end = tl.minimum(start + rows_per_program, n_tokens)
    for t0 in range(start, end, BLOCK_R):
        tokens = t0 + tl.arange(0, BLOCK_R)
        mask = (tokens < end)[:, None] & mask_d[None, :]
        idx = (b.to(tl.int64) * n_tokens + tokens)[:, None] * n_cols + cols[None, :]
        dout = tl.load(dout_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        store_rounded(dy_ptr + idx, (dout * gate[None, :]), mask)
        dgate += tl.sum(dout * y, axis=0)
    partial = (b * tl.num_programs(0) + chunk).to(tl.int64) * n_cols + cols
    tl.store(dgate_ptr + partial, dgate, mask=mask_d)


# ------------------------------------------------------------------------------------------------------ launchers ---
def _check_shapes(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"gated_residual expects x and y (B, N, D), got {tuple(x.shape)}, {tuple(y.shape)}")
    if tuple(gate.shape) != (x.shape[0], 1, x.shape[2]):
        raise ValueError(f"gate must be {(x.shape[0], 1, x.shape[2])} for x {tuple(x.shape)}, got {tuple(gate.shape)}")


def _gate(gate: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) with unit stride along D; a chunk of the (B, 6, D) modulation keeps its batch stride (no copy)."""
    return gate if gate.stride(-1) == 1 else gate.contiguous()


def _forward(x, y, gate):
    batch, n_tokens, n_cols = x.shape
    x, y, gate = x.contiguous(), y.contiguous(), _gate(gate)
    out = torch.empty_like(x)
    block_r, block_d = row_block(n_cols)
    grid = (triton.cdiv(n_tokens, block_r), batch)
    args = (x, y, gate, out, n_tokens, n_cols, gate.stride(0))
    launch(
        _gated_fwd_kernel,
        grid,
        args,
        {"BLOCK_R": block_r, "BLOCK_D": block_d},
        tune_key=("n_cols",),
        tile=("BLOCK_R", "BLOCK_D"),
    )
    return out


def _backward(dout, y, gate):
    batch, n_tokens, n_cols = y.shape
    dout, y, gate = dout.contiguous(), y.contiguous(), _gate(gate)
    block_r, block_d = row_block(n_cols)
    programs, rows_per_program = split_rows(n_tokens, block_r, batch, y.device)
    dy = torch.empty_like(y)
    dgate = torch.empty(batch, programs, n_cols, device=y.device, dtype=torch.float32)  # partial sums
    args = (dout, y, gate, dy, dgate, n_tokens, n_cols, gate.stride(0), rows_per_program)
    launch(
        _gated_bwd_kernel,
        (programs, batch),
        args,
        {"BLOCK_R": block_r, "BLOCK_D": block_d},
        tune_key=("n_cols",),
        tile=("BLOCK_R", "BLOCK_D", 3),  # x and dy, and their reductions: 64 elements a thread spilled 8-16 B on sm_90
    )
    return dy, dgate.sum(1, keepdim=True)  # (B, N, D), (B, 1, D)


# ------------------------------------------------------------------------------------- custom ops and autograd ---
@torch.library.custom_op("vidistill::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate: (B, N, D) in x.dtype."""
    return _forward(x, y, gate)


@_gated_residual_fwd.register_fake
def _(x, y, gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("vidistill::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dy (B, N, D) in y.dtype and d gate (B, 1, D) fp32."""
    return _backward(dout, y, gate)


@_gated_residual_bwd.register_fake
def _(dout, y, gate):
    dgate = y.new_empty((y.shape[0], 1, y.shape[2]), dtype=torch.float32)
    return torch.empty_like(y, memory_format=torch.contiguous_format), dgate


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        return torch.ops.vidistill.gated_residual_fwd(x, y, gate)

    @staticmethod
    def backward(ctx, dout):
        y, gate = ctx.saved_tensors
        dy, dgate = torch.ops.vidistill.gated_residual_bwd(dout, y, gate)
        return dout, dy, dgate.to(gate.dtype)  # d x = d out: the residual path passes the gradient through


# --------------------------------------------------------------------------------------------------------- public ---
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate: fp32 math, output in x.dtype.

    x, y: (B, N, D), float dtypes (y may differ from x, e.g. a bf16 branch into an fp32 residual stream).
    gate: (B, 1, D), normally fp32. Returns (B, N, D) in x.dtype.
    Triton on CUDA tensors (or when forced by VIDISTILL_KERNELS=triton), the reference otherwise.
    """
    if use_triton(x, y, gate):
        _check_shapes(x, y, gate)
        return _GatedResidual.apply(x, y, gate)
    return gated_residual_reference(x, y, gate)
