"""The toy world as seen by the distillation job: per-rank batches of toy latents and caption embeddings, the empty
prompt for CFG, and a sampler that writes 4-step sample videos of fixed prompts."""

from __future__ import annotations

import torch

from engine.config import RunConfig
from engine.distill.data import TensorSource
from engine.distill.job import World
from engine.distill.samples import make_sampler
from engine.toy.data import toy_tensors
from engine.toy.recipes import toy_parts
from engine.toy.sampling import decode
from engine.train import dist


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
    sampler = make_sampler(cfg, prompts, context, lambda lat: decode(parts.codec, lat)[0], shape, device, view_scale=4)
    return World(source=source, uncond=parts.uncond, latent_shape=shape, sampler=sampler)
