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
