"""The worlds a job runs in, built one way for every job (distillation, generation, interpolator training, precompute):

- ``toy``: procedural clips rendered on this machine, the toy codec and the toy text encoder (engine/toy);
- ``wan``: Wan2.1's AutoencoderKLWan and umT5 from local paths, video data from a manifest or precomputed caches.

A :class:`World` holds the latent shape, the unconditional context, the text encoder and the codec (loaded on first
use, so a job that never encodes never loads them), the training source when asked for, and the sample prompts. Its
videos follow one noise convention (``engine.diffusion.samplers``): video ``i`` of seed ``s`` draws its initial noise
and every re-noise from one generator seeded with ``video_seed(s, i)``, whatever batch or rank it lands on; so
``launcher/generate.py --seeds <video_seed(s, i)>`` reproduces it.
"""

from __future__ import annotations

import torch

from engine.config import RunConfig
from engine.worlds.base import VIEW_SCALE, World, kind_of, latent_shape, world_latent_shape


def build_world(cfg: RunConfig, device: torch.device | str = "cpu", *, training: bool = False) -> World:
    """The run config's world; ``training`` also builds this rank's training source and the sample prompts (data
    problems surface here, before any model is built)."""
    if kind_of(cfg) == "toy":
        from engine.worlds.toy import toy_world

        return toy_world(cfg, device, training=training)
    from engine.worlds.wan import wan_world

    return wan_world(cfg, device, training=training)


__all__ = ["VIEW_SCALE", "World", "build_world", "kind_of", "latent_shape", "world_latent_shape"]
