"""Our Wan DiT against diffusers' WanTransformer3DModel at the same weights (fp32), in both directions."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from engine.config import ModelConfig
from engine.models.checkpoint import diffusers_to_official, load_weights, save_weights
from engine.models.wan import WanModel

# (heads, head_dim, ffn, layers, in/out channels, text_dim, latent (B, F, H, W), context length)
CASES = {
    # the diffusers unit-test config: heads 2 x 12 (RoPE split 4/4/4), 2 frames of 16x16
    "diffusers-test": dict(heads=2, head_dim=12, ffn=32, layers=2, ch=4, text=16, latent=(1, 2, 16, 16), ctx=12),
    # non-square latent, odd frame count, batch 2 with different timesteps
    "non-square": dict(heads=3, head_dim=16, ffn=40, layers=2, ch=16, text=24, latent=(2, 5, 6, 10), ctx=7),
    # Wan's 16 channels and head_dim 128 split 44/42/42, a single frame
    "head128": dict(heads=2, head_dim=128, ffn=64, layers=1, ch=16, text=32, latent=(2, 1, 4, 8), ctx=5),
}


def _pair(case: dict) -> tuple[WanTransformer3DModel, ModelConfig]:
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=case["heads"],
        attention_head_dim=case["head_dim"],
        in_channels=case["ch"],
        out_channels=case["ch"],
        text_dim=case["text"],
        freq_dim=256,
        ffn_dim=case["ffn"],
        num_layers=case["layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()
    with torch.no_grad():  # random everything: zero-initialized tensors would hide mapping bugs
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    cfg = ModelConfig(
        dim=case["heads"] * case["head_dim"],
        num_heads=case["heads"],
        ffn_dim=case["ffn"],
        num_layers=case["layers"],
        in_dim=case["ch"],
        out_dim=case["ch"],
        text_dim=case["text"],
        rope_max_seq_len=64,
        gradient_checkpointing=False,
        fused_kernels=False,
    )
    return ref, cfg


def _inputs(case: dict, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b, f, h, w = case["latent"]
    x = torch.randn(b, case["ch"], f, h, w, generator=g)
    t = torch.tensor([999.0, 250.5][:b])  # different timesteps per sample
    ctx = torch.randn(b, case["ctx"], case["text"], generator=g)
    return x, t, ctx


@pytest.mark.parametrize("name", list(CASES))
def test_ours_matches_diffusers(name):
    case = CASES[name]
    ref, cfg = _pair(case)
    ours = WanModel(cfg).eval()
    ours.load_state_dict({diffusers_to_official(k): v for k, v in ref.state_dict().items()}, strict=True)
    x, t, ctx = _inputs(case)
    with torch.no_grad():
        expected = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert got.shape == x.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_loads_our_checkpoint(name, tmp_path):
    case = CASES[name]
    _, cfg = _pair(case)
    torch.manual_seed(3)
    ours = WanModel(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    save_weights(ours, cfg, tmp_path / "transformer")
    ref = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, ctx = _inputs(case, seed=2)
    with torch.no_grad():
        assert (ref(x, t, ctx, return_dict=False)[0] - ours(x, t, ctx)).abs().max().item() <= 1e-5
    # ... and our loader reads the same directory back to identical weights
    again = WanModel(cfg)
    assert load_weights(again, tmp_path / "transformer") == "diffusers"
    for (n, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_batch_elements_are_independent():
    """Per-sample timesteps: sample i of a batch equals the same sample run alone."""
    case = CASES["non-square"]
    ref, cfg = _pair(case)
    ours = WanModel(cfg).eval()
    x, t, ctx = _inputs(case)
    with torch.no_grad():
        both = ours(x, t, ctx)
        for i in range(2):
            alone = ours(x[i : i + 1], t[i : i + 1], ctx[i : i + 1])
            assert (both[i : i + 1] - alone).abs().max().item() <= 1e-5
