"""GPU check, first step: what can be checked without a GPU. Every stage script compiles, the libraries the stages use
import, the shipped configs load, the results directory is writable with room for the distillation checkpoint.

Exit 0 with CUDA present, 3 without it (after the checks: run_all.sh then dry-runs the stages and stops), 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import py_compile
import shutil
import sys
from pathlib import Path

from common import ROOT, STAGES, device_info

NO_CUDA = 3
LIBRARIES = ("torch", "triton", "deepspeed", "diffusers", "nvidia.dali", "engine.distill.job", "engine.diffusion.vif",
             "kernels.adaln", "kernels.interp_unet", "test_bench_kernels", "test_bench_vif")  # fmt: skip
MIN_FREE_GIB = 10  # the distillation stage's checkpoint: three reduced-depth 1.3B models with optimizer states


def checks(results: Path) -> list[str]:
    """The problems found (empty: all good)."""
    problems = []
    here = Path(__file__).resolve().parent
    for stage in STAGES:
        if not (here / f"stage_{stage}.py").is_file():
            problems.append(f"benchmarks/gpu/stage_{stage}.py is missing")
    for script in sorted(here.glob("*.py")):
        try:
            py_compile.compile(str(script), doraise=True)
        except py_compile.PyCompileError as exc:
            problems.append(f"{script.relative_to(ROOT)} does not compile: {exc.msg.strip().splitlines()[-1]}")
    for name in LIBRARIES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (any import failure is a finding)
            problems.append(f"import {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    from engine.config import ConfigError, load_config

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        try:
            load_config(path)
        except ConfigError as exc:
            problems.append(f"{path.relative_to(ROOT)}: {exc}")
    try:
        results.mkdir(parents=True, exist_ok=True)
        (results / ".probe").write_text("")
        (results / ".probe").unlink()
        free = shutil.disk_usage(results).free / 2**30
        if free < MIN_FREE_GIB:
            problems.append(f"{results}: {free:.1f} GiB free, the distillation stage needs about {MIN_FREE_GIB}")
    except OSError as exc:
        problems.append(f"{results} is not a writable directory ({exc})")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True)
    args = p.parse_args()
    results = Path(args.results)
    problems = checks(results)
    import torch

    info = device_info()
    record = {"stage": "preflight", "problems": problems, "cuda": torch.cuda.is_available(), "device": info}
    results.mkdir(parents=True, exist_ok=True)
    (results / "preflight.json").write_text(json.dumps(record, indent=1))
    for line in problems:
        print(f"preflight: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"preflight: stage scripts compile, {len(LIBRARIES)} libraries import, configs load; device {info['name']}")
    return 0 if torch.cuda.is_available() else NO_CUDA


if __name__ == "__main__":
    sys.exit(main())
