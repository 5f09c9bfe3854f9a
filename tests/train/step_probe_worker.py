"""Worker of the hot-loop tests: the real distillation job (tests/distill/ds_worker.py's world and tiny teacher) with
two probes installed, results out as JSON on rank 0.

    torchrun --nproc_per_node N tests/train/step_probe_worker.py OUT.json RUN.yaml [overrides...]

* Host syncs. Every call that makes the host wait for the device, as far as a CPU run can see one, is counted
  between consecutive ``on_step`` calls (so an interval holds one trainer step plus whatever the loop did after the
  step before it): ``Tensor.item``, ``tolist``, ``__float__``, ``__int__``, ``__index__``, ``__bool__``, ``cpu``,
  ``numpy`` and ``torch.cuda.synchronize``. A device-to-host copy by ``.to("cpu")`` or ``copy_`` into a host tensor
  cannot be told apart from a host-to-host copy on CPU and is not counted (the engine makes none in a step). Each call
  is recorded with the first frame outside torch that made it (``file:function``).
* ZeRO-3 trace invalidations. DeepSpeed's ``PartitionedParameterCoordinator._invalidate_trace`` is wrapped and
  counted per role (teacher, generator, critic), as is every top-level forward that starts without a complete trace
  (``reset_step`` leaving it not complete): those forwards run without prefetching.
"""

import collections
import inspect
import json
import sys
from pathlib import Path

import torch
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

from engine.config import load_config
from engine.distill.job import run_distillation
from engine.train import dist
from engine.train.zero_trace import GradTrace, coordinator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: torchrun puts only this directory
from tests.distill.ds_worker import make_world  # noqa: E402

SYNCING = ("item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu", "numpy")
ROOT = Path(__file__).resolve().parents[2]


def _site() -> str:
    """file:function of the innermost caller outside torch (and outside this file)."""
    for frame in inspect.stack()[2:]:
        path = Path(frame.filename)
        if "torch" in path.parts or path == Path(__file__):
            continue
        parts = path.parts
        if "site-packages" in parts:  # a library, wherever the environment lives (also inside the checkout)
            name = "/".join(parts[parts.index("site-packages") + 1 :])
        else:
            try:
                name = str(path.resolve().relative_to(ROOT))
            except ValueError:
                name = str(path)
        return f"{name}:{frame.function}"
    return "?"


class SyncCounter:
    def __init__(self):
        self.active, self.calls = False, []

    def install(self) -> None:
        for name in SYNCING:
            setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        torch.cuda.synchronize = self._wrap(torch.cuda.synchronize, "cuda.synchronize")

    def _wrap(self, fn, name):
        def counted(*args, **kwargs):
            if self.active:
                self.active = False  # what the recording itself touches is not the step's
                try:
                    self.calls.append(f"{name} {_site()}")
                finally:
                    self.active = True
            return fn(*args, **kwargs)

        return counted

    def take(self) -> list[str]:
        out, self.calls = self.calls, []
        return out


class TraceCounter:
    """Per coordinator: invalidations, and top-level forwards that started without a complete trace."""

    def __init__(self):
        self.invalidated = collections.Counter()
        self.unprefetched = collections.Counter()

    def install(self) -> None:
        coordinator_cls, counter = PartitionedParameterCoordinator, self
        invalidate, reset = coordinator_cls._invalidate_trace, coordinator_cls.reset_step

        def _invalidate_trace(self):
            counter.invalidated[id(self)] += 1
            return invalidate(self)

        def reset_step(self):
            out = reset(self)
            if not self.is_complete_trace():
                counter.unprefetched[id(self)] += 1
            return out

        coordinator_cls._invalidate_trace = _invalidate_trace
        coordinator_cls.reset_step = reset_step

    def take(self, coordinators: dict[str, int]) -> dict:
        out = {
            "invalidated": {r: self.invalidated[c] for r, c in coordinators.items()},
            "unprefetched_forwards": {r: self.unprefetched[c] for r, c in coordinators.items()},
        }
        self.invalidated.clear()
        self.unprefetched.clear()
        return out


def main():
    out = Path(sys.argv[1])
    cfg = load_config(sys.argv[2], sys.argv[3:])
    syncs, traces = SyncCounter(), TraceCounter()
    syncs.install()
    traces.install()
    rows, coords, loops = [], {}, []

    def on_step(loop, metrics):
        syncs.active = False
        calls = syncs.take()
        if metrics is None:
            loops.append(loop)
            roles = loop.method.roles
            coords.update({r: id(coordinator(getattr(roles, r))) for r in ("teacher", "generator", "critic")})
            traces.take(coords)  # what the build did is not a step's
        else:
            updates = 2 if loop.method.is_generator_step(loop.step - 1) else 1
            rows.append({"step": loop.step, "updates": updates, "syncs": calls, **traces.take(coords)})
        syncs.active = True

    summary = run_distillation(cfg, make_world, on_step=on_step)
    syncs.active = False
    roles = loops[0].method.roles
    dropped = {  # traces the keeper (engine/train/zero_trace.py) invalidated itself
        r: sum(h.dropped for h in getattr(roles, r).module._forward_pre_hooks.values() if isinstance(h, GradTrace))
        for r in ("generator", "critic")
    }
    if dist.is_main():
        out.write_text(json.dumps({"summary": summary, "rows": rows, "dropped": dropped}, indent=1))


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
