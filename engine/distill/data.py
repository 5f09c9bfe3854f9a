"""What the trainer consumes each step: prompts for the distribution-matching branch and real (latent, caption)
pairs for the regression branch, from a source whose position is part of the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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

    Each epoch is a seeded permutation shared by all ranks; rank r reads positions r, r + W, r + 2W, ... of it, so
    ranks see disjoint samples covering the epoch. The position (epoch, cursor) is the resumable state.
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
        per_rank = latents.shape[0] // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"{latents.shape[0]} samples cannot fill a batch of {batch_size} on each of {world_size} ranks"
            )
        self.latents, self.context = latents, context
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.seed, self.device = seed, device
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.latents.shape[0], generator=g)
        usable = (perm.numel() // self.world) * self.world
        return perm[:usable][self.rank :: self.world]  # this rank's share of the epoch

    def next_indices(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self._order.numel():
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx

    def next_batch(self) -> Batch:
        real = self.next_indices()
        prompts = self.next_indices()  # a separate draw: the DMD branch needs captions only
        to = dict(device=self.device)
        return Batch(
            prompts=self.context[prompts].to(**to),
            real_latents=self.latents[real].to(**to),
            real_context=self.context[real].to(**to),
        )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()
