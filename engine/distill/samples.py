"""Sample videos during distillation: the generator's few-step videos of fixed prompts, for every sample seed.

The (seed, prompt) videos are split across ranks in contiguous blocks, so on N GPUs the sampling costs about 1/N of
one rank generating everything. Under ZeRO-3 every forward is collective, so each rank runs the same number of
forward calls: a rank whose block is short repeats its last video (the copy is dropped). Video i of seed s starts
from a generator seeded with (s, i) that also draws its re-noising, so a video does not depend on the number of
ranks, the batch it shares or the other prompts. Rank 0 gathers the latents, decodes one video at a time (bounding
the decoder's memory) and writes <run_dir>/samples/step<step>_seed<seed>_<i>_<prompt>.mp4.
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
from engine.diffusion.samplers import SampleNoise, sample_student, video_seed
from engine.train import dist

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


def make_sampler(
    cfg: RunConfig,
    prompts: list[str],
    context: torch.Tensor,
    decode: Decode,
    shape: tuple[int, int, int, int],
    device: torch.device,
    *,
    view_scale: int = 1,
) -> Callable[[torch.nn.Module, int], list[Path]]:
    """sampler(generator, step) for the trainer; collective (call it on every rank)."""
    out_dir = Path(cfg.logging.run_dir) / "samples"
    schedule = FlowSchedule(cfg.diffusion.num_train_timesteps, cfg.diffusion.shift)
    videos = [(seed, i) for seed in (cfg.logging.sample_seeds or [0]) for i in range(len(prompts))]
    block = rank_block(len(videos), dist.rank(), dist.world_size())
    context = context.to(device)
    mine = context[[videos[v][1] for v in block]]  # (per_rank, L, D)
    seeds = [video_seed(*videos[v]) for v in block]
    chunk = cfg.optim.micro_batch_size  # a batch that fits training (with gradients) fits no-grad sampling

    def sampler(generator: torch.nn.Module, step: int) -> list[Path]:
        was_training = generator.training
        generator.eval()
        latents = generate_block(generator, mine, seeds, shape, schedule, cfg.diffusion.student_timesteps, chunk)
        generator.train(was_training)
        gathered = torch.cat([t.cpu() for t in dist.all_gather(latents.to(device))])[: len(videos)]
        if not dist.is_main():
            return []
        paths = []
        for (seed, i), lat in zip(videos, gathered):
            frames = to_frames(decode(lat[None]))
            paths.append(out_dir / sample_name(step, seed, i, prompts[i]))
            write_mp4(paths[-1], frames, cfg.data.fps, scale=view_scale)
        return paths

    return sampler


def world_sampler(cfg: RunConfig, world, device: torch.device) -> Callable[[torch.nn.Module, int], list[Path]] | None:
    """The sampler of a world's sample prompts (``engine.worlds.World``), or None when it has none or cannot
    decode (a cache run without ``vae.path``)."""
    if not world.sample_prompts or world.load_codec is None:
        return None
    return make_sampler(
        cfg, world.sample_prompts, world.sample_context, lambda lat: world.decode(lat)[0], world.latent_shape, device,
        view_scale=world.view_scale,
    )  # fmt: skip
