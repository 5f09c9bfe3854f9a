"""The VIF sampler: true-length half-rate steps (token counts), RoPE positions, exact agreement with the 4-step sampler
and with the algorithm written out by hand, and validation before any model call."""

import pytest
import torch

from engine.config import model_preset
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import sample_student
from engine.diffusion.vif import TokenCounter, check_vif, sample_vif
from engine.models.interp_unet import InterpolatorError, InterpUNet
from engine.models.wan import WanModel

TIMESTEPS = [1000.0, 900.0, 757.0, 522.0]
SCHEDULE = FlowSchedule(shift=5.0)


def _tiny_model() -> TokenCounter:
    torch.manual_seed(0)
    model = WanModel(model_preset("tiny", gradient_checkpointing=False))  # dim 24, 2 layers, in_dim 4 (1.3B: 1536)
    for p in model.parameters():  # the official init zeroes the head; random weights make every output count
        torch.nn.init.normal_(p, std=0.2)
    return TokenCounter(model.eval())


def _interp(residual: bool = False) -> InterpUNet:
    torch.manual_seed(1)
    return InterpUNet(4, (4, 8, 8), residual=residual).eval()  # random: not the blend


def _inputs(frames: int = 21, h: int = 4, w: int = 4):
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 4, frames, h, w, generator=g), torch.randn(1, 3, 16, generator=g)


def test_half_rate_steps_see_11_of_21_tokens():
    model, (noise, ctx) = _tiny_model(), _inputs()
    out = sample_vif(model, _interp(), noise, ctx, SCHEDULE, TIMESTEPS, torch.Generator().manual_seed(3))
    assert out.shape == noise.shape
    tokens = [c["tokens"] for c in model.calls]
    full = 21 * (4 // 2) * (4 // 2)  # patch (1, 2, 2)
    assert tokens == [11 * 4, 11 * 4, full, full]
    assert [t / full for t in tokens[:2]] == [11 / 21, 11 / 21]
    assert [c["frames"] for c in model.calls] == [11, 11, 21, 21]


def test_rope_positions_stride2_vs_contiguous():
    noise, ctx = _inputs()
    outs = {}
    for mode in ("contiguous", "stride2"):
        model = _tiny_model()
        g = torch.Generator().manual_seed(3)
        outs[mode] = sample_vif(model, _interp(), noise, ctx, SCHEDULE, TIMESTEPS, g, rope_positions=mode)
        positions = [c["frame_positions"] for c in model.calls]
        half = list(range(0, 21, 2)) if mode == "stride2" else None
        assert positions == [half, half, None, None]
    assert (outs["contiguous"] - outs["stride2"]).abs().max() > 1e-4  # RoPE positions reach the model


def test_k0_is_the_four_step_sampler():
    model, (noise, ctx) = _tiny_model(), _inputs(frames=6)  # no halving at k = 0: even F is fine
    a = sample_vif(
        model, _interp(), noise, ctx, SCHEDULE, TIMESTEPS, torch.Generator().manual_seed(4), half_rate_steps=0
    )
    b = sample_student(model, noise, ctx, SCHEDULE, TIMESTEPS, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert [c["frames"] for c in model.calls] == [6] * 8


@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_the_algorithm_written_out(k):
    """Steps 1..k on x[:, :, ::2], interpolate x0_k, re-noise with fresh full-rate noise, steps k+1.. at full rate."""
    model, interp, (noise, ctx) = _tiny_model(), _interp(), _inputs(frames=9)
    got = sample_vif(
        model, interp, noise, ctx, SCHEDULE, TIMESTEPS, torch.Generator().manual_seed(5), half_rate_steps=k
    )

    g = torch.Generator().manual_seed(5)
    sig = [t / 1000 for t in TIMESTEPS]
    x, x0 = noise[:, :, ::2], None  # 5 frames
    for i in range(len(TIMESTEPS)):
        if i == k:  # back to full rate: interpolate and re-noise with fresh full-size noise
            x = (1 - sig[i]) * interp.interpolate(x0) + sig[i] * torch.randn(noise.shape, generator=g)
        elif i > 0:
            x = (1 - sig[i]) * x0 + sig[i] * torch.randn(x0.shape, generator=g)
        v = model.model(x, torch.tensor([TIMESTEPS[i]]), ctx)
        x0 = x - sig[i] * v
    torch.testing.assert_close(got, x0)
    assert got.shape == noise.shape


def test_static_linear_motion_is_reproduced_exactly():
    """An oracle denoiser (x0 = a clip linear in time) and the untrained residual U-Net (= linear blend, exact on a
    linear clip): VIF returns the clip, so the half-rate frames are the even ones and the interleave is right."""
    f, c = 9, 4
    base, slope = torch.randn(1, c, 1, 5, 3), torch.randn(1, c, 1, 5, 3)
    clip = base + slope * torch.arange(f, dtype=torch.float32).view(1, 1, f, 1, 1)  # (1, C, F, H, W)

    def oracle(x, t, ctx, frame_positions=None):
        target = clip if x.shape[2] == f else clip[:, :, ::2]
        return (x - target) / (t / 1000).view(-1, 1, 1, 1, 1)  # v such that x - s v = target

    out = sample_vif(
        oracle,
        InterpUNet(c, (4, 8, 8)),
        torch.randn(1, c, f, 5, 3),
        torch.zeros(1, 1, 1),
        SCHEDULE,
        TIMESTEPS,
        torch.Generator().manual_seed(6),
    )
    torch.testing.assert_close(out, clip, rtol=1e-5, atol=1e-5)


def test_bad_input_fails_before_any_model_call():
    model, (noise, ctx) = _tiny_model(), _inputs(frames=20)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(InterpolatorError, match="20 latent frames cannot be halved"):
        sample_vif(model, _interp(), noise, ctx, SCHEDULE, TIMESTEPS, g)
    noise21 = _inputs()[0]
    with pytest.raises(
        InterpolatorError, match="interpolator has 16 latent channels but the student's model.in_dim is 4"
    ):
        sample_vif(model, InterpUNet(16, (4, 8, 8)), noise21, ctx, SCHEDULE, TIMESTEPS, g)
    with pytest.raises(ValueError, match=r"half_rate_steps=4 must lie in \[0, 3\]"):
        sample_vif(model, _interp(), noise21, ctx, SCHEDULE, TIMESTEPS, g, half_rate_steps=4)
    with pytest.raises(ValueError, match="rope_positions must be one of"):
        sample_vif(model, _interp(), noise21, ctx, SCHEDULE, TIMESTEPS, g, rope_positions="stride3")
    with pytest.raises(ValueError, match="noise has 16 channels, the model expects model.in_dim=4"):
        sample_vif(model, _interp(), torch.randn(1, 16, 21, 4, 4), ctx, SCHEDULE, TIMESTEPS, g)
    assert model.calls == []


def test_check_vif_from_sizes_alone():
    assert check_vif(21, 16, 16, 2, 4) == 11
    assert check_vif(20, 16, 16, 0, 4) == 20
    with pytest.raises(ValueError, match="not divisible by the model's temporal patch 2"):
        check_vif(21, 16, 16, 2, 4, temporal_patch=2)
