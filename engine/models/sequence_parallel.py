"""Ulysses sequence parallelism for the DiT (``parallel.sequence_parallel``; docs/architecture.md#sequence-parallelism).

The ranks of a group hold one batch between them, each a contiguous shard of every sample's tokens. Everything in
a block but self-attention is token-wise (adaLN, the FFN, the gated residuals) or reads the whole text context that
every rank holds (cross-attention), so it runs on the shard alone. Self-attention swaps the split with DeepSpeed's
``DistributedAttention``: an all-to-all turns (B, N/P, H, Dh) shards of q, k and v into (B, N, H/P, Dh), whole
sequences of H/P heads, the local kernel attends, and the inverse all-to-all brings the output back to the token
shards. The head count must be a multiple of P (checked at config time).

A token count P does not divide is padded at the end of the sequence to the next multiple; the padding tokens sit in
the last shards, their keys are cut off before the kernel (engine/models/attention.py: ``valid``) and their outputs
dropped when the shards are gathered.

Gradients. Every rank of a group computes the same loss from the gathered output, so the group's objective is the
sum of P copies of it. The gather's backward is its exact adjoint for that sum (the output gradients all-reduced over
the group, each rank keeping its shard's rows), so a rank's parameter gradient is P times its shard's share of one
copy's. ZeRO-3 averages gradients over every rank of the world (P x the data-parallel ranks), which turns that into
the mean over the data-parallel ranks of each sample group's full gradient: what data parallelism over the groups
alone computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from engine.models.attention import attention


class _GatherTokens(torch.autograd.Function):
    """(B, n, C) shards -> (B, P n, C) on every rank of the group; backward: the adjoint (sum over the group, own
    rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        tdist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, group=ctx.group)
        return grad.narrow(1, ctx.rank * ctx.n, ctx.n), None, None, None


class SequenceParallel:
    """One sequence-parallel group as the model sees it: its process group, size and this rank's position, and the
    DeepSpeed all-to-all attention over it. Not an ``nn.Module`` (it holds no weights and stays out of ZeRO-3's
    module tree)."""

    def __init__(self, group, size: int, rank: int):
        from deepspeed.sequence.layer import DistributedAttention

        if size < 2 or not 0 <= rank < size:
            raise ValueError(f"a sequence-parallel group needs size >= 2 and 0 <= rank < size, got {size}, {rank}")
        self.group, self.size, self.rank = group, size, rank
        # batch-first (B, N, H, Dh): heads (dim 2) scattered, tokens (dim 1) gathered
        self._attention = DistributedAttention(attention, group, scatter_idx=2, gather_idx=1)

    @classmethod
    def of_layout(cls, layout) -> SequenceParallel | None:
        """From an ``engine.train.dist.SequenceLayout`` (None: no sequence parallelism)."""
        return None if layout is None else cls(layout.group, layout.size, layout.rank)

    def shard(self, tokens: int) -> Shard:
        """Where this rank's shard of a ``tokens``-long sequence lies (padded to a multiple of the group size)."""
        n = math.ceil(tokens / self.size)
        return Shard(self, tokens, n * self.size, self.rank * n, (self.rank + 1) * n)


@dataclass(frozen=True)
class Shard:
    """This rank's part of one forward's token sequence: tokens ``start .. stop - 1`` of ``padded`` (``total`` real
    ones, the rest padding at the end)."""

    sp: SequenceParallel
    total: int
    padded: int
    start: int
    stop: int

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) whole sequence -> (B, n, D) this rank's shard (padded with zeros where it runs past N)."""
        pad = self.padded - x.shape[1]
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
        return x[:, self.start : self.stop].contiguous()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, C) shards -> (B, N, C) the whole sequence on every rank of the group, padding dropped."""
        sp = self.sp
        return _GatherTokens.apply(x, sp.group, sp.size, sp.rank)[:, : self.total]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        """Self-attention of (B, n, H, Dh) shards over the whole sequence (padding keys excluded): (B, n, H, Dh)."""
        return self.sp._attention(q, k, v, 0, None, backend, self.total)
