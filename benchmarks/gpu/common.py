"""What the stages of the GPU check (benchmarks/gpu/run_all.sh) share: their arguments, the device and its peaks,
timing, and the stage record each writes to ``<results>/<stage>.json``.

A record is rewritten after every row, so a stage that its time budget cuts off still leaves what it measured
(status ``running``; the summary reports it as cut off). ``--dry-run`` runs the same code on tiny shapes on the CPU:
it proves the stage's path (imports, model and engine construction, the measurement loop, the record) and measures
nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "benchmarks", ROOT / "benchmarks" / "kernels"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from engine import console  # noqa: E402

console.install()  # the launchers' filter of known library noise (VIDISTILL_VERBOSE=1 shows it)

STAGES = ("gpu_tests", "kernels", "dit", "distill", "vif")
# Wan2.1 1.3B at 832x480x81: latent (16, 21, 60, 104), patch (1, 2, 2) -> 32,760 tokens; umT5 context 512 x 4096.
LATENT = (16, 21, 60, 104)
TEXT_LEN = 512


def stage_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--results", required=True, help="directory the stage record <stage>.json goes to")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: check the path, measure nothing")
    p.add_argument("--budget", type=float, default=60.0, help="seconds this stage may take (work is sized to it)")
    if extra:
        extra(p)
    return p.parse_args()


def device_info() -> dict[str, Any]:
    """The device the stage runs on, with its peak bandwidth and bf16 TFLOP/s when known (kernel benchmark tables)."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if not torch.cuda.is_available():
        return {**info, "name": "cpu", "peak_gbps": None, "peak_tflops": None}
    from test_bench_kernels import PEAK_GBPS, PEAK_TFLOPS

    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    return {
        **info,
        "name": name,
        "capability": list(torch.cuda.get_device_capability()),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "peak_gbps": next((v for k, v in PEAK_GBPS.items() if k in name), None),
        "peak_tflops": next((v for k, v in PEAK_TFLOPS.items() if k in name), None),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` calls (synchronized around each call on CUDA)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


class Stage:
    """``with Stage("dit", args) as st: st.add(row)``: the record, written after every change; an exception marks it
    failed with its one-line reason (the traceback goes to stderr) and exits non-zero."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.path = Path(args.results) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.args = args
        self.record: dict[str, Any] = {
            "stage": name,
            "status": "running",
            "dry_run": bool(args.dry_run),
            "budget_s": args.budget,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_info(),
            "rows": [],
            "notes": [],
        }
        if not args.dry_run and not torch.cuda.is_available():
            raise SystemExit(f"{name}: needs CUDA (use --dry-run on a CPU)")

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.args.dry_run else "cuda")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.args.dry_run else torch.bfloat16

    def left(self) -> float:
        """Seconds of the budget not yet spent."""
        return self.args.budget - (time.perf_counter() - self.t0)

    def add(self, row: dict[str, Any]) -> None:
        self.record["rows"].append(row)
        self.write()

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.record["notes"].append(text)
        self.write()

    def set(self, **fields: Any) -> None:
        self.record.update(fields)
        self.write()

    def write(self) -> None:
        self.record["seconds"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        os.replace(tmp, self.path)

    def __enter__(self) -> Stage:
        self.write()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            self.set(status="dry-run ok" if self.args.dry_run else "ok")
            return False
        if isinstance(exc, SystemExit):
            return False
        traceback.print_exception(kind, exc, tb)
        first = (str(exc).strip().splitlines() or [kind.__name__])[0]
        self.set(status="failed", error=f"{kind.__name__}: {first[:300]}")
        raise SystemExit(1)
