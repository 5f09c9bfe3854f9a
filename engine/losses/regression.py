"""Adaptive regression loss on real latents (paper Eqs. 5-7) with its per-timestep EMA cache.

Per sample s with student timestep index k: L_s = mean (y_hat - y)^2 (x0 space). Weight
w_s = 1 - sigmoid(kappa (L_s - Lbar_k)), with Lbar_k the EMA *before* this step's update (Eq. 7 uses s - 1; the
released code updates first: we follow the paper). A timestep seen for the first time has no EMA yet: its weight uses
Lbar = L_s (w = 0.5), and its batch mean initializes the EMA. Then Lbar_k <- a Lbar_k + (1 - a) mean_{s: k_s = k} L_s,
the means taken over all ranks (sums and counts all-reduced) so every rank holds the same cache. No host sync.

The cache should follow the updates that reached the weights only: ``forward(..., commit=False)`` computes the new
cache (with its all-reduce, at the same point of every rank's step) and returns it as ``info["pending"]`` (and the
sums behind it as ``info["stats"]``: an update accumulated over micro-batches commits ``blend`` of their sum once);
:meth:`commit` folds it in once the trainer applied the update, and a skipped update just drops it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # in-place sum across ranks, returns its argument


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error over all but the batch dim, in fp32."""
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


class AdaptiveRegressionLoss(nn.Module):
    """Holds the EMA cache (buffers ``ema``, ``seen``: part of the state dict, hence of every checkpoint)."""

    def __init__(self, num_timesteps: int, k: float = 3.0, decay: float = 0.95, adaptive: bool = True):
        super().__init__()
        self.k, self.decay, self.adaptive = k, decay, adaptive
        self.register_buffer("ema", torch.zeros(num_timesteps))
        self.register_buffer("seen", torch.zeros(num_timesteps, dtype=torch.bool))

    def weights(self, losses: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """(B,) adaptive weights from detached losses and the EMA before this step (1 when not adaptive)."""
        if not self.adaptive:
            return torch.ones_like(losses)
        prev = torch.where(self.seen[t_index], self.ema[t_index], losses.detach())
        return 1 - torch.sigmoid(self.k * (losses.detach() - prev))

    @torch.no_grad()
    def update(self, losses: torch.Tensor, t_index: torch.Tensor, all_reduce: AllReduce | None = None) -> None:
        """Fold this step's per-timestep mean losses (over every rank) into the EMA."""
        self.commit(self.pending(losses, t_index, all_reduce))

    @torch.no_grad()
    def pending(
        self, losses: torch.Tensor, t_index: torch.Tensor, all_reduce: AllReduce | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (ema, seen) this step's per-timestep mean losses (over every rank) lead to; nothing changes yet."""
        return self.blend(self.stats(losses, t_index, all_reduce))

    @torch.no_grad()
    def stats(self, losses: torch.Tensor, t_index: torch.Tensor, all_reduce: AllReduce | None = None) -> torch.Tensor:
        """(2, K): per-timestep sums and counts of the finite losses, over every rank. The stats of several
        micro-batches add up to those of their union (one accumulated update folds their sum in once)."""
        n = self.ema.numel()
        losses = losses.detach().float()
        valid = torch.isfinite(losses)  # a non-finite sample (its step gets skipped) must not poison the cache
        stats = torch.zeros(2, n, device=self.ema.device)
        stats[0].index_add_(0, t_index, torch.where(valid, losses, torch.zeros_like(losses)))
        stats[1].index_add_(0, t_index, valid.float())
        if all_reduce is not None:
            stats = all_reduce(stats)
        return stats

    @torch.no_grad()
    def blend(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (ema, seen) that :meth:`stats` lead to."""
        present = stats[1] > 0
        mean = stats[0] / stats[1].clamp(min=1)
        blended = torch.where(self.seen, self.decay * self.ema + (1 - self.decay) * mean, mean)
        return torch.where(present, blended, self.ema), self.seen | present

    @torch.no_grad()
    def commit(self, pending: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Make a :meth:`pending` cache the current one."""
        ema, seen = pending
        self.ema.copy_(ema)
        self.seen.copy_(seen)

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        t_index: torch.Tensor,
        all_reduce: AllReduce | None = None,
        commit: bool = True,
    ) -> tuple[torch.Tensor, dict]:
        """Weighted loss mean_s(w_s L_s) and diagnostics; updates the EMA after computing the weights, or with
        ``commit=False`` leaves it as it is and returns the new one as ``info["pending"]`` (for :meth:`commit`)."""
        losses = per_sample_mse(pred, target)  # (B,)
        w = self.weights(losses, t_index)
        loss = (w * losses).mean()
        stats = self.stats(losses, t_index, all_reduce)
        pending = self.blend(stats)
        if commit:
            self.commit(pending)
        info = {"per_sample": losses.detach(), "weights": w.detach()}
        return loss, info if commit else {**info, "pending": pending, "stats": stats}
