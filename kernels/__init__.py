"""Triton kernels, each beside a pure-torch reference of the same signature (docs/architecture.md#triton: four layers).

    adaln.adaln_modulate(x, shift, scale, eps)                          LayerNorm (no affine) * (1 + scale) + shift
    gated_residual.gated_residual(x, y, gate)                           x + y * gate
    qk_norm_rope.qk_norm_rope(q, k, weight_q, weight_k, cos, sin, num_heads, eps)   RMSNorm across heads + RoPE
    temporal_variance.temporal_loss(x, eps, power, tau)                 truncated temporal loss and Var_F mean
    interp_unet.fused_interpolate(model, latents)                       the interpolation U-Net, forward only:
        conv_norm_act (3x3 implicit GEMM + LayerNorm over channels + SiLU), pair_conv_norm_act (reads frame pairs
        from (B, C, F, H, W)), interp_head (last unit + 1x1 conv + pair average, writes the 2F - 1 frames)

Public functions run Triton on CUDA tensors and the reference otherwise; VIDISTILL_KERNELS=triton|reference|auto
forces a path (kernels/_dispatch.py). Tests force Triton on CPU tensors through TRITON_INTERPRET=1.
"""
