"""Flow matching as Wan2.1 uses it (docs/wan.md#flow-matching, docs/method.md#flow-matching).

    x_t = (1 - s) x0 + s e,   v = e - x0,   x0 = x_t - s v,   model timestep t = T s  (T = 1000)

Timestep shift: s' = shift s / (1 + (shift - 1) s). Every random draw takes an explicit ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) sigmas -> (B, 1, ..., 1) broadcastable against ``like`` (B, C, F, H, W), in like's dtype."""
    return s.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class FlowSchedule:
    num_train_timesteps: int = 1000
    shift: float = 5.0

    # -- sigma <-> timestep ----------------------------------------------------------------------------------------

    def shift_sigma(self, s: torch.Tensor) -> torch.Tensor:
        """s' = shift s / (1 + (shift - 1) s); maps [0, 1] onto itself, pushing mass toward noise for shift > 1."""
        return self.shift * s / (1 + (self.shift - 1) * s)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timestep input t = T sigma."""
        return sigma * self.num_train_timesteps

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma = t / T."""
        return torch.as_tensor(t, dtype=torch.float32) / self.num_train_timesteps

    # -- the forward process and conversions -----------------------------------------------------------------------

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - s) x0 + s e with a per-sample sigma (B,)."""
        s = _per_sample(sigma, x0)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Training target of the model: v = e - x0."""
        return noise - x0

    @staticmethod
    def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - s v."""
        return x_t - _per_sample(sigma, x_t) * v

    @staticmethod
    def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """v = (x_t - x0) / s (undefined at s = 0)."""
        return (x_t - x0) / _per_sample(sigma, x_t)

    # -- grids and draws -------------------------------------------------------------------------------------------

    def sample_sigmas(
        self,
        batch: int,
        generator: torch.Generator,
        *,
        lo: float = 0.0,
        hi: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """(B,) sigmas of the DMD/critic draw: u ~ U[0, 1], shifted, clamped to [lo, hi] (docs/method.md#dmd-loss)."""
        u = torch.rand(batch, generator=generator, device=generator.device).to(device)
        return self.shift_sigma(u).clamp(lo, hi)

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """(steps + 1,) decreasing sigmas of the teacher's Euler sampler: the shifted linspace(1, 0), ending at 0."""
        return self.shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).float()

    def student_sigmas(self, timesteps: list[float]) -> torch.Tensor:
        """(K,) sigmas of the student's timesteps (given directly as model timesteps, e.g. [1000, 900, 757, 522])."""
        return torch.tensor(timesteps, dtype=torch.float32) / self.num_train_timesteps
