"""RMSNorm across heads + interleaved 3D RoPE, applied to the self-attention q and k of Wan2.1.

Layers of this file, top to bottom: the pure-torch reference (the DiT's unfused path and the numerical ground truth);
the Triton kernels (forward: one read of a row of q or k, one write of the rotated, normalized row, plus the per-row
rstd; backward: one read of x and dy, one write of dx, and per-program partial sums of d weight); the launchers; the
registered custom ops and the autograd.Function; the public `qk_norm_rope`, which dispatches (kernels/_dispatch.py).

The kernels see a row of D = H * Dh as D / 2 interleaved pairs (x[2p], x[2p + 1]); pair p rotates by the angle
(token, p mod Dh / 2). They load the even and the odd elements as two vectors: both loads touch the same cache lines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import launch, row_block, split_rows, use_triton
from kernels._rounding import store_rounded


# ----------------------------------------------------------------------------------------------------- reference ---
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times weight, returned in x.dtype. x: (..., D); weight: (D,)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) by the per-token angle j (view_as_complex convention).

    x: (B, N, H, Dh). cos, sin: (N, Dh // 2) fp32. Returns x.dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, N, H, Dh/2, 2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, N, 1, Dh/2)
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)  # (B, N, H, Dh/2, 2)
    return out.flatten(-2).to(x.dtype)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over all heads (D = H * Dh) with its weight, split into heads, apply RoPE.

    q, k: (B, N, D) projections. weight_q, weight_k: (D,). cos, sin: (N, Dh // 2) fp32.
    Returns q, k as (B, N, H, Dh) in the input dtype.
    """
    q = rms_norm_reference(q, weight_q, eps).unflatten(-1, (num_heads, -1))  # (B, N, H, Dh)
    k = rms_norm_reference(k, weight_k, eps).unflatten(-1, (num_heads, -1))  # (B, N, H, Dh)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)


# -------------------------------------------------------------------------------------------------------- kernels ---
@triton.jit
def _norm_rope_fwd_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    rstd_ptr,
    n_tokens,
    n_pairs,
    half_head,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """BLOCK_R whole rows of batch b. x, y: (B * N, D) with D = 2 * n_pairs; cos, sin: (N, half_head) fp32."""
    b = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_P)
    mask_r, mask_p = tokens < n_tokens, pairs < n_pairs
    mask = mask_r[:, None] & mask_p[None, :]
    rows = b.to(tl.int64) * n_tokens + tokens
    even = rows[:, None] * (2 * n_pairs) + 2 * pairs[None, :]  # offsets of x[2p]; x[2p + 1] is even + 1
    xe = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / (2 * n_pairs) + eps)
    we = tl.load(w_ptr + 2 * pairs, mask=mask_p, other=0.0).to(tl.float32)
    wo = tl.load(w_ptr + 2 * pairs + 1, mask=mask_p, other=0.0).to(tl.float32)
    ne = xe * rstd[:, None] * we[None, :]
    no = xo * rstd[:, None] * wo[None, :]
    angle = tokens[:, None] * half_head + (pairs % half_head)[None, :]  # the same angles for every head
    c = tl.load(cos_ptr + angle, mask=mask, other=0.0)
    s = tl.load(sin_ptr + angle, mask=mask, other=0.0)
    store_rounded(y_ptr + even, ne * c - no * s, mask)
    store_rounded(y_ptr + even + 1, ne * s + no * c, mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _norm_rope_bwd_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    n_tokens,
    n_pairs,
    half_head,
    rows_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Rows [start, start + rows_per_program) of batch b: dx, and one partial row of d weight (B * programs, D).

    Un-rotate dy (transpose of the RoPE rotation) to dn; d weight += dn * xhat; g = dn * w;
    dx = rstd * (g - xhat * mean_D(g * xhat)) with xhat = x * rstd.
    """
    chunk, b = tl.program_id(0), tl.program_id(1)
    pairs = tl.arange(0, BLOCK_P)
    mask_p = pairs < n_pairs
    we = tl.load(w_ptr + 2 * pairs, mask=mask_p, other=0.0).to(tl.float32)
    wo = tl.load(w_ptr + 2 * pairs + 1, mask=mask_p, other=0.0).to(tl.float32)
    dwe = tl.zeros([BLOCK_P], dtype=tl.float32)
    dwo = tl.zeros([BLOCK_P], dtype=tl.float32)
    start = chunk * rows_per_program
    end = tl.minimum(start + rows_per_program, n_tokens)
    for t0 in range(start, end, BLOCK_R):
        tokens = t0 + tl.arange(0, BLOCK_R)
        mask_r = tokens < end
        mask = mask_r[:, None] & mask_p[None, :]
        rows = b.to(tl.int64) * n_tokens + tokens
        even = rows[:, None] * (2 * n_pairs) + 2 * pairs[None, :]
        angle = tokens[:, None] * half_head + (pairs % half_head)[None, :]
        c = tl.load(cos_ptr + angle, mask=mask, other=0.0)
        s = tl.load(sin_ptr + angle, mask=mask, other=0.0)
        dye = tl.load(dy_ptr + even, mask=mask, other=0.0).to(tl.float32)
        dyo = tl.load(dy_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
        dne, dno = dye * c + dyo * s, dyo * c - dye * s
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhe = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
        xho = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
        dwe += tl.sum(dne * xhe, axis=0)
        dwo += tl.sum(dno * xho, axis=0)
        ge, go = dne * we[None, :], dno * wo[None, :]
        c_gx = (tl.sum(ge * xhe, axis=1) + tl.sum(go * xho, axis=1)) / (2 * n_pairs)
        store_rounded(dx_ptr + even, (ge - xhe * c_gx[:, None]) * rstd[:, None], mask)
        store_rounded(dx_ptr + even + 1, (go - xho * c_gx[:, None]) * rstd[:, None], mask)
    partial = (b * tl.num_programs(0) + chunk).to(tl.int64) * (2 * n_pairs) + 2 * pairs
    tl.store(dw_ptr + partial, dwe, mask=mask_p)
    tl.store(dw_ptr + partial + 1, dwo, mask=mask_p)


# ------------------------------------------------------------------------------------------------------ launchers ---
def _check_shapes(q, k, weight_q, weight_k, cos, sin, num_heads: int) -> None:
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"qk_norm_rope expects q and k (B, N, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    dim = q.shape[-1]
    if dim % num_heads or (dim // num_heads) % 2:
        raise ValueError(f"D={dim} must split into {num_heads} heads of an even head_dim")
    if weight_q.shape != (dim,) or weight_k.shape != (dim,):
        raise ValueError(f"RMSNorm weights must be ({dim},), got {tuple(weight_q.shape)}, {tuple(weight_k.shape)}")
    want = (q.shape[1], dim // num_heads // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(f"cos/sin must be (N, Dh/2) = {want}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("the fused qk_norm_rope treats cos/sin as fixed tables; they must not require grad")


def _forward_one(x, weight, cos, sin, eps: float):
    """x: (B, N, D) -> y (B, N, D) in x.dtype, rstd (B, N) fp32."""
    batch, n_tokens, dim = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    rstd = torch.empty(batch, n_tokens, device=x.device, dtype=torch.float32)
    block_r, block_p = row_block(dim // 2)
    grid = (triton.cdiv(n_tokens, block_r), batch)
    args = (x, weight, cos, sin, y, rstd, n_tokens, dim // 2, cos.shape[-1], eps)
    launch(
        _norm_rope_fwd_kernel,
        grid,
        args,
        {"BLOCK_R": block_r, "BLOCK_P": block_p},
        tune_key=("n_pairs",),
        tile=("BLOCK_R", "BLOCK_P", 2),
    )
    return y, rstd


def _backward_one(dy, x, weight, cos, sin, rstd):
    """dy, x: (B, N, D) -> dx (B, N, D) in x.dtype, d weight (D,) fp32."""
    batch, n_tokens, dim = x.shape
    dy, x = dy.contiguous().view(x.shape), x.contiguous()
    block_r, block_p = row_block(dim // 2)
    programs, rows_per_program = split_rows(n_tokens, block_r, batch, x.device)
    dx = torch.empty_like(x)
    dw = torch.empty(batch * programs, dim, device=x.device, dtype=torch.float32)  # partial sums
    args = (x, dy, weight, cos, sin, rstd, dx, dw, n_tokens, dim // 2, cos.shape[-1], rows_per_program)
    constexprs = {"BLOCK_R": block_r, "BLOCK_P": block_p}
    launch(
        _norm_rope_bwd_kernel,
        (programs, batch),
        args,
        constexprs,
        tune_key=("n_pairs",),
        tile=("BLOCK_R", "BLOCK_P", 4),
        max_warps=8,  # at 16 warps ptxas caps a thread at 128 registers: the D=5120 backward spilled 8 B on sm_90
    )
    return dx, dw.sum(0)


# ------------------------------------------------------------------------------------- custom ops and autograd ---
@torch.library.custom_op("vidistill::qk_norm_rope_fwd", mutates_args=())
def _qk_norm_rope_fwd(
    q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns q, k as (B, N, H, Dh) in their dtypes, and their fp32 rstd (B, N) for the backward."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q_out, rstd_q = _forward_one(q, weight_q.contiguous(), cos, sin, eps)
    k_out, rstd_k = _forward_one(k, weight_k.contiguous(), cos, sin, eps)
    return q_out.unflatten(-1, (num_heads, -1)), k_out.unflatten(-1, (num_heads, -1)), rstd_q, rstd_k


@_qk_norm_rope_fwd.register_fake
def _(q, k, weight_q, weight_k, cos, sin, num_heads, eps):
    heads = (*q.shape[:2], num_heads, q.shape[2] // num_heads)  # (B, N, H, Dh)
    rstd = q.new_empty(q.shape[:2], dtype=torch.float32)
    return q.new_empty(heads), k.new_empty(heads), rstd, torch.empty_like(rstd)


@torch.library.custom_op("vidistill::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd(
    dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor,
    weight_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rstd_q: torch.Tensor, rstd_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dq, dk: (B, N, H, Dh). Returns d q, d k (B, N, D) in their dtypes, d weight_q, d weight_k (D,) fp32."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    dq_in, dwq = _backward_one(dq, q, weight_q.contiguous(), cos, sin, rstd_q)
    dk_in, dwk = _backward_one(dk, k, weight_k.contiguous(), cos, sin, rstd_k)
    return dq_in, dk_in, dwq, dwk


@_qk_norm_rope_bwd.register_fake
def _(dq, dk, q, k, weight_q, weight_k, cos, sin, rstd_q, rstd_k):
    dw = q.new_empty(q.shape[-1:], dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), dw, torch.empty_like(dw)


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, weight_q, weight_k, cos, sin, num_heads, eps):
        q_out, k_out, rstd_q, rstd_k = torch.ops.vidistill.qk_norm_rope_fwd(
            q, k, weight_q, weight_k, cos, sin, num_heads, eps
        )
        ctx.save_for_backward(q, k, weight_q, weight_k, cos, sin, rstd_q, rstd_k)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        q, k, weight_q, weight_k, cos, sin, rstd_q, rstd_k = ctx.saved_tensors
        dq_in, dk_in, dwq, dwk = torch.ops.vidistill.qk_norm_rope_bwd(
            dq, dk, q, k, weight_q, weight_k, cos, sin, rstd_q, rstd_k
        )
        return dq_in, dk_in, dwq.to(weight_q.dtype), dwk.to(weight_k.dtype), None, None, None, None


# --------------------------------------------------------------------------------------------------------- public ---
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm across heads (weight (D,)) then interleaved RoPE, for self-attention q and k.

    q, k: (B, N, D) with D = num_heads * Dh. cos, sin: (N, Dh // 2) fp32 per-token angles (fixed tables, no grad).
    Returns q, k as (B, N, H, Dh) in their input dtypes; fp32 math inside.
    Triton on CUDA tensors (or when forced by VIDISTILL_KERNELS=triton), the reference otherwise.
    """
    if use_triton(q, k, weight_q, weight_k, cos, sin):
        _check_shapes(q, k, weight_q, weight_k, cos, sin, num_heads)
        return _QKNormRope.apply(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
    return qk_norm_rope_reference(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
