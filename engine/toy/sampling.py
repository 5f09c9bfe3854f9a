"""Sampling on the toy world for evaluation: teacher (Euler + CFG) and student (few-step) videos from prompts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import SampleNoise, sample_student, sample_teacher, video_seed
from engine.diffusion.vif import sample_vif
from engine.toy.codec import ToyCodec


def _batched(fn: Callable, context: torch.Tensor, shape: tuple, seed: int, batch: int) -> torch.Tensor:
    """Run fn(x, context_chunk, noise) over chunks. Video i draws its initial noise ``x`` and every re-noise from one
    generator seeded with ``video_seed(seed, i)`` (the engine's convention, as ``launcher/generate.py``): a video
    depends on (prompt, seed, i) only, not on the chunk it lands in."""
    outs = []
    for start in range(0, context.shape[0], batch):
        ctx = context[start : start + batch]
        noise = SampleNoise([video_seed(seed, start + i) for i in range(len(ctx))])
        outs.append(fn(noise((len(ctx), *shape), torch.float32, ctx.device), ctx, noise))
    return torch.cat(outs)


@torch.no_grad()
def teacher_latents(
    model,
    context,
    uncond,
    latent_shape,
    schedule: FlowSchedule,
    *,
    steps=50,
    scale=5.0,
    form="standard",
    seed=0,
    batch=64,
) -> torch.Tensor:
    """(N, C, F, h, w) latents from the teacher sampler for each row of context (N, L, D)."""

    def fn(noise, ctx, _g):
        return sample_teacher(model, noise, ctx, uncond.expand(len(ctx), -1, -1), schedule, steps, scale, form)

    return _batched(fn, context, latent_shape, seed, batch)


@torch.no_grad()
def student_latents(model, context, latent_shape, schedule: FlowSchedule, timesteps, *, seed=0, batch=64):
    """(N, C, F, h, w) latents from the few-step student sampler."""

    def fn(noise, ctx, g):
        return sample_student(model, noise, ctx, schedule, timesteps, g)

    return _batched(fn, context, latent_shape, seed, batch)


@torch.no_grad()
def vif_latents(
    model,
    interpolator,
    context,
    latent_shape,
    schedule: FlowSchedule,
    timesteps,
    *,
    half_rate_steps=2,
    rope_positions="contiguous",
    seed=0,
    batch=64,
):
    """(N, C, F, h, w) latents from the VIF sampler (the first half_rate_steps at half frame rate)."""

    def fn(noise, ctx, g):
        return sample_vif(model, interpolator, noise, ctx, schedule, timesteps, g, half_rate_steps, rope_positions)

    return _batched(fn, context, latent_shape, seed, batch)


@torch.no_grad()
def decode(codec: ToyCodec, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(N, 3, T, H, W) pixels in [-1, 1]."""
    return torch.cat([codec.decode(latents[i : i + batch]) for i in range(0, latents.shape[0], batch)])
