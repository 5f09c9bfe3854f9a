"""Distribution matching (DMD2, paper Eq. 4) and the critic's flow-matching loss (Eq. 2).

The DMD gradient compares the teacher's (real score) and the critic's (fake score) x0 predictions on a re-noised
generator sample x: grad = (f - r) / mean_{C,F,H,W}|x - r| per sample. The loss 0.5 ||x - sg(x - grad)||^2 (mean) has
d loss / d x = grad / numel, so back-propagating it pushes G's samples along -grad.
"""

from __future__ import annotations

import torch


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """(f - r) / mean_{C,F,H,W} |x - r| per sample; a sample with a zero normalizer (x == r: the teacher already
    predicts the sample, no direction to push) gets zero. All (B, C, F, H, W); fp32 out.

    Only that 0 division is zeroed. A non-finite score (teacher or critic x0 prediction) or sample stays non-finite:
    zeroing it would turn a broken teacher or critic into a silent loss_dmd = 0 and an update that trains the generator
    on the other terms alone; non-finite, the loss makes the loop skip the generator update, count it and say which
    score it was (engine/distill/method.py)."""
    x, r, f = x.float(), real_x0.float(), fake_x0.float()
    dims = tuple(range(1, x.ndim))
    normalizer = (x - r).abs().mean(dim=dims, keepdim=True)  # (B, 1, 1, 1, 1)
    degenerate = normalizer == 0
    grad = (f - r) / torch.where(degenerate, torch.ones_like(normalizer), normalizer)
    return torch.where(degenerate & torch.isfinite(f - r), torch.zeros_like(grad), grad)


def dmd_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): loss = 0.5 * mean((x - sg(x - grad))^2), differentiable in x only."""
    with torch.no_grad():
        grad = dmd_gradient(x, real_x0, fake_x0)
        target = x.float() - grad
    return 0.5 * (x.float() - target).square().mean(), grad


def critic_flow_loss(pred_velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the critic on generator samples: mean((v_hat - (e - x0))^2)."""
    return (pred_velocity.float() - (noise.float() - x0.float())).square().mean()
