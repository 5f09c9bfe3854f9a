"""Triton kernels, each beside a pure-torch reference of the same signature (docs/architecture.md#triton: four layers).

    adaln.adaln_modulate(x, shift, scale, eps)                          LayerNorm (no affine) * (1 + scale) + shift
    gated_residual.gated_residual(x, y, gate)                           x + y * gate
    qk_norm_rope.qk_norm_rope(q, k, weight_q, weight_k, cos, sin, num_heads, eps)   RMSNorm across heads + RoPE
    temporal_variance.temporal_loss(x, eps, power, tau)                 truncated temporal loss and Var_F mean
    interp_unet.conv_norm_act(x, weight, bias, ln_weight, ln_bias, eps, skip, pool)   interpolation U-Net ops,
        forward only: 3x3 implicit GEMM + LayerNorm over channels + SiLU; pair_conv_norm_act (the same unit on the
        frame pairs of (B, C, F, H, W)); interp_head (last unit + 1x1 conv + pair average, writes the 2F - 1 frames).
        The U-Net walk over them is engine.models.interp_unet.fused_interpolate.

Modules here take tensors and numbers only and import only torch, triton, the standard library and each other
(tests/kernels/test_kernel_imports.py); model wiring lives with the models in engine/.

Public functions run Triton on CUDA tensors and the reference otherwise; VIDISTILL_KERNELS=triton|reference|auto
forces a path (kernels/_dispatch.py). Tests force Triton on CPU tensors through TRITON_INTERPRET=1.
"""
