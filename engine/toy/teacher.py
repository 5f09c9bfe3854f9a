"""The toy teacher: a Wan2.1-architecture DiT (``toy`` preset) trained from scratch by flow matching on toy latents,
with caption conditioning and caption dropout (for CFG), through the engine's own flow-matching code.

One process on the engine's training loop: checkpoints in ``<out_dir>/checkpoints`` every ``save_every`` steps (exact
resume), progress and ``train.log``, an exponential moving average of the weights (the exported teacher). The EMA
weights are exported in the diffusers layout to ``export_dir`` (what ``model.checkpoint`` of the toy recipes points
at).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from engine.config import ModelConfig, ToyTeacherConfig
from engine.diffusion.flow import FlowSchedule
from engine.models.checkpoint import save_weights
from engine.models.wan import WanModel
from engine.train import runlock
from engine.train.engines import TorchEngine
from engine.train.guards import NonFiniteWeightsError, weights_finite
from engine.train.loop import Loop, LoopSettings, Update
from engine.train.timer import PhaseTimer


def lr_at(cfg: ToyTeacherConfig, step: int) -> float:
    """Warm-up, constant, then a linear decay over the last ``decay_fraction`` of the steps (warmup-stable-decay):
    unlike a cosine, the constant phase lets a run be extended (more steps) without a jump in the learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.steps - decay_start)
    return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * min(1.0, progress))


def flow_matching_loss(
    model, x0: torch.Tensor, context: torch.Tensor, schedule: FlowSchedule, rng: torch.Generator
) -> torch.Tensor:
    """mean ||v_hat(x_t, t, c) - (e - x0)||^2 with sigma ~ shift(U[0, 1]) per sample."""
    sigma = schedule.sample_sigmas(x0.shape[0], rng)
    noise = torch.randn(x0.shape, generator=rng)
    x_t = schedule.add_noise(x0, noise, sigma)
    v = model(x_t, schedule.timestep(sigma), context)
    return (v.float() - schedule.velocity_target(x0, noise)).square().mean()


class TeacherTrainer:
    """The toy teacher's method on the engine's loop (engine/train/loop.py): one ``teacher`` update per step (AdamW,
    gradient clipping), then the EMA. Its state (EMA weights, the random generator drawing batches, timesteps and
    noise) is checkpointed with the model and optimizer, so a resumed run continues exactly."""

    name = "teacher"

    def __init__(self, cfg: ToyTeacherConfig, model_cfg: ModelConfig, schedule: FlowSchedule, data, uncond):
        """data: (latents (N, C, F, h, w), context (N, L, D)), or a source whose ``batch(step, batch_size)`` returns
        such a pair for each step (engine/toy/procedural.py); uncond: (1, L, D) empty-prompt embedding."""
        self.cfg, self.model_cfg, self.schedule = cfg, model_cfg, schedule
        self.source = data if hasattr(data, "batch") else None
        self.latents, self.context = (None, None) if self.source else data
        self.uncond = uncond
        torch.manual_seed(cfg.seed)
        self.model = WanModel(model_cfg)
        self.model.init_weights()
        self.ema = WanModel(dataclasses.replace(model_cfg, gradient_checkpointing=False))
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engines = {"teacher": TorchEngine(self.model, opt, cfg.grad_clip, grad_accum_steps=cfg.grad_accum_steps)}
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.timer = PhaseTimer()
        self.samples_per_step = cfg.batch_size
        self.out = Path(cfg.out_dir)

    # -- state -----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])

    def rank_state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_rank_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])

    def log_scalars(self, seconds: float, steps: int) -> dict[str, float]:
        self.timer.pop()
        return {}

    def export(self) -> Path:
        """The EMA weights in the diffusers layout; refused (NonFiniteWeightsError) when they are not finite."""
        if not weights_finite([self.ema]):
            raise NonFiniteWeightsError(f"non-finite teacher EMA weights: export to {self.cfg.export_dir} refused")
        return save_weights(self.ema, self.model_cfg, self.cfg.export_dir)

    # -- training --------------------------------------------------------------------------------------------------

    def _batch(self, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            latents, context = self.source.batch(step, self.cfg.batch_size)
        else:
            idx = torch.randint(self.latents.shape[0], (self.cfg.batch_size,), generator=self.rng)
            latents, context = self.latents[idx], self.context[idx].clone()
        drop = torch.rand(self.cfg.batch_size, generator=self.rng) < self.cfg.caption_dropout
        context[drop] = self.uncond[0]
        return latents, context

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        d = min(self.cfg.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - d)

    def updates(self, step: int, batch=None):
        lr = lr_at(self.cfg, step)
        for group in self.engines["teacher"].optimizer.param_groups:
            group["lr"] = lr
        x0, context = self._batch(step)
        k = self.cfg.grad_accum_steps  # the step's clips in k micro-batches, one optimizer update
        for i, (x, c) in enumerate(zip(x0.chunk(k), context.chunk(k))):
            loss = flow_matching_loss(self.model, x, c, self.schedule, self.rng)
            update = Update("teacher", loss, {"loss": loss.detach(), "lr": torch.tensor(lr)}, micro=i, micros=k)
            yield update
        if update.applied:  # after the loop applied the update; a skipped one leaves the average alone
            self._update_ema(step + 1)

    def run(self, progress: bool = True, *, until: int | None = None, on_step=None, after_save=None) -> dict:
        """Train to ``until`` (default ``steps``; the learning-rate schedule always follows ``steps``, so a run stopped
        early continues on the same schedule). ``on_step``/``after_save``: the loop's hooks."""
        settings = LoopSettings(
            run_dir=self.out,
            max_steps=min(until or self.cfg.steps, self.cfg.steps),
            every_steps=self.cfg.save_every,
            keep_last=2,
            log_every=self.cfg.log_every,
            progress_bar=progress,
            tensorboard=False,
        )
        t0 = time.time()
        with runlock.hold(self.out):  # one job per output directory
            loop = Loop(settings, self, on_step=on_step, after_save=after_save)
            summary = loop.run()
        loss = loop.history[-1]["loss"] if loop.history else None
        return {
            "resumed": loop.resumed_from is not None,
            "steps_run": summary["step"] - summary["start"],
            "seconds": time.time() - t0,
            "loss": loss,
        }
