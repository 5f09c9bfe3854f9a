"""The toy world: procedural clips (engine/toy), the toy codec and the toy text encoder, all cheap enough to build on
every rank; the training source holds the train split in memory. ``data.filter`` narrows the regression pairs to a
target domain of it; ``data.dmd_prompts`` gives the DMD branch prompts of their own (the train split's captions,
filtered, or a file of toy captions), drawn in a second stream (docs/toy-world.md#domains)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import ConfigError, RunConfig
from engine.toy.captions import caption_fields, matches, parse_caption
from engine.toy.data import toy_tensors
from engine.toy.evaluate import reference_for
from engine.toy.metrics import compute_metrics
from engine.toy.parts import toy_parts
from engine.toy.render import sample_params
from engine.train import dist
from engine.worlds.base import VIEW_SCALE, World, world_latent_shape
from engine.worlds.prompts import TensorPrompts, check_prompt_count, prompt_seed, read_prompt_file
from engine.worlds.source import SplitSource, TensorSource


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
        f"{world_size} data-parallel ranks; raise toy.num_clips or lower the batch)",
    )
    p = cfg.data.dmd_prompts
    subsets = [("data.filter", cfg.data.filter)] + (
        [("data.dmd_prompts.filter", p.filter)] if p.source == "toy" else []
    )
    for key, f in subsets:  # the clips' parameters are pure functions of toy.seed: counted before any rendering
        if not f.is_empty():
            n = sum(matches(caption_fields(sample_params(cfg.toy, i)), f) for i in range(n_train))
            check_prompt_count(n, cfg.optim.micro_batch_size, world_size, "matching toy training clips", key)


def _subset(params: list, f) -> torch.Tensor | None:
    """Indices of the clips whose captioned fields match a filter (None: the filter is empty, keep all)."""
    if f.is_empty():
        return None
    return torch.tensor([i for i, q in enumerate(params) if matches(caption_fields(q), f)], dtype=torch.long)


def _dmd_prompts(cfg: RunConfig, train, text, device):
    """The DMD branch's own prompt stream (data.dmd_prompts.source toy or file), or None for the pairs' captions."""
    p = cfg.data.dmd_prompts
    if p.source == "same":
        return None
    if p.source == "toy":
        keep = _subset(train.params, p.filter)
        context = train.context if keep is None else train.context[keep]
    else:
        prompts = read_prompt_file(p.path)
        for n, prompt in enumerate(prompts, 1):
            try:
                parse_caption(prompt)
            except ValueError as exc:
                raise ConfigError(f"config key `data.dmd_prompts.path`: {p.path} prompt {n}: {exc}") from exc
        check_prompt_count(
            len(prompts), cfg.optim.micro_batch_size, dist.data_world_size(), "prompts", "data.dmd_prompts.path"
        )
        context = text.encode(prompts)[0]
    rank, ws = dist.data_rank(), dist.data_world_size()
    seed = prompt_seed(cfg.train.seed)
    return TensorPrompts(context, cfg.optim.micro_batch_size, rank=rank, world_size=ws, seed=seed, device=device)


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
        check_toy_training(cfg, dist.data_world_size())  # before the dataset is rendered or any model is built
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
        keep = _subset(train.params, cfg.data.filter)  # the regression branch's target domain
        latents, context = (
            (train.latents, train.context) if keep is None else (train.latents[keep], train.context[keep])
        )
        world.source = TensorSource(
            latents, context, cfg.optim.micro_batch_size,
            rank=dist.data_rank(), world_size=dist.data_world_size(), seed=cfg.train.seed, device=device,
        )  # fmt: skip
        prompts = _dmd_prompts(cfg, train, parts.text, device)
        if prompts is not None:
            world.source = SplitSource(world.source, prompts)
        world.sample_prompts = list(cfg.logging.sample_prompts) or val.captions[: cfg.logging.sample_count]
        world.sample_context = parts.text.encode(world.sample_prompts)[0]
        world.sample_scorer = toy_scorer(cfg, world.sample_prompts, val)
    return world
