"""Frame-interpolation U-Net training: latent sources, the loop, checkpoints (paper appendix 8)."""
