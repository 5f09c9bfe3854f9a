"""Triton kernels, each with a pure-torch reference of the same signature (STYLE.md: four layers in one file).

    adaln.adaln_modulate(x, shift, scale, eps)                          LayerNorm (no affine) * (1 + scale) + shift
    gated_residual.gated_residual(x, y, gate)                           x + y * gate
    qk_norm_rope.qk_norm_rope(q, k, weight_q, weight_k, cos, sin, num_heads, eps)   RMSNorm across heads + RoPE
    temporal_variance.temporal_loss(x, eps, power, tau)                 truncated temporal loss and Var_F mean

Public functions run Triton on CUDA tensors and the reference otherwise; VIDISTILL_KERNELS=triton|reference|auto
forces a path (kernels/_dispatch.py). Tests force Triton on CPU tensors through TRITON_INTERPRET=1.
"""
