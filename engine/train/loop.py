"""The training loop every job runs (distillation, the interpolator, the toy teacher): steps, non-finite skipping,
checkpoints, logging, resume. It knows nothing of any method's losses or roles.

A method hands the loop the updates of one step, one at a time, as a generator of :class:`Update` (role, loss,
metrics): the loop runs ``backward`` + ``step`` on that role's engine before asking for the next update, so a later
update of the same step sees the earlier one applied (DMD2's critic trains on the freshly updated generator). The
method owns its engines, its schedule (which roles update at a step, e.g. the 5:1 rule) and its state (random
generators, EMA caches); the loop checkpoints all of it and resumes it exactly.

A non-finite loss, or a non-finite gradient norm at the optimizer step (engine/train/guards.py), skips that update on
every rank: counted per role and per cause, logged (with the parts of the loss that were not finite, when the method
names them in ``Update.checks``); ``max_nonfinite_in_a_row`` skipped updates of one role in a row stop the run (each
role counts its own: a critic that trains fine does not hide a generator that never does). The loop sets
``Update.applied`` before it asks the method for the next update, so a method commits state that belongs to an applied
update only (the regression EMA) after the ``yield``. Non-finite weights are never checkpointed or exported: the run
stops with :class:`engine.train.guards.NonFiniteWeightsError` and the previous checkpoint stays ``latest``. Metrics
stay on the device and reach the host at log steps, as means over the window and the ranks. SIGTERM and SIGINT save a
checkpoint at the next step boundary on every rank and stop the run (engine/train/signals.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.config import RunConfig
from engine.train import accum, dist, guards, signals
from engine.train import checkpoint as ckpt
from engine.train.errors import TrainingStopped
from engine.train.observe import Observer
from engine.train.timer import PhaseTimer


class NonFiniteLossError(TrainingStopped):
    """Too many consecutive updates of one role were skipped (non-finite loss or gradient norm)."""


@dataclass
class Update:
    """One optimizer update of a step: ``loss`` goes through ``engines[role]``; ``metrics`` are detached scalars."""

    role: str
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    checks: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named parts of the loss (device bool scalars: finite on this rank), read only when the loss is not finite, to
    say which part was not (e.g. the teacher's or the critic's score)."""
    applied: bool | None = None
    """Set by the loop before the method resumes: whether this update reached the weights (known at the last
    micro-batch; None before it)."""
    micro: int = 0
    """Index of this micro-batch within its optimizer update (gradient accumulation, docs/method.md)."""
    micros: int = 1
    """Micro-batches of the update (the engine's gradient_accumulation_steps): the loop runs backward on each and
    decides the non-finite skip once, at the last, for the whole update."""


class Method(Protocol):
    name: str
    """Progress-bar label and the prefix of its training scalars ("distill", "interp", "teacher")."""
    engines: dict[str, Any]
    """role -> engine (DeepSpeed engine or :class:`engine.train.engines.TorchEngine`): backward, step, checkpoints."""
    timer: PhaseTimer
    samples_per_step: int
    """Samples one rank consumes per step (for samples/s; the ranks of a sequence-parallel group share theirs)."""

    def updates(self, step: int, batch: Any) -> Iterator[Update]: ...

    def state_dict(self) -> dict: ...  # identical on every rank

    def load_state_dict(self, state: dict) -> None: ...

    def rank_state_dict(self) -> dict: ...  # this rank's own (its random generator)

    def load_rank_state_dict(self, state: dict) -> None: ...

    def log_scalars(self, seconds: float, steps: int) -> dict[str, float]: ...  # extra scalars at a log step


class Source(Protocol):
    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopSettings:
    run_dir: Path
    max_steps: int
    every_steps: int
    keep_last: int
    resume: str = "auto"
    log_every: int = 10
    max_nonfinite_in_a_row: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    text_log: bool = True
    wandb_mode: str = "disabled"
    wandb_project: str | None = None
    run_config: dict | None = None  # the resolved config, for W&B

    @classmethod
    def of(cls, cfg: RunConfig, max_steps: int | None = None) -> LoopSettings:
        c, lg = cfg.checkpoint, cfg.logging
        return cls(
            run_dir=Path(lg.run_dir),
            max_steps=cfg.train.max_steps if max_steps is None else max_steps,
            every_steps=c.every_steps,
            keep_last=c.keep_last,
            resume=c.resume,
            log_every=lg.log_every,
            max_nonfinite_in_a_row=cfg.train.max_nonfinite_in_a_row,
            progress_bar=lg.progress_bar,
            tensorboard=lg.tensorboard,
            wandb_mode=lg.wandb.mode,
            wandb_project=lg.wandb.project,
            run_config=dataclasses.asdict(cfg),
        )


class _Window:
    """Metric sums over the logging window, on the device (no host sync per step); a role's metrics may appear at
    some steps only (the generator's, 1 step in 5), so each key keeps its own count."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.seconds, self.steps = 0.0, 0

    def add(self, metrics: dict[str, torch.Tensor], seconds: float) -> None:
        for k, v in metrics.items():
            v = v.detach().float().reshape(())
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.seconds += seconds
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Collective: the window means, averaged over ranks (every rank logs the same keys at the same steps)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        device = dist.device()  # metrics may live on the host (a float grad norm) or the device
        stacked = torch.stack([(self.sums[k] / self.counts[k]).to(device) for k in keys])
        stacked = dist.all_reduce_sum(stacked) / dist.world_size()
        return dict(zip(keys, stacked.tolist()))


class Loop:
    """``Loop(settings, method, source).run()``; hooks: ``on_step(loop, metrics)`` on every rank after each step
    (``metrics=None`` once before the first), ``after_save(loop, path)`` (collective), ``sampler(step)`` every
    ``sample_every`` steps and at the end (see :meth:`_sample` for what it returns), ``exporter()`` at
    the end of a run that trained, or whose export is missing (``export_done()`` says whether it is there). ``meta``
    is kept in every checkpoint (e.g. the teacher fingerprint)."""

    def __init__(
        self,
        settings: LoopSettings,
        method: Method,
        source: Source | None = None,
        *,
        cfg: RunConfig | None = None,
        on_step: Callable[[Loop, dict | None], None] | None = None,
        after_save: Callable[[Loop, Path], None] | None = None,
        sampler: Callable[[int], list[Path] | None] | None = None,
        sample_every: int = 0,
        exporter: Callable[[], None] | None = None,
        export_done: Callable[[], bool] | None = None,
        meta: dict | None = None,
    ):
        self.s, self.method, self.source, self.cfg = settings, method, source, cfg
        self.on_step, self.after_save = on_step, after_save
        self.sampler, self.sample_every = sampler, sample_every
        self.exporter, self.export_done = exporter, export_done
        self.meta = dict(meta or {})
        self.ckpt_dir = Path(settings.run_dir) / "checkpoints"
        self.step = 0
        self.skipped = {role: 0 for role in method.engines}
        self.in_a_row = {role: 0 for role in method.engines}  # consecutive skipped updates, per role
        self.nonfinite: dict[str, dict[str, int]] = {role: {} for role in method.engines}  # role -> cause -> count
        self.history: list[dict[str, float]] = []  # one row per log step: {"step", metric means}
        self.resumed_from: Path | None = None
        self.observer = Observer(settings, method) if dist.is_main() else None
        self.window = _Window()
        self._flags, self._micro = accum.FiniteFlags(), accum.MicroMetrics()  # of the micro-batches of an update

    # -- state -----------------------------------------------------------------------------------------------------

    def _shared_state(self) -> dict:
        state = {"step": self.step, "method": self.method.state_dict(), "skipped": dict(self.skipped)}
        nonfinite = {role: dict(c) for role, c in self.nonfinite.items()}
        return {**state, "in_a_row": dict(self.in_a_row), "nonfinite": nonfinite, **self.meta}

    def _rank_state(self) -> dict:
        data = self.source.state_dict() if self.source is not None else {}
        return {"method": self.method.rank_state_dict(), "data": data, "rank": dist.rank()}

    def _check_weights(self, what: str) -> None:
        """Collective: raise NonFiniteWeightsError (after one log line) when a trained role's weights are not
        finite on some rank; nothing is written then."""
        bad = guards.nonfinite_roles(self.method.engines)
        if bad:
            msg = f"step {self.step}: non-finite weights in {', '.join(bad)}: {what} refused"
            if what == "checkpoint":
                msg += f" (the previous checkpoint stays `latest`: {self._latest()})"
            self._log(msg)
            raise guards.NonFiniteWeightsError(msg)

    def _latest(self) -> str:
        latest = self.ckpt_dir / "latest"
        return latest.read_text().strip() if latest.is_file() else "none"

    def save(self) -> Path:
        self._check_weights("checkpoint")
        path = ckpt.save(
            self.ckpt_dir, self.step, self.method.engines, self._shared_state(), self._rank_state(), self.s.keep_last
        )
        if self.after_save:
            self.after_save(self, path)
        return path

    def resume(self) -> bool:
        path = ckpt.select(self.ckpt_dir, self.s.resume, note=self._log)  # collective: verified on every rank
        if path is None:
            return False
        shared, mine = ckpt.load(path, self.method.engines)
        self.step = int(shared["step"])
        self.skipped.update(shared["skipped"])
        self.in_a_row.update(shared["in_a_row"])
        self.nonfinite.update({role: dict(c) for role, c in shared.get("nonfinite", {}).items()})
        self.method.load_state_dict(shared["method"])
        self.method.load_rank_state_dict(mine["method"])
        if self.source is not None:
            self.source.load_state_dict(mine["data"])
        self.resumed_from = Path(path)
        self._log(f"resumed from {path} at step {self.step}")
        return True

    def _log(self, msg: str) -> None:
        if self.observer:
            self.observer.log_text(msg)

    def _stop_for_signal(self, signum: int, saved: bool) -> None:
        """Collective: save at this step boundary (unless just saved), then stop every rank (train/signals.py)."""
        path = self.ckpt_dir / ckpt.step_name(self.step) if saved else self.save()
        msg = f"{signals.name(signum)} at step {self.step}: saved checkpoint {path}; re-run the same command to resume"
        self._log(msg)
        raise signals.Interrupted(msg, signum)

    # -- one step --------------------------------------------------------------------------------------------------

    def _bad_checks(self, update: Update) -> list[str]:
        """Collective (only on the skip path, which every rank takes together): the named parts of the loss that
        were not finite on some rank."""
        if not update.checks:
            return []
        names = sorted(update.checks)
        bad = torch.stack([(~update.checks[k].detach().reshape(()).bool()).float() for k in names])
        bad = dist.all_reduce_sum(bad.to(dist.device())).tolist()
        return [k for k, v in zip(names, bad) if v > 0]

    def _skip(self, role: str, cause: str, parts: Sequence[str] = ()) -> None:
        """Count a skipped update of ``role`` (``cause``: "loss" or "grad_norm"; ``parts``: the loss's non-finite
        parts), log it, stop the run after ``max_nonfinite_in_a_row`` of them in a row."""
        self.skipped[role] += 1
        self.in_a_row[role] += 1
        for key in (cause, *parts):
            self.nonfinite[role][key] = self.nonfinite[role].get(key, 0) + 1
        what = {"loss": "loss", "grad_norm": "gradient norm"}[cause]
        detail = f" ({', '.join(parts)})" if parts else ""
        self._log(f"step {self.step}: non-finite {role} {what}{detail}, update skipped on all ranks")
        n = self.in_a_row[role]
        if n >= self.s.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"{n} consecutive {role} updates were skipped for a non-finite loss or gradient norm "
                f"(train.max_nonfinite_in_a_row={self.s.max_nonfinite_in_a_row})"
            )

    def _accumulate(self, update: Update) -> None:
        """A micro-batch before the last of its update: backward + step (DeepSpeed only accumulates), and its loss's
        finiteness kept on the device for the one decision at the update's last micro-batch (no host sync here)."""
        engine = self.method.engines[update.role]
        accum.check_boundary(engine, update, False)
        self._flags.add(update)
        with self.method.timer(f"{update.role}_backward"):
            engine.backward(update.loss)
        engine.step()

    def _apply(self, update: Update) -> bool | None:
        """backward + step when the loss is finite on every rank and the gradient norm at the optimizer step too;
        otherwise skip everywhere (the gradients discarded) and count it. With gradient accumulation the micro-batches
        before the last accumulate (None) and the decision covers every micro-batch of the update. One host sync per
        update: the finiteness of the update's losses (a device bool over its micro-batches) is folded into the
        gradient check of the step (DeepSpeed's or ours) at the last micro-batch, see :func:`guards.nan_unless`;
        only a skipped update reads it again, to name the cause."""
        engine, loss, role = self.method.engines[update.role], update.loss, update.role
        if update.micro < update.micros - 1:
            self._accumulate(update)
            return None
        accum.check_boundary(engine, update, True)
        finite = self._flags.finite(update)  # a device bool: every micro-batch of the update, on this rank
        with self.method.timer(f"{role}_backward"):
            engine.backward(guards.nan_unless(finite, loss))  # a non-finite micro-batch poisons the whole step
        own_check = not guards.deepspeed_guards(engine)
        if own_check and not dist.all_true(guards.local_grads_finite(engine), device=loss.device):
            guards.discard_step(engine)
            self._skip(role, *self._cause(update, finite))
            return False
        with self.method.timer("optimizer"):
            engine.step()
        if not guards.step_applied(engine):  # DeepSpeed's own check discarded the step
            self._skip(role, *self._cause(update, finite))
            return False
        self.in_a_row[role] = 0
        return True

    def _cause(self, update: Update, finite: torch.Tensor) -> tuple[str, list[str]]:
        """Collective, on the skip path only: ("loss", its non-finite parts) when the loss was not finite on some
        rank, else ("grad_norm", [])."""
        if dist.all_true(finite, device=update.loss.device):
            return "grad_norm", []
        return "loss", self._bad_checks(update)

    def train_step(self) -> dict[str, torch.Tensor]:
        batch = None
        if self.source is not None:
            with self.method.timer("data"):
                batch = self.source.next_batch()
        metrics: dict[str, torch.Tensor] = {}
        for update in self.method.updates(self.step, batch):
            update.applied = self._apply(update)  # before the method resumes (it may commit state then)
            if update.applied and hasattr(self.method.engines[update.role], "get_global_grad_norm"):
                norm = self.method.engines[update.role].get_global_grad_norm()
                if norm is not None:  # DeepSpeed knows it at the accumulation boundary only; a tensor stays put
                    update.metrics[f"grad_norm_{update.role}"] = torch.as_tensor(norm)
            if update.micros > 1:  # an accumulated update logs the means over its micro-batches
                update.metrics = self._micro.add(update)
            metrics.update(update.metrics)
        return metrics

    def _log_step(self, step: int) -> None:
        """Collective: window means over ranks, the method's own scalars; rank 0 writes them."""
        w, self.window = self.window, _Window()
        means = w.means()
        extra = self.method.log_scalars(w.seconds, w.steps)
        samples_s = self.method.samples_per_step * dist.data_world_size() * w.steps / max(w.seconds, 1e-9)
        self.history.append({"step": step, **means, "samples_per_s": samples_s})
        if self.observer:
            skipped = {f"skipped/{k}": float(v) for k, v in self.skipped.items()}
            skipped |= {
                f"nonfinite/{r}/{c}": float(n) for r, causes in self.nonfinite.items() for c, n in causes.items()
            }
            self.observer.log(step, means, {**extra, "perf/samples_per_s": samples_s, **skipped})

    # -- the loop --------------------------------------------------------------------------------------------------

    def _sample(self) -> None:
        """The sampler (collective). What it returns on rank 0, ``{"videos": [mp4 paths], "quality": report}``, goes
        to the observer: the videos to its media loggers, a quality report to its scalars and warnings."""
        out = self.sampler(self.step)
        if self.observer and out:
            if out.get("videos"):
                self.observer.log_videos(self.step, out["videos"])
            if out.get("quality"):
                self.observer.quality(self.step, out["quality"])

    def run(self) -> dict:
        self.resume()
        s = self.s
        if self.on_step:
            self.on_step(self, None)  # before the first step (after any resume)
        if self.observer:
            self.observer.start(self.step, s.max_steps)
        first_step, last_sampled = self.step, None
        stop = signals.StopOnSignal().install()  # SIGTERM/SIGINT: save at the next step boundary, then stop
        try:
            while self.step < s.max_steps:
                ckpt._fault("step", self.step)
                t0 = time.perf_counter()
                metrics = self.train_step()
                self.step += 1
                self.window.add(metrics, time.perf_counter() - t0)
                if self.on_step:
                    self.on_step(self, metrics)
                if self.observer:
                    self.observer.advance()
                if self.step % s.log_every == 0 or self.step == s.max_steps:
                    self._log_step(self.step)
                saved = self.step % s.every_steps == 0 or self.step == s.max_steps
                if saved:
                    self.save()
                if signum := stop.requested():  # collective on the hosts (gloo): one 8-byte all-reduce, no device sync
                    self._stop_for_signal(signum, saved)
                if self.sampler and self.sample_every and self.step % self.sample_every == 0:
                    self._sample()
                    last_sampled = self.step
            stop.restore(redeliver=True)
            ran = self.step > first_step  # a re-run of a finished job does nothing but report
            if self.sampler and ran and last_sampled != self.step:
                self._sample()
            if self.exporter and (ran or not (self.export_done and self.export_done())):
                self._check_weights("export")
                self.exporter()
        finally:
            stop.restore()
            if self.observer:
                self.observer.close()
        summary = {"step": self.step, "start": first_step, "skipped": dict(self.skipped), "rank": dist.rank()}
        return {**summary, "nonfinite": {role: dict(c) for role, c in self.nonfinite.items()}}
