"""Samplers: the teacher's Euler sampler with classifier-free guidance, and the few-step student sampler.

A denoiser here is any callable ``model(x (B, C, F, H, W), t (B,), context (B, L, D)) -> velocity``. CFG runs the
conditional and unconditional inputs as one batched forward (one pass over the weights, better GPU occupancy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.diffusion.flow import FlowSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSource = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
"""Draws fresh standard-normal noise of a shape (e.g. one generator per video, so a video's draws do not depend on
the batch it is in). A plain ``torch.Generator`` is accepted wherever a NoiseSource is."""


def video_seed(seed: int, i: int) -> int:
    """The seed of video ``i`` of a set drawn with ``seed`` (the engine's one per-video noise convention: training
    samples, the toy world's evaluation; ``launcher/generate.py --seeds video_seed(seed, i)`` reproduces video i)."""
    return seed * 100_003 + i


class SampleNoise:
    """A NoiseSource with one CPU generator per video, seeded with its seed: each video's draws do not depend on the
    batch (or the rank) it is generated on."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """(B, ...) standard normal with row b from generator b (B = number of seeds)."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} videos requested from {len(self.generators)} seeds")
        rows = [torch.randn(shape[1:], generator=g) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)


def fresh_noise(
    source: torch.Generator | NoiseSource, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Standard-normal noise of ``shape`` from a torch.Generator or a NoiseSource."""
    if isinstance(source, torch.Generator):
        return torch.randn(shape, generator=source, device=source.device, dtype=dtype).to(device)
    return source(tuple(shape), dtype, device)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, form: str = "standard") -> torch.Tensor:
    """standard: u + w (c - u); dmd2: c + w (c - u), which is the standard form with w + 1 (docs/method.md#guidance)."""
    if form == "standard":
        return uncond + scale * (cond - uncond)
    if form == "dmd2":
        return cond + scale * (cond - uncond)
    raise ValueError(f"unknown guidance form {form!r}; choose standard or dmd2")


def guided_velocity(
    model: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    scale: float,
    form: str = "standard",
) -> torch.Tensor:
    """CFG velocity from one batched forward over [cond; uncond].

    x: (B, C, F, H, W); t: (B,); context, uncond_context: (B, L, D) (uncond may be (1, L, D), broadcast over B).
    """
    if scale == 0 and form == "standard":  # pure unconditional: one half-size pass
        return model(x, t, uncond_context.expand_as(context))
    b = x.shape[0]
    both = model(
        torch.cat([x, x]),  # (2B, C, F, H, W)
        torch.cat([t, t]),  # (2B,)
        torch.cat([context, uncond_context.expand_as(context)]),  # (2B, L, D)
    )
    cond, uncond = both[:b], both[b:]
    return combine_guidance(cond, uncond, scale, form)


@torch.no_grad()
def sample_teacher(
    model: Denoiser,
    noise: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    schedule: FlowSchedule,
    steps: int = 50,
    guidance_scale: float = 5.0,
    guidance_form: str = "standard",
    progress: Callable | None = None,
) -> torch.Tensor:
    """Euler on the shifted flow grid: x <- x + (s_next - s) v_cfg. Returns x0 (B, C, F, H, W)."""
    sigmas = schedule.sampling_sigmas(steps).to(noise.device)
    x = noise
    indices = range(steps) if progress is None else progress(range(steps))
    for i in indices:
        s = sigmas[i].expand(x.shape[0])  # (B,)
        v = guided_velocity(model, x, schedule.timestep(s), context, uncond_context, guidance_scale, guidance_form)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * v.to(x.dtype)
    return x


def student_step(
    model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, schedule: FlowSchedule
) -> torch.Tensor:
    """One student step: the x0 prediction at per-sample sigma (B,)."""
    v = model(x, schedule.timestep(sigma), context)
    return schedule.x0_from_velocity(x, v.to(x.dtype), sigma)


@torch.no_grad()
def sample_student(
    model: Denoiser,
    noise: torch.Tensor,
    context: torch.Tensor,
    schedule: FlowSchedule,
    timesteps: list[float],
    generator: torch.Generator | NoiseSource,
) -> torch.Tensor:
    """Few-step generation: predict x0, re-noise it to the next timestep with fresh noise; the last x0 is the output.
    ``generator`` supplies the re-noising draws (a torch.Generator or a NoiseSource)."""
    sigmas = schedule.student_sigmas(timesteps).to(noise.device)
    b = noise.shape[0]
    x = noise  # the first student timestep is (close to) pure noise: x_T = e
    for i in range(len(sigmas)):
        x0 = student_step(model, x, sigmas[i].expand(b), context, schedule)
        if i + 1 == len(sigmas):
            return x0
        x = schedule.add_noise(x0, fresh_noise(generator, x0.shape, x0.dtype, x0.device), sigmas[i + 1].expand(b))
    raise AssertionError("unreachable")
