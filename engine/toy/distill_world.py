"""The toy world as seen by the distillation job: per-rank batches of toy latents and caption embeddings, the empty
prompt for CFG, and a sampler that writes 4-step sample videos of fixed prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import RunConfig
from engine.data.mp4 import to_frames, write_mp4
from engine.distill import dist
from engine.distill.data import TensorSource
from engine.distill.job import World
from engine.toy.data import toy_tensors
from engine.toy.recipes import toy_parts
from engine.toy.sampling import decode, student_latents


def sample_prompts(cfg: RunConfig, val_captions: list[str], n: int = 4) -> list[str]:
    return list(cfg.logging.sample_prompts) or val_captions[:n]


def make_toy_world(cfg: RunConfig, device: torch.device) -> World:
    parts = toy_parts(cfg)
    train = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
    val = toy_tensors(cfg.toy, parts.codec, parts.text, split="val")
    source = TensorSource(
        train.latents, train.context, cfg.optim.micro_batch_size,
        rank=dist.rank(), world_size=dist.world_size(), seed=cfg.train.seed, device=device,
    )  # fmt: skip
    shape = tuple(train.latents.shape[1:])
    prompts = sample_prompts(cfg, val.captions)
    context, _ = parts.text.encode(prompts)
    out_dir = Path(cfg.logging.run_dir) / "samples"

    def sampler(generator: torch.nn.Module, step: int) -> None:
        """Collective under ZeRO-3 (every rank runs the same forwards); rank 0 writes the mp4 files."""
        was_training = generator.training
        generator.eval()
        for seed in cfg.logging.sample_seeds or [0]:
            latents = student_latents(
                generator, context.to(device), shape, parts.schedule, cfg.diffusion.student_timesteps, seed=seed
            )
            if dist.is_main():
                videos = decode(parts.codec, latents.cpu())
                for i, (prompt, video) in enumerate(zip(prompts, videos)):
                    name = f"step{step:07d}_seed{seed}_{i:02d}_" + "_".join(prompt.split()[:4]) + ".mp4"
                    write_mp4(out_dir / name, to_frames(video), fps=cfg.data.fps, scale=4)
        generator.train(was_training)

    return World(source=source, uncond=parts.uncond, latent_shape=shape, sampler=sampler)
