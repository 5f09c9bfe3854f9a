"""Model FLOPs of one Wan DiT forward (docs/wan.md#flops): 2 FLOPs per multiply-add; element-wise ops,
softmax and norms excluded. Used for tokens/s -> MFU in the trainer and for benchmark formulas. With ``model.lora``
the adapters add their two thin matmuls per adapted layer, and a trained forward's backward skips the frozen
weights' gradients (:func:`train_passes`)."""

from __future__ import annotations

from engine.config import ModelConfig, lora_layers


def dit_forward_flops(cfg: ModelConfig, latent_fhw: tuple[int, int, int], text_len: int, batch: int = 1) -> dict:
    """{'linear', 'attention', 'embed', 'adapter', 'total'} FLOPs of one forward over ``batch`` latents of shape
    (F, H, W); 'adapter': the LoRA adapters' A and B (0 without ``model.lora``)."""
    pt, ph, pw = cfg.patch_size
    f, h, w = latent_fhw
    n = (f // pt) * (h // ph) * (w // pw)  # tokens
    d, L = cfg.dim, text_len
    patch_out = cfg.out_dim * pt * ph * pw
    linear_block = 8 * n * d * d + 4 * n * d * d + 4 * L * d * d + 4 * n * d * cfg.ffn_dim
    attn_block = 4 * n * n * d + 4 * n * L * d
    embed = 2 * n * d * cfg.in_dim * pt * ph * pw + 2 * n * d * patch_out + 2 * L * (cfg.text_dim * d + d * d)
    linear, attention = cfg.num_layers * linear_block, cfg.num_layers * attn_block
    out = {"linear": linear, "attention": attention, "embed": embed, "adapter": _adapter_flops(cfg, n, L), "tokens": n}
    out = {k: v * batch for k, v in out.items()}
    out["total"] = out["linear"] + out["attention"] + out["embed"] + out["adapter"]
    return out


def _adapter_flops(cfg: ModelConfig, tokens: int, text_len: int) -> int:
    if not cfg.lora.enabled:
        return 0
    r, total = cfg.lora.rank, 0
    for name, (out_f, in_f) in lora_layers(cfg).items():
        rows = text_len if name.endswith(("cross_attn.k", "cross_attn.v")) else tokens
        total += 2 * rows * r * (in_f + out_f)
    return total


def train_passes(cfg: ModelConfig, latent_fhw: tuple[int, int, int], text_len: int) -> float:
    """Forward-equivalents of a forward with its backward (model FLOPs, a checkpoint's recompute excluded): 3 with
    full weights (the backward computes input and weight gradients, 2 forwards). With ``model.lora`` the frozen
    layers' backward computes the input gradient alone: 1 forward of the linears and embeddings, attention's still 2,
    the adapters' 2."""
    if not cfg.lora.enabled:
        return 3.0
    f = dit_forward_flops(cfg, latent_fhw, text_len)
    return 1 + (f["linear"] + 2 * f["attention"] + f["embed"] + 2 * f["adapter"]) / f["total"]
