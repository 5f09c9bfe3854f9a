"""Adaptive regression loss on real latents (paper Eqs. 5-7) with its per-timestep EMA cache.

Per sample s with student timestep index k: L_s = mean (y_hat - y)^2 (x0 space). Weight
w_s = 1 - sigmoid(kappa (L_s - Lbar_k)), with Lbar_k the EMA *before* this step's update (Eq. 7 uses s - 1; the
released code updates first: we follow the paper). A timestep seen for the first time has no EMA yet: its weight uses
Lbar = L_s (w = 0.5), and its batch mean initializes the EMA. Then Lbar_k <- a Lbar_k + (1 - a) mean_{s: k_s = k} L_s,
the means taken over all ranks (sums and counts all-reduced) so every rank holds the same cache. No host sync.
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
        n = self.ema.numel()
        losses = losses.detach().float()
        valid = torch.isfinite(losses)  # a non-finite sample (its step gets skipped) must not poison the cache
        stats = torch.zeros(2, n, device=self.ema.device)
        stats[0].index_add_(0, t_index, torch.where(valid, losses, torch.zeros_like(losses)))
        stats[1].index_add_(0, t_index, valid.float())
        if all_reduce is not None:
            stats = all_reduce(stats)
        present = stats[1] > 0
        mean = stats[0] / stats[1].clamp(min=1)
        blended = torch.where(self.seen, self.decay * self.ema + (1 - self.decay) * mean, mean)
        self.ema.copy_(torch.where(present, blended, self.ema))
        self.seen.logical_or_(present)

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, t_index: torch.Tensor, all_reduce: AllReduce | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted loss mean_s(w_s L_s) and diagnostics; updates the EMA after computing the weights."""
        losses = per_sample_mse(pred, target)  # (B,)
        w = self.weights(losses, t_index)
        loss = (w * losses).mean()
        self.update(losses, t_index, all_reduce)
        return loss, {"per_sample": losses.detach(), "weights": w.detach()}
