"""Sample videos during distillation: the generator's few-step videos of fixed prompts, for every sample seed.

The (seed, prompt) videos are split across the data-parallel ranks in contiguous blocks, so on N GPUs the sampling
costs about 1/N of one rank generating everything (with sequence parallelism the ranks of a group generate their
block together, each holding a shard of every video's tokens). Under ZeRO-3 every forward is collective, so each
rank runs the same number of forward calls: a rank whose block is short repeats its last video (the copy is
dropped). Video i of seed s starts from a generator seeded with (s, i) that also draws its re-noising, so a video
does not depend on the number of ranks, the batch it shares or the other prompts. Rank 0 gathers the latents, decodes
one video at a time (bounding the decoder's memory) and writes <run_dir>/samples/step<step>_seed<seed>_<i>_<prompt>.mp4.
With a quality monitor (engine/train/quality.py) rank 0 also scores the videos and the sampler returns the report the
loop logs; the teacher's videos of the same prompts and seeds are drawn once first, for the monitor's comparison.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.data.mp4 import to_frames, write_mp4
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import SampleNoise, sample_student, sample_teacher, video_seed
from engine.train import dist
from engine.train.quality import QualityMonitor

Decode = Callable[[torch.Tensor], torch.Tensor]
"""(1, C, F, h, w) latents -> (3, T, H, W) video in [-1, 1]."""


def sample_name(step: int, seed: int, i: int, prompt: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:48] or "prompt"
    return f"step{step:07d}_seed{seed}_{i:02d}_{slug}.mp4"


def rank_block(num_videos: int, rank: int, world_size: int) -> list[int]:
    """Indices of the videos ``rank`` generates: a contiguous block of ceil(n / world) padded with its last index
    (or the last video, for a rank past the end), so every rank has the same count."""
    per_rank = math.ceil(num_videos / world_size)
    block = list(range(rank * per_rank, min(num_videos, (rank + 1) * per_rank)))
    pad = block[-1] if block else num_videos - 1
    return block + [pad] * (per_rank - len(block))


@torch.no_grad()
def generate_block(
    model, context: torch.Tensor, seeds: list[int], shape, schedule: FlowSchedule, timesteps, chunk: int
) -> torch.Tensor:
    """(N, C, F, h, w) student videos for context (N, L, D), video n from a generator seeded with seeds[n],
    ``chunk`` at a time."""
    out = []
    for start in range(0, context.shape[0], chunk):
        noise = SampleNoise(seeds[start : start + chunk])
        ctx = context[start : start + chunk]
        x = noise((ctx.shape[0], *shape), torch.float32, ctx.device)
        out.append(sample_student(model, x, ctx, schedule, list(timesteps), noise).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def teacher_block(
    model, context: torch.Tensor, uncond: torch.Tensor, seeds: list[int], shape, schedule: FlowSchedule, cfg: RunConfig
) -> torch.Tensor:
    """(N, C, F, h, w) teacher videos (Euler, CFG) for context (N, L, D), same seeds as :func:`generate_block`."""
    d, chunk, out = cfg.diffusion, cfg.optim.micro_batch_size, []
    for start in range(0, context.shape[0], chunk):
        noise = SampleNoise(seeds[start : start + chunk])
        ctx = context[start : start + chunk]
        x = noise((ctx.shape[0], *shape), torch.float32, ctx.device)
        un = uncond.to(ctx.device).expand(ctx.shape[0], -1, -1)
        x0 = sample_teacher(model, x, ctx, un, schedule, d.teacher_steps, d.guidance_scale, d.guidance_form)
        out.append(x0.float().cpu())
    return torch.cat(out)


def make_sampler(
    cfg: RunConfig,
    prompts: list[str],
    context: torch.Tensor,
    decode: Decode,
    shape: tuple[int, int, int, int],
    device: torch.device,
    *,
    view_scale: int = 1,
    monitor: QualityMonitor | None = None,
    teacher: tuple[torch.nn.Module, torch.Tensor] | None = None,
) -> Callable[[torch.nn.Module, int], dict | None]:
    """sampler(generator, step) for the trainer; collective (call it on every rank). On rank 0 it returns
    ``{"videos": [the mp4 paths written], "quality": report}`` (None elsewhere): the report is ``monitor``'s (rank 0's,
    None elsewhere), or None without one; ``teacher`` (module, unconditional context) draws the monitor's teacher
    reference once, on every rank, when ``needs_teacher``."""
    out_dir = Path(cfg.logging.run_dir) / "samples"
    schedule = FlowSchedule(cfg.diffusion.num_train_timesteps, cfg.diffusion.shift)
    videos = [(seed, i) for seed in (cfg.logging.sample_seeds or [0]) for i in range(len(prompts))]
    block = rank_block(len(videos), dist.data_rank(), dist.data_world_size())  # one block per sequence-parallel group
    context = context.to(device)
    mine = context[[videos[v][1] for v in block]]  # (per_rank, L, D)
    seeds = [video_seed(*videos[v]) for v in block]
    chunk = cfg.optim.micro_batch_size  # a batch that fits training (with gradients) fits no-grad sampling

    def gather(latents: torch.Tensor) -> torch.Tensor:
        """Every block once, in order: the first rank of each sequence-parallel group speaks for its group."""
        parts = dist.all_gather(latents.to(device))[:: dist.sequence_parallel_size()]
        return torch.cat([t.cpu() for t in parts])[: len(videos)]

    def reference() -> None:
        """The teacher's videos of the same prompts and seeds, once, for the monitor (rank 0 decides, every rank
        samples: under ZeRO-3 every forward is collective)."""
        if teacher is None:
            return
        wanted = monitor is not None and monitor.needs_teacher
        if dist.all_true(not wanted, device=device):
            return
        gathered = gather(teacher_block(teacher[0], mine, teacher[1], seeds, shape, schedule, cfg))
        if monitor is not None:
            monitor.set_teacher(gathered, torch.cat([decode(lat[None])[None] for lat in gathered]))

    def sampler(generator: torch.nn.Module, step: int) -> dict | None:
        reference()
        was_training = generator.training
        generator.eval()
        latents = generate_block(generator, mine, seeds, shape, schedule, cfg.diffusion.student_timesteps, chunk)
        generator.train(was_training)
        gathered = gather(latents)
        if not dist.is_main():
            return None
        decoded, paths = [], []
        for (seed, i), lat in zip(videos, gathered):
            video = decode(lat[None])
            decoded.append(video[None])
            paths.append(out_dir / sample_name(step, seed, i, prompts[i]))
            write_mp4(paths[-1], to_frames(video), cfg.data.fps, scale=view_scale)
        report = monitor.report(step, gathered, torch.cat(decoded)) if monitor is not None else None
        return {"videos": paths, "quality": report}

    return sampler


def world_sampler(
    cfg: RunConfig, world, device: torch.device, teacher: torch.nn.Module | None = None, teacher_id: str | None = None
) -> Callable[[torch.nn.Module, int], dict | None] | None:
    """The sampler of a world's sample prompts (``engine.worlds.World``), or None when it has none or cannot
    decode (a cache run without ``vae.path``). With ``logging.quality.enabled`` rank 0 scores the videos (and, given
    the ``teacher`` and ``logging.quality.teacher_reference``, compares them with the teacher's)."""
    if not world.sample_prompts or world.load_codec is None:
        return None
    q, monitor, ref = cfg.logging.quality, None, None
    if q.enabled:
        d = cfg.diffusion
        key = {
            "teacher": teacher_id,
            "prompts": list(world.sample_prompts),
            "seeds": list(cfg.logging.sample_seeds or [0]),
            "sampler": [d.teacher_steps, d.guidance_scale, d.guidance_form, d.shift],
        }
        use_teacher = q.teacher_reference and teacher is not None
        if dist.is_main():
            monitor = QualityMonitor(cfg, world.sample_scorer, key if use_teacher else None)
        ref = (teacher, world.unconditional()) if use_teacher else None
    return make_sampler(
        cfg, world.sample_prompts, world.sample_context, lambda lat: world.decode(lat)[0], world.latent_shape, device,
        view_scale=world.view_scale, monitor=monitor, teacher=ref,
    )  # fmt: skip
