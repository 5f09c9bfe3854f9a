"""Temporal regularization (paper Eq. 8) on generator samples: L = -log((v + eps)^p) with v the mean over
(B, C, H, W) of the population variance over frames, truncated: the term (value and gradient) counts only while
L >= tau. The fused Triton kernel runs on CUDA; elsewhere the pure-torch reference of the same signature."""

from __future__ import annotations

import torch

from kernels.temporal_variance import temporal_loss as _temporal_loss


def temporal_regularization(
    x: torch.Tensor, eps: float = 1e-6, power: float = 1.0, tau: float = 0.6
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, C, F, H, W) -> (truncated loss, v), 0-d fp32 tensors; no host synchronization."""
    return _temporal_loss(x, eps, power, tau)
