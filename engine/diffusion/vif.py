"""Frame-interpolation inference (VIF, paper Sec. 3.4; docs/method.md#vif-inference).

The first k student steps run on the half-frame-rate latent ``noise[:, :, ::2]`` at its true length ((F + 1) / 2
frames, e.g. 11 of 21; no padding back to F, which is what the saving comes from: attention cost ~ tokens^2). The
step-k x0 prediction is interpolated to F frames, re-noised to step k+1's sigma with fresh full-rate noise, and the
remaining steps run at full rate to erase interpolation artifacts. Both phases are ``sample_student`` itself.

RoPE time positions of the half-rate frames: ``contiguous`` (0, 1, 2, ...: the model sees an ordinary short clip) or
``stride2`` (0, 2, 4, ...: the positions the kept frames have in the full clip).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import Denoiser, NoiseSource, fresh_noise, sample_student
from engine.models.interp_unet import check_channels, check_halvable

ROPE_POSITIONS = ("contiguous", "stride2")


def check_vif(
    num_frames: int,
    interp_channels: int,
    model_in_dim: int,
    half_rate_steps: int,
    num_steps: int,
    rope_positions: str = "contiguous",
    temporal_patch: int = 1,
) -> int:
    """Validate a VIF run from sizes alone (callable before any weight is loaded). Returns the half-rate frame count."""
    if not 0 <= half_rate_steps < num_steps:
        raise ValueError(
            f"half_rate_steps={half_rate_steps} must lie in [0, {num_steps - 1}]: at least one of the {num_steps} "
            f"student steps has to run at full frame rate after interpolation"
        )
    if rope_positions not in ROPE_POSITIONS:
        raise ValueError(f"rope_positions must be one of {ROPE_POSITIONS}, got {rope_positions!r}")
    check_channels(interp_channels, model_in_dim)
    if half_rate_steps == 0:
        return num_frames
    half = check_halvable(num_frames)
    if half % temporal_patch:
        raise ValueError(f"{half} half-rate frames are not divisible by the model's temporal patch {temporal_patch}")
    return half


def half_rate_positions(num_token_frames: int, rope_positions: str) -> torch.Tensor | None:
    """RoPE frame positions for the half-rate token frames: None (model default 0..n-1) or 0, 2, 4, ..."""
    if rope_positions == "contiguous":
        return None
    return 2 * torch.arange(num_token_frames)


def _model_cfg(model) -> tuple[int | None, int]:
    """(in_dim, temporal patch) of a WanModel-like denoiser; (None, 1) for a plain callable."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None, 1
    return cfg.in_dim, cfg.patch_size[0]


@torch.no_grad()
def sample_vif(
    model: Denoiser,
    interpolator,
    noise: torch.Tensor,
    context: torch.Tensor,
    schedule: FlowSchedule,
    timesteps: list[float],
    generator: torch.Generator | NoiseSource,
    half_rate_steps: int = 2,
    rope_positions: str = "contiguous",
) -> torch.Tensor:
    """4-step generation with the first ``half_rate_steps`` at half frame rate. Returns x0 (B, C, F, H, W).

    model: ``model(x, t, context, frame_positions=None)`` (WanModel); interpolator: anything with ``in_channels`` and
    ``interpolate((B, C, F', H, W)) -> (B, C, 2F' - 1, H, W)`` (InterpUNet). noise: (B, C, F, H, W), F odd. Random
    draws, in order: half-rate re-noise for steps 2..k, full-rate re-noise before step k+1, then as sample_student.
    """
    if noise.ndim != 5:
        raise ValueError(f"noise must be (B, C, F, H, W), got shape {tuple(noise.shape)}")
    in_dim, patch_t = _model_cfg(model)
    b, c, f = noise.shape[:3]
    if c != (in_dim or c):
        raise ValueError(f"noise has {c} channels, the model expects model.in_dim={in_dim}")
    k = half_rate_steps
    check_vif(f, interpolator.in_channels, c, k, len(timesteps), rope_positions, patch_t)
    if k == 0:
        return sample_student(model, noise, context, schedule, timesteps, generator)

    half = noise[:, :, ::2]  # (B, C, (F + 1) / 2, H, W): the true shorter sequence
    positions = half_rate_positions(half.shape[2] // patch_t, rope_positions)
    half_model = model if positions is None else functools.partial(model, frame_positions=positions)
    x0 = sample_student(half_model, half, context, schedule, timesteps[:k], generator)

    dtype = next(iter(interpolator.parameters())).dtype if isinstance(interpolator, nn.Module) else x0.dtype
    full = interpolator.interpolate(x0.to(dtype)).to(x0.dtype)  # (B, C, F, H, W)
    sigma = schedule.student_sigmas(timesteps[k : k + 1]).to(noise.device).expand(b)  # (B,)
    x = schedule.add_noise(full, fresh_noise(generator, full.shape, full.dtype, full.device), sigma)
    return sample_student(model, x, context, schedule, timesteps[k:], generator)


class TokenCounter(nn.Module):
    """Instrumentation: wraps a WanModel and records, per call, the latent frames, the tokens per sample and the RoPE
    frame positions it was given. Behaves as the wrapped model otherwise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[dict] = []

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, x, t, context, frame_positions=None):
        f, h, w = x.shape[2:]
        tokens = self.model.num_tokens((f, h, w)) if hasattr(self.model, "num_tokens") else f * h * w
        positions = None if frame_positions is None else [int(p) for p in frame_positions]
        self.calls.append({"frames": f, "tokens": tokens, "batch": x.shape[0], "frame_positions": positions})
        return self.model(x, t, context, frame_positions=frame_positions)
