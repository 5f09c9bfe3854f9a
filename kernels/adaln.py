"""adaLN modulation: LayerNorm without affine followed by ``x * (1 + scale) + shift`` (Wan2.1 blocks and head).

Layers of this file: the pure-torch reference (the DiT's unfused path and the numerical ground truth).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adaln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, computed in fp32, returned in x.dtype.

    x: (B, N, D) any float dtype. shift, scale: (B, 1, D), fp32 (the modulation stays fp32, WAN_SPEC.md 1.2).
    """
    xf = x.float()
    out = F.layer_norm(xf, (xf.shape[-1],), eps=eps) * (1 + scale) + shift
    return out.to(x.dtype)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Public entry point; dispatches to the fused kernel when available (see kernels/_dispatch.py)."""
    return adaln_modulate_reference(x, shift, scale, eps)
