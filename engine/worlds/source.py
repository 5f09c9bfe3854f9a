"""What the trainer consumes each step: prompts for the distribution-matching branch and real (latent, caption)
pairs for the regression branch, from a source whose position is part of the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.data.sampler import Position, ShardedOrder


@dataclass
class Batch:
    prompts: torch.Tensor
    """(B, L, D) text embeddings that condition the generator's own samples (DMD branch)."""
    real_latents: torch.Tensor | None = None
    """(B, C, F, H, W) normalized latents of real clips (regression branch)."""
    real_context: torch.Tensor | None = None
    """(B, L, D) text embeddings of the real clips' captions."""


class TrainSource(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TensorSource:
    """Latents and text embeddings held in memory (the toy world, precomputed caches that fit in RAM, tests).

    The order is the data pipeline's (``engine.data.sampler.ShardedOrder``): each epoch a seeded permutation shared by
    all ranks, rank r reading positions r, r + W, r + 2W, ... of it, a batch continuing into the next epoch when one
    ends. The position (epoch, cursor) is the resumable state. Each batch draws its regression pairs, then separately
    its DMD prompts (the DMD branch needs captions only).
    """

    def __init__(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if latents.shape[0] != context.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {context.shape[0]} text embeddings")
        if latents.shape[0] // world_size < batch_size:
            raise ValueError(
                f"{latents.shape[0]} samples cannot fill a batch of {batch_size} on each of {world_size} ranks"
            )
        self.latents, self.context = latents, context
        self.batch_size, self.device = batch_size, device
        self.order = ShardedOrder(latents.shape[0], rank=rank, world_size=world_size, seed=seed)
        self.position = Position()
        self._stream = None

    def next_indices(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = self.order.items(self.position)
        idx = []
        for _ in range(self.batch_size):
            item = next(self._stream)
            idx.append(item.index)
            self.position = item.after
        return torch.tensor(idx)

    def next_batch(self) -> Batch:
        real = self.next_indices()
        prompts = self.next_indices()
        to = dict(device=self.device)
        return Batch(
            prompts=self.context[prompts].to(**to),
            real_latents=self.latents[real].to(**to),
            real_context=self.context[real].to(**to),
        )

    def state_dict(self) -> dict:
        return self.order.state(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = self.order.position_from(state)
        self._stream = None
