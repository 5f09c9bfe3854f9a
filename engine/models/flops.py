"""Model FLOPs of one Wan DiT forward (docs/wan.md#flops): 2 FLOPs per multiply-add; element-wise ops,
softmax and norms excluded. Used for tokens/s -> MFU in the trainer and for benchmark formulas."""

from __future__ import annotations

from engine.config import ModelConfig


def dit_forward_flops(cfg: ModelConfig, latent_fhw: tuple[int, int, int], text_len: int, batch: int = 1) -> dict:
    """{'linear', 'attention', 'embed', 'total'} FLOPs of one forward over ``batch`` latents of shape (F, H, W)."""
    pt, ph, pw = cfg.patch_size
    f, h, w = latent_fhw
    n = (f // pt) * (h // ph) * (w // pw)  # tokens
    d, L = cfg.dim, text_len
    patch_out = cfg.out_dim * pt * ph * pw
    linear_block = 8 * n * d * d + 4 * n * d * d + 4 * L * d * d + 4 * n * d * cfg.ffn_dim
    attn_block = 4 * n * n * d + 4 * n * L * d
    embed = 2 * n * d * cfg.in_dim * pt * ph * pw + 2 * n * d * patch_out + 2 * L * (cfg.text_dim * d + d * d)
    linear, attention = cfg.num_layers * linear_block, cfg.num_layers * attn_block
    out = {"linear": linear, "attention": attention, "embed": embed, "tokens": n}
    out = {k: v * batch for k, v in out.items()}
    out["total"] = out["linear"] + out["attention"] + out["embed"]
    return out
