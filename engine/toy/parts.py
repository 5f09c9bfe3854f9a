"""The toy world's parts from a run config: the toy codec and text encoder (checked against the config), the empty
prompt's embedding and the flow schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ConfigError, RunConfig
from engine.diffusion.flow import FlowSchedule
from engine.toy.codec import ASSET, ToyCodec
from engine.toy.text import ToyTextEncoder


@dataclass
class ToyParts:
    codec: ToyCodec
    text: ToyTextEncoder
    uncond: torch.Tensor  # (1, L, D) empty-prompt embedding
    schedule: FlowSchedule


def toy_parts(cfg: RunConfig) -> ToyParts:
    """Codec and text encoder of the toy world, checked against the run config before anything heavy runs."""
    if cfg.vae.kind != "toy" or cfg.text_encoder.kind != "toy":
        raise ConfigError("config key `vae.kind`: the toy world needs vae.kind=toy and text_encoder.kind=toy")
    codec = ToyCodec.load(cfg.vae.path or ASSET)
    if (codec.temporal_stride, codec.spatial_stride) != (cfg.vae.temporal_stride, cfg.vae.spatial_stride):
        raise ConfigError(
            f"config key `vae.spatial_stride`: the toy codec has strides (temporal {codec.temporal_stride}, spatial "
            f"{codec.spatial_stride}), the config says ({cfg.vae.temporal_stride}, {cfg.vae.spatial_stride})"
        )
    if codec.z_dim != cfg.model.in_dim:
        raise ConfigError(f"config key `model.in_dim`: {cfg.model.in_dim} != the toy codec's {codec.z_dim} channels")
    text = ToyTextEncoder(dim=cfg.model.text_dim, max_length=cfg.text_encoder.max_length)
    uncond, _ = text.encode([cfg.text_encoder.negative_prompt])
    d = cfg.diffusion
    return ToyParts(codec, text, uncond, FlowSchedule(d.num_train_timesteps, d.shift))
