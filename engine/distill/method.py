"""The distillation method (paper Algorithm 1): DMD2 with the adaptive regression and temporal regularization losses.

The method owns the roles, the losses, the 5:1 schedule and its random generators; the loop (engine/train/loop.py)
applies the updates it yields, checkpoints and logs. Every random draw takes an explicit generator: ``rng`` (per
data-parallel rank: noise, timesteps; the ranks of a sequence-parallel group share their samples, hence their draws)
and ``shared`` (identical on every rank: the backward-simulation exit step, because under ZeRO-3 every rank must run
the same number of forwards).

Non-finite values are never papered over: a non-finite teacher or critic score makes the DMD term, hence the
generator loss, non-finite (engine/losses/dmd.py), and the loop skips that update, naming the branch from
``Update.checks`` (teacher_score, critic_score, loss_reg, loss_temp, ...). The regression EMA moves only with a
generator update the loop applied (committed after the ``yield``, when ``Update.applied`` is known).
"""

from __future__ import annotations

import torch

from engine.config import RunConfig
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import guided_velocity
from engine.distill.ema import PartitionedEMA
from engine.distill.roles import Roles
from engine.losses import AdaptiveRegressionLoss, critic_flow_loss, dmd_loss, temporal_regularization
from engine.models.flops import dit_forward_flops, train_passes
from engine.train import dist
from engine.train.loop import Update
from engine.train.observe import peak_tflops
from engine.train.timer import PhaseTimer
from engine.worlds.source import Batch


class DMDMethod:
    name = "distill"

    def __init__(self, cfg: RunConfig, roles: Roles, uncond_context: torch.Tensor, latent_shape, device):
        self.cfg, self.roles, self.device = cfg, roles, device
        self.engines = {"generator": roles.generator, "critic": roles.critic}
        self.samples_per_step = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps
        e = cfg.method.ema
        self.ema = PartitionedEMA(roles.generator, e.decay, e.start_step) if e.enabled else None
        # per data-parallel rank: the ranks of a sequence-parallel group hold one sample between them
        self.rng = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + dist.data_rank())
        self.shared = torch.Generator().manual_seed(cfg.train.seed)  # identical on every rank
        self.uncond = uncond_context.to(device)  # (1, L, D)
        self.latent_shape = tuple(latent_shape)  # (C, F, H, W)
        d = cfg.diffusion
        self.schedule = FlowSchedule(d.num_train_timesteps, d.shift)
        self.sigmas = self.schedule.student_sigmas(d.student_timesteps).to(device)  # (K,)
        r = cfg.method.regression
        self.regression = AdaptiveRegressionLoss(len(d.student_timesteps), r.k, r.ema_decay, r.adaptive).to(device)
        self.timer = PhaseTimer(events=cfg.logging.phase_timing)
        fwd = dit_forward_flops(roles.model_cfg, self.latent_shape[1:], self.uncond.shape[1])
        self.flops_per_forward, self.tokens_per_sample = fwd["total"], fwd["tokens"]
        self.train_passes = train_passes(roles.model_cfg, self.latent_shape[1:], self.uncond.shape[1])
        self.flops = 0.0  # model FLOPs run since the last pop_flops() (forward 1x, forward + backward train_passes)

    def _count(self, samples: int, passes: float) -> None:
        self.flops += samples * passes * self.flops_per_forward

    def pop_flops(self) -> float:
        out, self.flops = self.flops, 0.0
        return out

    # -- schedule --------------------------------------------------------------------------------------------------

    def is_generator_step(self, step: int) -> bool:
        """DMD2's two-timescale rule: the critic updates every step, the generator every critic_per_generator-th."""
        return step % self.cfg.method.critic_per_generator == 0

    def updates(self, step: int, batch: Batch | list[Batch]):
        """The critic updates every step; on generator steps the generator updates first (the loop applies each
        update before the next is computed, so the critic then trains on the updated generator's samples). With
        gradient accumulation ``batch`` holds the step's micro-batches: each update runs over all of them, and the
        regression EMA and the generator EMA move once per applied update."""
        batches = batch if isinstance(batch, list) else [batch]
        n = len(batches)
        if self.is_generator_step(step):
            stats = None
            for i, b in enumerate(batches):
                loss, metrics, checks, pending = self.generator_losses(b, self.rng, self.shared)
                update = Update("generator", loss, metrics, checks, micro=i, micros=n)
                yield update
                if pending is not None:
                    stats = pending if stats is None else stats + pending
            if update.applied and stats is not None:  # a skipped update leaves the regression EMA as it was
                self.regression.commit(self.regression.blend(stats))
            if update.applied and self.ema is not None:
                self.ema.update(step)
        if not self.cfg.method.dmd.enabled:  # the critic serves the DMD term only (a regression-only fine-tune)
            return
        for i, b in enumerate(batches):
            loss, metrics = self.critic_loss(b, self.rng, self.shared)
            yield Update("critic", loss, metrics, micro=i, micros=n)

    # -- pieces ----------------------------------------------------------------------------------------------------

    def _noise(self, shape, rng: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=rng, device=rng.device).to(self.device)

    def _x0(self, model, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x0 prediction of a velocity model at per-sample sigma (B,)."""
        v = model(x, self.schedule.timestep(sigma), context)
        return self.schedule.x0_from_velocity(x, v.float(), sigma)

    def _rollout_input(self, prompts: torch.Tensor, rng, shared) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation (DMD2): run the student schedule without gradient up to a random step k; return the
        noisy input x_{t_k} (B, C, F, H, W) and its sigma (B,) for the step that will carry gradient."""
        b, g = prompts.shape[0], self.roles.generator.module
        k = int(torch.randint(len(self.sigmas), (1,), generator=shared))  # identical on every rank
        x = self._noise((b, *self.latent_shape), rng)
        self._count(b * k, 1)
        with torch.no_grad():
            for i in range(k):
                x0 = self._x0(g, x, self.sigmas[i].expand(b), prompts)
                x = self.schedule.add_noise(x0, self._noise(x0.shape, rng), self.sigmas[i + 1].expand(b))
        return x, self.sigmas[k].expand(b)

    def _draw_sigma(self, b: int, rng) -> torch.Tensor:
        d = self.cfg.diffusion
        return self.schedule.sample_sigmas(b, rng, lo=d.dmd_timestep_min, hi=d.dmd_timestep_max, device=self.device)

    @torch.no_grad()
    def _scores(self, x: torch.Tensor, prompts: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (CFG) and critic x0 predictions on a re-noised copy of generator samples x."""
        d, b = self.cfg.diffusion, x.shape[0]
        sigma = self._draw_sigma(b, rng)
        x_t = self.schedule.add_noise(x, self._noise(x.shape, rng), sigma)
        t = self.schedule.timestep(sigma)
        uncond = self.uncond.expand(b, -1, -1)
        cfg_passes = 2 if d.guidance_scale != 0 or d.guidance_form != "standard" else 1
        self._count(b, cfg_passes + (2 if self.cfg.method.fake_guidance_scale > 0 else 1))
        with self.timer("teacher"):
            v_real = guided_velocity(
                self.roles.teacher.module, x_t, t, prompts, uncond, d.guidance_scale, d.guidance_form
            )
        with self.timer("critic_eval"):
            critic, scale = self.roles.critic.module, self.cfg.method.fake_guidance_scale
            v_fake = guided_velocity(critic, x_t, t, prompts, uncond, scale) if scale > 0 else critic(x_t, t, prompts)
        x0 = lambda v: self.schedule.x0_from_velocity(x_t, v.float(), sigma)  # noqa: E731
        return x0(v_real), x0(v_fake)

    # -- the two updates -------------------------------------------------------------------------------------------

    def generator_losses(self, batch: Batch, rng, shared) -> tuple[torch.Tensor, dict, dict, torch.Tensor | None]:
        """L_G = L_DMD + w_reg * w * L_reg + w_temp * L_temp (Eq. 9) from one generator forward over both branches.
        Returns (loss, metrics, checks: the finiteness of each part as device bools, the regression EMA's pending
        statistics: sums and counts per timestep, over the ranks)."""
        m = self.cfg.method
        with self.timer("rollout"):
            x_k, s_k = self._rollout_input(batch.prompts, rng, shared)
        inputs, sigmas, contexts = [x_k], [s_k], [batch.prompts]
        use_reg = m.regression.enabled and batch.real_latents is not None
        if use_reg:
            y = batch.real_latents.float()
            t_idx = torch.randint(len(self.sigmas), (y.shape[0],), generator=rng, device=rng.device).to(self.device)
            y_sigma = self.sigmas[t_idx]
            inputs.append(self.schedule.add_noise(y, self._noise(y.shape, rng), y_sigma))
            sigmas.append(y_sigma)
            contexts.append(batch.real_context)
        self._count(sum(i.shape[0] for i in inputs), self.train_passes)
        with self.timer("generator_forward"):
            x0 = self._x0(self.roles.generator, torch.cat(inputs), torch.cat(sigmas), torch.cat(contexts))
        x = x0[: x_k.shape[0]]  # generator samples, DMD branch (B, C, F, H, W)
        zero = x.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        checks: dict[str, torch.Tensor] = {"generator_sample": torch.isfinite(x).all()}
        loss_dmd, pending = zero, None
        if m.dmd.enabled:
            real_x0, fake_x0 = self._scores(x.detach(), batch.prompts, rng)
            checks.update(teacher_score=torch.isfinite(real_x0).all(), critic_score=torch.isfinite(fake_x0).all())
            loss_dmd, grad = dmd_loss(x, real_x0, fake_x0)
            metrics["dmd_grad_norm"] = grad.norm()
            checks["loss_dmd"] = torch.isfinite(loss_dmd)
        loss_temp, variance = temporal_regularization(x, m.temporal.eps, m.temporal.power, m.temporal.tau)
        if not m.temporal.enabled:
            loss_temp = zero
        loss_reg = zero
        if use_reg:
            with self.timer("regression"):
                reduce = dist.data_all_reduce_sum  # each sample once, not once per rank of its group
                loss_reg, info = self.regression(x0[x_k.shape[0] :], y, t_idx, reduce, commit=False)
            pending = info["stats"]
            metrics.update(reg_weight_mean=info["weights"].mean(), reg_loss_raw=info["per_sample"].mean())
            for k, t in enumerate(self.cfg.diffusion.student_timesteps):
                sel = (t_idx == k).float()  # mean adaptive weight of this timestep's samples (0 when none)
                metrics[f"reg_weight/t{t:g}"] = (info["weights"] * sel).sum() / sel.sum().clamp(min=1)
        total = m.dmd.weight * loss_dmd + m.regression.weight * loss_reg + m.temporal.weight * loss_temp
        metrics.update(loss_dmd=loss_dmd.detach(), loss_reg=loss_reg.detach(), loss_temp=loss_temp.detach())
        metrics.update(temporal_variance=variance.detach(), loss_generator=total.detach())
        checks.update({k: torch.isfinite(v).all() for k, v in (("loss_reg", loss_reg), ("loss_temp", loss_temp))})
        return total, metrics, checks, pending

    def critic_loss(self, batch: Batch, rng, shared) -> tuple[torch.Tensor, dict]:
        """Flow matching of the critic on fresh generator samples (Eq. 2)."""
        with self.timer("rollout"):
            x_k, s_k = self._rollout_input(batch.prompts, rng, shared)
            with torch.no_grad():
                x = self._x0(self.roles.generator.module, x_k, s_k, batch.prompts)
        self._count(x.shape[0], 1 + self.train_passes)  # the sample, then the critic's forward + backward
        sigma = self._draw_sigma(x.shape[0], rng)
        noise = self._noise(x.shape, rng)
        with self.timer("critic_forward"):
            v = self.roles.critic(
                self.schedule.add_noise(x, noise, sigma), self.schedule.timestep(sigma), batch.prompts
            )
        loss = critic_flow_loss(v, x, noise)
        return loss, {"loss_critic": loss.detach()}

    # -- state -----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"regression": self.regression.state_dict(), "shared_rng": self.shared.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.regression.load_state_dict(state["regression"])
        self.shared.set_state(state["shared_rng"])

    def rank_state_dict(self) -> dict:
        state = {"rng": self.rng.get_state()}
        return state if self.ema is None else {**state, "generator_ema": self.ema.state_dict()}

    def load_rank_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        if self.ema is not None:  # a checkpoint of a run without the EMA starts it from the resumed weights
            self.ema.load_state_dict(state.get("generator_ema"))

    def log_scalars(self, seconds: float, steps: int) -> dict[str, float]:
        """Per-phase wall time, tokens/s, MFU (model FLOPs over the peak of every device), the regression EMA. The
        FLOPs counted are those of this rank's samples, which its sequence-parallel group (if any) shares: the job
        runs them once per data-parallel rank."""
        world, data, seconds = dist.world_size(), dist.data_world_size(), max(seconds, 1e-9)
        out = {f"time/{k}": v / max(steps, 1) for k, v in self.timer.pop().items()}
        samples_s = self.samples_per_step * data * steps / seconds
        out["perf/tokens_per_s"] = samples_s * self.tokens_per_sample
        out["perf/mfu"] = self.pop_flops() * data / seconds / (peak_tflops(self.cfg) * 1e12 * world)
        out["perf/step_s"] = seconds / max(steps, 1)
        for k, v in zip(self.cfg.diffusion.student_timesteps, self.regression.ema.tolist()):
            out[f"reg_ema/t{k:g}"] = v
        return out
