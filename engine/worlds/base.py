"""The World every job sees, and the one latent-shape rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import ConfigError, RunConfig
from engine.data.interfaces import TextEncoder, VideoCodec

VIEW_SCALE = {"toy": 4, "wan": 1}
"""Pixel repeat of written mp4 files per world (toy clips are 32x32)."""


def kind_of(cfg: RunConfig) -> str:
    """toy (toy codec + toy text encoder) or wan (Wan VAE + umT5); any other pairing is not a world."""
    kinds = (cfg.vae.kind, cfg.text_encoder.kind)
    if kinds == ("toy", "toy"):
        return "toy"
    if kinds == ("wan", "umt5"):
        return "wan"
    raise ConfigError(
        f"config key `vae.kind`: vae.kind={kinds[0]} with text_encoder.kind={kinds[1]} is not a world; use toy+toy "
        "or wan+umt5"
    )


def latent_shape(
    num_frames: int, height: int, width: int, *, channels: int, temporal_stride: int, spatial_stride: int
) -> tuple[int, int, int, int]:
    """(C, F, h, w) of the latent of a clip of ``num_frames`` frames at ``height x width`` pixels:
    F = 1 + (num_frames - 1) / temporal_stride, h and w the pixel sizes over the spatial stride."""
    if (num_frames - 1) % temporal_stride:
        raise ValueError(f"num_frames={num_frames} is not of the form {temporal_stride}k+1")
    if height % spatial_stride or width % spatial_stride:
        raise ValueError(f"{height}x{width} is not divisible by the codec's spatial stride {spatial_stride}")
    return channels, 1 + (num_frames - 1) // temporal_stride, height // spatial_stride, width // spatial_stride


def world_latent_shape(cfg: RunConfig, channels: int | None = None) -> tuple[int, int, int, int]:
    """The latent shape of the run config's clips (data.*, vae.* strides; channels default to model.in_dim)."""
    d, v = cfg.data, cfg.vae
    c = cfg.model.in_dim if channels is None else channels
    try:
        return latent_shape(
            d.num_frames,
            d.height,
            d.width,
            channels=c,
            temporal_stride=v.temporal_stride,
            spatial_stride=v.spatial_stride,
        )
    except ValueError as exc:
        raise ConfigError(f"config key `data`: {exc}") from exc


@dataclass(eq=False)
class World:
    latent_shape: tuple[int, int, int, int]
    """(C, F, h, w) of generated and training latents."""
    uncond: torch.Tensor | None = None
    """(1, L, D) embedding of the negative prompt (CFG); see :meth:`unconditional`."""
    negative_prompt: str = ""
    source: Any = None
    """This rank's training batches (``engine.worlds.source.TrainSource``); built when asked for. With DMD prompts of
    their own (``data.dmd_prompts``) a ``SplitSource`` of the regression pairs' source and the prompt stream."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample videos written during training, and their (N, L, D) embeddings."""
    sample_context: torch.Tensor | None = None
    sample_scorer: Callable[[torch.Tensor], dict[str, float]] | None = None
    """World-specific scores of sample videos (N, 3, T, H, W) in [-1, 1] (the toy metrics), for the quality monitor."""
    kind: str = "custom"
    view_scale: int = 1
    """Pixel repeat of written mp4 files (4 in the toy world, whose clips are 32x32)."""
    device: torch.device | str = "cpu"
    load_text: Callable[[], TextEncoder] | None = None
    load_codec: Callable[[], VideoCodec] | None = None
    _text: TextEncoder | None = field(default=None, repr=False)
    _codec: VideoCodec | None = field(default=None, repr=False)

    def _loaded(self, part: str, what: str):
        if getattr(self, f"_{part}") is None:
            loader = getattr(self, f"load_{part}")
            if loader is None:
                raise RuntimeError(f"the {self.kind} world has no {what}")
            setattr(self, f"_{part}", loader())
        return getattr(self, f"_{part}")

    @property
    def text(self) -> TextEncoder:
        """The text encoder (loaded on first use)."""
        return self._loaded("text", "text encoder")

    @property
    def codec(self) -> VideoCodec:
        """The video codec (loaded on first use)."""
        return self._loaded("codec", "codec")

    def unconditional(self) -> torch.Tensor:
        """(1, L, D): ``uncond`` when the world has it (toy, a cache), else the text encoder's negative prompt."""
        if self.uncond is None:
            self.uncond = self.encode_text([self.negative_prompt])
        return self.uncond

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> (B, L, D) float32 embeddings."""
        return self.text.encode(prompts)[0]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, C, F, h, w) normalized latents."""
        return self.codec.encode(video)

    def decode(self, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """(B, C, F, h, w) latents -> (B, 3, T, H, W) in [-1, 1], ``batch`` at a time, on the codec's device."""
        with torch.no_grad():
            parts = [self.codec.decode(latents[i : i + batch].to(self.device)) for i in range(0, len(latents), batch)]
        return torch.cat(parts)
