"""Which world a run config asks for: the toy world (toy codec and text encoder) or Wan (VAE, umT5, video data)."""

from __future__ import annotations

from engine.config import ConfigError, RunConfig
from engine.distill.job import WorldFactory


def world_factory(cfg: RunConfig) -> WorldFactory:
    if cfg.vae.kind == "toy" and cfg.text_encoder.kind == "toy":
        from engine.toy.distill_world import make_toy_world

        return make_toy_world
    if cfg.vae.kind == "wan" and cfg.text_encoder.kind == "umt5":
        from engine.distill.wan_world import make_wan_world

        return make_wan_world
    raise ConfigError(
        f"config key `vae.kind`: vae.kind={cfg.vae.kind} with text_encoder.kind={cfg.text_encoder.kind} is not a "
        "world; use toy+toy or wan+umt5"
    )
