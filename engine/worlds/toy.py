"""The toy world: procedural clips (engine/toy), the toy codec and the toy text encoder, all cheap enough to build on
every rank; the training source holds the train split in memory."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import ConfigError, RunConfig
from engine.toy.data import toy_tensors
from engine.toy.evaluate import reference_for
from engine.toy.metrics import compute_metrics
from engine.toy.parts import toy_parts
from engine.train import dist
from engine.worlds.base import VIEW_SCALE, World, world_latent_shape
from engine.worlds.source import TensorSource


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key `{key}`: {msg}")


def check_toy_training(cfg: RunConfig, world_size: int) -> None:
    """What a toy distillation would silently ignore or fail on mid-start, refused naming the key: the toy world
    renders its own clips (no manifest, no precomputed cache), and each rank's micro-batch must fit its share of the
    training clips."""
    d = cfg.data
    _ignored = "the toy world renders its own clips (toy.*) and would ignore it; drop it or use vae.kind=wan"
    _require(d.source != "cache", "data.source", f"cache: {_ignored}")
    _require(not d.cache_dir, "data.cache_dir", f"{d.cache_dir}: {_ignored}")
    _require(not d.manifest, "data.manifest", f"{d.manifest}: {_ignored}")
    n_train = cfg.toy.num_clips - cfg.toy.num_val()
    per_rank = n_train // world_size
    _require(
        cfg.optim.micro_batch_size <= per_rank,
        "optim.micro_batch_size",
        f"{cfg.optim.micro_batch_size} is more than the {per_rank} toy training clips per rank ({n_train} clips over "
        f"{world_size} ranks; raise toy.num_clips or lower the batch)",
    )


def toy_scorer(cfg: RunConfig, prompts: list[str], val) -> Callable[[torch.Tensor], dict[str, float]] | None:
    """The toy metrics of sample videos against what their prompts ask for, when every prompt is a held-out caption
    (its ClipParams known); videos are the sample videos of every sample seed, prompt-major within a seed."""
    index = {c: i for i, c in enumerate(val.captions)}
    if not prompts or any(p not in index for p in prompts):
        return None
    params = [val.params[index[p]] for p in prompts]
    reference = reference_for(cfg.toy)

    def score(videos: torch.Tensor) -> dict[str, float]:
        return compute_metrics(videos, params * (len(videos) // len(params)), reference)

    return score


def toy_world(cfg: RunConfig, device: torch.device | str = "cpu", *, training: bool = False) -> World:
    if training:
        check_toy_training(cfg, dist.world_size())  # before the dataset is rendered or any model is built
    parts = toy_parts(cfg)
    world = World(
        latent_shape=world_latent_shape(cfg, parts.codec.z_dim),
        uncond=parts.uncond,
        kind="toy",
        view_scale=VIEW_SCALE["toy"],
        device=device,
        load_text=lambda: parts.text,
        load_codec=lambda: parts.codec.to(device),
    )
    if training:
        train = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
        val = toy_tensors(cfg.toy, parts.codec, parts.text, split="val")
        if tuple(train.latents.shape[1:]) != world.latent_shape:
            raise ConfigError(
                f"config key `toy`: the toy dataset's latents are {tuple(train.latents.shape[1:])}, the world expects "
                f"{world.latent_shape}"
            )
        world.source = TensorSource(
            train.latents, train.context, cfg.optim.micro_batch_size,
            rank=dist.rank(), world_size=dist.world_size(), seed=cfg.train.seed, device=device,
        )  # fmt: skip
        world.sample_prompts = list(cfg.logging.sample_prompts) or val.captions[: cfg.logging.sample_count]
        world.sample_context = parts.text.encode(world.sample_prompts)[0]
        world.sample_scorer = toy_scorer(cfg, world.sample_prompts, val)
    return world
