"""Keep DeepSpeed ZeRO-3's prefetch trace valid on an engine that runs forwards with and without gradient.

ZeRO-3 prefetches parameters only while its *trace* is complete: the order of submodules that one top-level forward
(and its backward) visited, recorded once and then expected again from every forward. A forward that diverges from
the trace (``Invalidate trace cache`` in ``partitioned_param_coordinator.py``) throws it away; prefetching is off for
the rest of that pass and the next forward, which records a new trace (and checks it against every other rank, one
small collective and host sync per submodule).

The distillation runs each trained engine in two patterns: no-grad forwards (the rollouts, the critic's score) and a
forward with gradient followed by its backward. A no-grad forward is a prefix of the pattern with gradient, so a
trace recorded from a pass *with* gradient serves both for ever, while one recorded from a no-grad forward breaks on
the next backward and, since a rollout comes next, is recorded from a no-grad forward again: one invalidation per
generator update, for the whole run, depending only on which pattern the engine happened to run first.
:func:`keep_grad_trace` settles it: before a forward with gradient it drops a trace that was recorded from a no-grad
forward, so that forward records the full pattern (at most once per process in a run whose patterns are fixed).
Numerics do not change: prefetching moves when parameters are gathered, never their values.
"""

from __future__ import annotations

import torch


def coordinator(engine):
    """The ZeRO-3 parameter coordinator of a DeepSpeed engine; None when it has none (ZeRO 0-2, a plain engine).
    A trained engine's is its optimizer's ``parameter_offload``; a frozen one's optimizer is the offload itself."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", getattr(engine, "optimizer", None))
    getter = getattr(offload, "get_param_coordinator", None)
    return getter() if getter is not None else None


class GradTrace:
    """Forward pre-hook of the engine's module, run before DeepSpeed's own (which starts each top-level pass with
    ``reset_step``): remembers whether the pass that recorded the current trace ran with gradient, and when a pass
    with gradient starts, invalidates a trace recorded without it (complete, or recorded by the pass before, which
    DeepSpeed would complete at this pass's reset) so that this pass records."""

    def __init__(self, coord):
        self.coord, self.from_grad, self.dropped = coord, False, 0

    def __call__(self, module, args) -> None:
        c, grad = self.coord, torch.is_grad_enabled()
        if grad and not c.is_invalid_trace() and not self.from_grad:  # complete, or about to complete at reset
            c._invalidate_trace()  # DeepSpeed's own reset of the trace (it calls it when hooks are re-registered)
            self.dropped += 1
        if c.is_invalid_trace():  # DeepSpeed's reset_step starts recording with this pass
            self.from_grad = grad


def keep_grad_trace(engine) -> GradTrace | None:
    """Install :class:`GradTrace` on a ZeRO-3 engine (no-op elsewhere); returns it (its ``dropped`` counts the
    traces it invalidated)."""
    coord = coordinator(engine)
    if coord is None or not hasattr(coord, "_invalidate_trace"):
        return None
    hook = GradTrace(coord)
    engine.module.register_forward_pre_hook(hook, prepend=True)
    return hook
