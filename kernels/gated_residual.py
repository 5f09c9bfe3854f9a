"""Gated residual add ``x + y * gate`` (Wan2.1 self-attention and FFN outputs).

Layers of this file: the pure-torch reference (the DiT's unfused path and the numerical ground truth).
"""

from __future__ import annotations

import torch


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate computed in fp32, returned in x.dtype.

    x, y: (B, N, D) same dtype. gate: (B, 1, D) fp32.
    """
    return (x.float() + y.float() * gate).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Public entry point; dispatches to the fused kernel when available (see kernels/_dispatch.py)."""
    return gated_residual_reference(x, y, gate)
