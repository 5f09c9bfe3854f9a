"""Finite-value guards of the training loop: a non-finite gradient norm skips the update, non-finite weights are never
checkpointed or exported.

Where a gradient is checked depends on who holds it at the optimizer step:

* DeepSpeed with ZeRO (stages 1-3) or a bf16/fp16 optimizer wrapper computes the global gradient norm of the reduced
  partitions inside ``engine.step()`` (one small all-reduce, which clipping pays anyway) and discards a step whose norm
  is non-finite: ZeRO-3 always, ZeRO-1/2 in fp32/fp16 and in bf16 with ``bf16.check_grad_overflow`` (DeepSpeed's
  default), the bf16/fp16 wrappers always. It clears the gradients itself (ZeRO-3: ``zero_grad`` resets the
  accumulation so the next backward copies instead of adding), and ``engine.was_step_applied()`` says it happened.
* DeepSpeed at stage 0 without a precision wrapper (the plain client optimizer) and :class:`TorchEngine` step
  whatever they hold: there the loop checks the module's gradients itself (full gradients, identical on every rank
  after DeepSpeed's all-reduce) before ``step()``, agrees on every rank and discards them.

Weights: under ZeRO-3 each rank checks its own partition (``ds_tensor``), elsewhere the full parameter; every rank
agrees through one collective.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engine.train import dist
from engine.train.errors import TrainingStopped


class NonFiniteWeightsError(TrainingStopped):
    """A trained model holds NaN or inf weights: nothing is checkpointed or exported."""


def _is_deepspeed(engine) -> bool:
    return hasattr(engine, "zero_optimization_stage") and hasattr(engine, "was_step_applied")


def at_boundary(engine) -> bool:
    """Whether the coming ``step()`` applies the optimizer (DeepSpeed accumulates between boundaries)."""
    return engine.is_gradient_accumulation_boundary() if hasattr(engine, "is_gradient_accumulation_boundary") else True


def deepspeed_guards(engine) -> bool:
    """Whether ``engine.step()`` itself discards a step with a non-finite gradient norm (see the module docstring)."""
    if not _is_deepspeed(engine):
        return False
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return bool(engine.bfloat16_enabled() or engine.fp16_enabled())
    if stage in (1, 2):
        opt = engine.optimizer
        checks = getattr(opt, "dtype", None) != torch.bfloat16 or getattr(opt, "check_grad_overflow", True)
        return bool(getattr(opt, "compute_grad_norm", True) and checks)
    return True


def _module(engine) -> torch.nn.Module:
    return engine.module


def local_grads_finite(engine) -> torch.Tensor:
    """Whether this rank's module gradients are all finite, as a device bool (no host sync: :func:`dist.all_true`
    reads it). For engines :func:`deepspeed_guards` is False."""
    grads = [p.grad for p in _module(engine).parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=dist.device())
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def nan_unless(finite: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` times 1 when ``finite`` (a device bool), else times NaN, decided on the device. Back-propagated, the
    NaN reaches the gradients (the output layer's at least: its gradient is the loss's, times NaN), so a non-finite
    loss fails the gradient check of the optimizer step, and the loop needs no host sync of its own to decide it;
    times 1 changes no bit of the loss or of any gradient. (A loss whose every path to the weights is masked, e.g. by
    a ``where``, would escape; every loss of the engine has an unmasked squared-error term.)"""
    return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)


def discard_step(engine) -> None:
    """Drop the gradients of this update and apply nothing. A DeepSpeed engine (stage 0, client optimizer) still runs
    ``step()``, over zeroed gradients and with the optimizer's own step switched off for that call, so its micro-step,
    accumulation and step counters stay where an applied step leaves them (skipping ``step()`` would shift every
    later accumulation boundary); the optimizer state (moments, step count) and the learning-rate schedule are
    untouched."""
    if not _is_deepspeed(engine):
        if hasattr(engine, "discard"):
            engine.discard()  # TorchEngine: drops the gradients and its accumulation boundary
        else:
            engine.optimizer.zero_grad(set_to_none=True)
        return
    for p in _module(engine).parameters():
        if p.grad is not None:
            p.grad.zero_()
    with _switched_off(engine.optimizer), _switched_off(getattr(engine, "lr_scheduler", None)):
        engine.step()
    engine.zero_grad()


class _switched_off:
    """``obj.step`` does nothing inside the block (shadowed on the instance; what the instance had is restored: a torch
    scheduler wraps its optimizer's ``step`` on the instance)."""

    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        if self.obj is not None:
            self.saved = vars(self.obj).get("step")
            self.obj.step = lambda *args, **kwargs: None

    def __exit__(self, *exc):
        if self.obj is None:
            return
        if self.saved is None:
            del self.obj.step
        else:
            self.obj.step = self.saved


def step_applied(engine) -> bool:
    """After ``step()`` at a boundary: False when DeepSpeed discarded the step (non-finite gradient norm/overflow)."""
    return bool(engine.was_step_applied()) if _is_deepspeed(engine) else True


def _local_tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    return [getattr(p, "ds_tensor", p).detach() for m in modules for p in m.parameters()]


def weights_finite(modules: Iterable[torch.nn.Module]) -> bool:
    """Collective: every weight of every module is finite on every rank (ZeRO-3: each rank its own partition)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}  # one host sync per device (parameters may be offloaded)
    for t in _local_tensors(modules):
        if t.numel():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    flag = all(bool(torch.stack(f).all()) for f in flags.values())
    return dist.all_true(flag, device=dist.device())


def nonfinite_roles(engines: dict) -> list[str]:
    """Collective (one small all-reduce per role): the roles whose weights are not all finite on some rank."""
    return [role for role, engine in engines.items() if not weights_finite([_module(engine)])]
