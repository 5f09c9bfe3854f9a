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


class Ordered:
    """Batches of indices into ``num`` items in the data pipeline's order (``engine.data.sampler.ShardedOrder``): each
    epoch a seeded permutation shared by all ranks, rank r reading positions r, r + W, r + 2W, ... of it, a batch
    continuing into the next epoch when one ends. The position (epoch, cursor) is the resumable state."""

    what = "samples"

    def __init__(self, num: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        if num // world_size < batch_size:
            raise ValueError(f"{num} {self.what} cannot fill a batch of {batch_size} on each of {world_size} ranks")
        self.batch_size = batch_size
        self.order = ShardedOrder(num, rank=rank, world_size=world_size, seed=seed)
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

    def state_dict(self) -> dict:
        return self.order.state(self.position)

    def load_state_dict(self, state: dict) -> None:
        if "pairs" in state:
            raise ValueError(
                "data state saved with separate DMD prompts (data.dmd_prompts.source other than same); this run draws"
                " them from the regression pairs: resume with the config it was saved with"
            )
        self.position = self.order.position_from(state)
        self._stream = None


class TensorSource(Ordered):
    """Latents and text embeddings held in memory (the toy world, precomputed caches that fit in RAM, tests), in
    :class:`Ordered`'s order. Each batch draws its regression pairs, then separately its DMD prompts (the DMD branch
    needs captions only); :meth:`next_pairs` draws the pairs alone (:class:`SplitSource` brings the prompts).
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
        super().__init__(latents.shape[0], batch_size, rank=rank, world_size=world_size, seed=seed)
        self.latents, self.context = latents, context
        self.device = device

    def next_batch(self) -> Batch:
        real = self.next_indices()
        prompts = self.next_indices()
        to = dict(device=self.device)
        return Batch(
            prompts=self.context[prompts].to(**to),
            real_latents=self.latents[real].to(**to),
            real_context=self.context[real].to(**to),
        )

    def next_pairs(self) -> Batch:
        """One draw of regression pairs; the batch's DMD prompts are their captions until a SplitSource sets them."""
        real = self.next_indices()
        context = self.context[real].to(self.device)
        return Batch(prompts=context, real_latents=self.latents[real].to(self.device), real_context=context)


class PromptSource(Protocol):
    def next_prompts(self) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SplitSource:
    """A :class:`TrainSource` whose DMD prompts and regression pairs come from two streams (distillation and
    fine-tuning in one stage: broad prompts, target-domain pairs). Each keeps its own position; both are the state."""

    def __init__(self, pairs, prompts: PromptSource):
        self.pairs, self.prompts = pairs, prompts

    def next_batch(self) -> Batch:
        batch = self.pairs.next_pairs()
        batch.prompts = self.prompts.next_prompts()
        return batch

    def state_dict(self) -> dict:
        return {"pairs": self.pairs.state_dict(), "prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"pairs", "prompts"}:
            raise ValueError(
                "data state saved without separate DMD prompts (data.dmd_prompts.source=same); this run has its own "
                "prompt stream: resume with the config it was saved with"
            )
        self.pairs.load_state_dict(state["pairs"])
        self.prompts.load_state_dict(state["prompts"])

    def close(self) -> None:
        for part in (self.pairs, self.prompts):
            if hasattr(part, "close"):
                part.close()
