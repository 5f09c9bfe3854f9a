"""The toy teacher: a Wan2.1-architecture DiT (``toy`` preset) trained from scratch by flow matching on toy latents,
with caption conditioning and caption dropout (for CFG), through the engine's own flow-matching code.

One process, resumable (``<out_dir>/state.pt`` every ``save_every`` steps, written atomically), tqdm progress, an
exponential moving average of the weights (the exported teacher). The EMA weights are exported in the diffusers
layout to ``export_dir`` (what ``model.checkpoint`` of the toy recipes points at).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.config import ModelConfig, ToyTeacherConfig
from engine.diffusion.flow import FlowSchedule
from engine.models.checkpoint import save_weights
from engine.models.wan import WanModel

log = logging.getLogger(__name__)


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
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.out = Path(cfg.out_dir)
        self.state_path = self.out / "state.pt"

    # -- state -----------------------------------------------------------------------------------------------------

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": self.rng.get_state(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def resume(self) -> bool:
        if not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.rng.set_state(state["rng"])
        self.step = state["step"]
        return True

    def export(self) -> Path:
        return save_weights(self.ema, self.model_cfg, self.cfg.export_dir)

    # -- training --------------------------------------------------------------------------------------------------

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            latents, context = self.source.batch(self.step, self.cfg.batch_size)
        else:
            idx = torch.randint(self.latents.shape[0], (self.cfg.batch_size,), generator=self.rng)
            latents, context = self.latents[idx], self.context[idx].clone()
        drop = torch.rand(self.cfg.batch_size, generator=self.rng) < self.cfg.caption_dropout
        context[drop] = self.uncond[0]
        return latents, context

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))  # short warm-up of the average
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - d)

    def train_step(self) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.cfg, self.step)
        x0, context = self._batch()
        loss = flow_matching_loss(self.model, x0, context, self.schedule, self.rng)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self._update_ema()
        return loss.item()

    def run(self, progress: bool = True) -> dict:
        resumed = self.resume()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="toy teacher", disable=not progress)
        avg, t0, start = None, time.time(), self.step
        while self.step < self.cfg.steps:
            loss = self.train_step()
            avg = loss if avg is None else 0.98 * avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr_at(self.cfg, self.step):.2e}", refresh=False)
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self.save()
        bar.close()
        seconds = time.time() - t0
        return {"resumed": resumed, "steps_run": self.step - start, "seconds": seconds, "loss_ema": avg}
