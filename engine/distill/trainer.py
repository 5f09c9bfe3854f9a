"""The training loop: which update runs when, checkpoints, resume, logging. It knows nothing of the method's losses.

Each trainer step updates the critic; every ``critic_per_generator``-th step also updates the generator first (the
5:1 two-timescale rule of DMD2). A non-finite loss skips that update on every rank (counted, logged); too many in a
row stop the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.distill.data import TrainSource
from engine.distill.method import DMDMethod
from engine.train import checkpoint as ckpt
from engine.train import dist
from engine.train.observe import Observer


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a non-finite loss."""


def _rng_state(g: torch.Generator) -> torch.Tensor:
    return g.get_state()


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        method: DMDMethod,
        source: TrainSource,
        *,
        sampler: Callable[[int], None] | None = None,
        exporter: Callable[[Path], None] | None = None,
        on_step: Callable[[Trainer, dict | None], None] | None = None,
        teacher_id: str | None = None,
    ):
        self.cfg, self.method, self.source = cfg, method, source
        self.teacher_id = teacher_id  # fingerprint of the teacher weights, kept in every checkpoint
        self.sampler, self.exporter, self.on_step = sampler, exporter, on_step
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        dev = method.device
        self.rng = torch.Generator(device=dev).manual_seed(cfg.train.seed * 7919 + dist.rank())  # per rank
        self.shared = torch.Generator().manual_seed(cfg.train.seed)  # identical on every rank
        self.step = 0
        self.skipped = {"generator": 0, "critic": 0}
        self.in_a_row = 0
        self.engines = {"generator": method.roles.generator, "critic": method.roles.critic}
        self.observer = Observer(cfg, method) if dist.is_main() else None
        self.losses: list[dict] = []  # per-step loss values (host floats), kept for golden-loss comparisons

    # -- state -----------------------------------------------------------------------------------------------------

    def _shared_state(self) -> dict:
        return {
            "step": self.step,
            "method": self.method.state_dict(),
            "shared_rng": self.shared.get_state(),
            "skipped": dict(self.skipped),
            "in_a_row": self.in_a_row,
            "teacher": self.teacher_id,
        }

    def _rank_state(self) -> dict:
        return {"rng": _rng_state(self.rng), "data": self.source.state_dict(), "rank": dist.rank()}

    def save(self) -> Path:
        return ckpt.save(
            self.ckpt_dir,
            self.step,
            self.engines,
            self._shared_state(),
            self._rank_state(),
            self.cfg.checkpoint.keep_last,
        )

    def resume(self) -> bool:
        path = ckpt.find_resume(self.ckpt_dir, self.cfg.checkpoint.resume) if dist.is_main() else None
        path = dist.broadcast_object(None if path is None else str(path))
        if path is None:
            return False
        shared, mine = ckpt.load(Path(path), self.engines)
        self.step, self.in_a_row, self.skipped = shared["step"], shared["in_a_row"], dict(shared["skipped"])
        self.method.load_state_dict(shared["method"])
        self.shared.set_state(shared["shared_rng"])
        self.rng.set_state(mine["rng"])
        self.source.load_state_dict(mine["data"])
        if self.observer:
            self.observer.log_text(f"resumed from {path} at step {self.step}")
        return True

    # -- one update ------------------------------------------------------------------------------------------------

    def _update(self, role: str, loss: torch.Tensor) -> bool:
        """backward + step when the loss is finite on every rank; otherwise skip everywhere and count it."""
        engine = self.engines[role]
        if not dist.all_true(bool(torch.isfinite(loss).item()), device=loss.device):
            self.skipped[role] += 1
            self.in_a_row += 1
            if self.observer:
                self.observer.log_text(f"step {self.step}: non-finite {role} loss, update skipped on all ranks")
            if self.in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{self.in_a_row} consecutive updates had a non-finite loss (train.max_nonfinite_in_a_row)"
                )
            return False
        self.in_a_row = 0
        with self.method.timer(f"{role}_backward"):
            engine.backward(loss)
        with self.method.timer("optimizer"):
            engine.step()
        return True

    def train_step(self) -> dict:
        m = self.method
        with m.timer("data"):
            batch = self.source.next_batch()
        metrics: dict[str, torch.Tensor] = {}
        if m.is_generator_step(self.step):
            loss, gm = m.generator_losses(batch, self.rng, self.shared)
            if self._update("generator", loss):
                gm["grad_norm_generator"] = torch.tensor(float(self.engines["generator"].get_global_grad_norm() or 0))
            metrics.update(gm)
        loss, cm = m.critic_loss(batch, self.rng, self.shared)
        if self._update("critic", loss):
            cm["grad_norm_critic"] = torch.tensor(float(self.engines["critic"].get_global_grad_norm() or 0))
        metrics.update(cm)
        return metrics

    # -- the loop --------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        self.resume()
        cfg = self.cfg
        if self.on_step:
            self.on_step(self, None)  # before the first step (after any resume)
        if self.observer:
            self.observer.start(self.step, cfg.train.max_steps)
        first_step, last_sampled = self.step, None
        while self.step < cfg.train.max_steps:
            ckpt._fault("step", self.step)
            t0 = time.perf_counter()
            metrics = self.train_step()
            self.step += 1
            self.losses.append({k: float(v) for k, v in metrics.items() if k.startswith("loss")})
            if self.on_step:
                self.on_step(self, metrics)
            if self.observer:
                self.observer.step(self.step, metrics, time.perf_counter() - t0, self.skipped)
            else:
                self.method.timer.pop(), self.method.pop_flops()
            if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps:
                self.save()
            if self.sampler and cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0:
                self.sampler(self.step)
                last_sampled = self.step
        ran = self.step > first_step  # a re-run of a finished job does nothing but report
        if self.sampler and ran and last_sampled != self.step:
            self.sampler(self.step)
        export = self.run_dir / "export" / "transformer"
        if self.exporter and cfg.checkpoint.export and (ran or not (export / "config.json").is_file()):
            self.exporter(export)
        if self.observer:
            self.observer.close()
        return {"step": self.step, "skipped": dict(self.skipped), "losses": self.losses, "rank": dist.rank()}
