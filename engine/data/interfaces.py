"""The two interfaces the trainer sees for conditioning and latents. Real (umT5, AutoencoderKLWan) and toy
implementations both satisfy them, so the engine never branches on which world it runs in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TextEncoder(Protocol):
    """Prompts -> fixed-length embeddings.

    ``encode`` returns ``(emb, lengths)``: ``emb`` is ``(B, max_length, dim)`` float, rows past each prompt's true
    length are exactly zero (trim to the true length, then zero-pad: docs/wan.md#umt5); ``lengths`` is ``(B,)``
    int64. Deterministic for a given prompt.
    """

    dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class VideoCodec(Protocol):
    """Pixel video <-> normalized latents (the VAE role).

    ``encode``: ``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, z_dim, F, H / spatial_stride, W / spatial_stride)`` with
    ``F = 1 + (T - 1) / temporal_stride``, already normalized (per-channel mean/std) so the DiT sees ~unit variance.
    ``decode`` is the inverse, output clamped to [-1, 1].
    """

    z_dim: int
    temporal_stride: int
    spatial_stride: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def latent_shape(codec: VideoCodec, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F, h, w) of the latent of a clip of ``num_frames`` frames at ``height x width`` pixels."""
    if (num_frames - 1) % codec.temporal_stride:
        raise ValueError(f"num_frames={num_frames} is not of the form {codec.temporal_stride}k+1")
    if height % codec.spatial_stride or width % codec.spatial_stride:
        raise ValueError(f"{height}x{width} is not divisible by the codec's spatial stride {codec.spatial_stride}")
    f = 1 + (num_frames - 1) // codec.temporal_stride
    return codec.z_dim, f, height // codec.spatial_stride, width // codec.spatial_stride
