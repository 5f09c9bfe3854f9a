"""RMSNorm across heads + interleaved 3D RoPE, applied to the self-attention q and k of Wan2.1.

Layers of this file: the pure-torch reference (the DiT's unfused path and the numerical ground truth).
"""

from __future__ import annotations

import torch


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


def qk_norm_rope(q, k, weight_q, weight_k, cos, sin, num_heads: int, eps: float):
    """Public entry point; dispatches to the fused kernel when available (see kernels/_dispatch.py)."""
    return qk_norm_rope_reference(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
