"""Golden losses: the first 20 steps of the toy distillation (configs/toy.yaml, fp32, CPU, 2 gloo ranks) reproduce
the committed per-step losses of every rank.

A refactor of the loop, the method or the world must not change a number the engine produces; a change that does on
purpose regenerates the file (``UPDATE_GOLDEN=1``) and says why in its commit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent
GOLDEN = HERE / "golden" / "toy_distill_fp32_2rank.json"
OVERRIDES = [
    "toy.num_clips=48",
    "train.max_steps=20",
    "checkpoint.every_steps=1000",
    "checkpoint.export=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "deepspeed.dtype=fp32",
]


# The same float operations in the same order on every x86 CPU: one thread, MKL's SSE2 code path whatever the CPU
# (its AVX2/AVX-512 kernels sum in other orders, and differ between Intel and AMD), ATen's scalar kernels.
PORTABLE = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}


def run_worker(tmp_path: Path) -> dict:
    out = tmp_path / "losses.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += [str(HERE / "golden_worker.py"), str(out), f"toy.cache_dir={tmp_path / 'cache'}"]
    cmd += [f"logging.run_dir={tmp_path / 'run'}", *OVERRIDES]
    env = {**os.environ, **PORTABLE}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {f"rank{r}": json.loads(out.with_name(f"losses.rank{r}.json").read_text()) for r in (0, 1)}


def test_first_20_steps_match_golden(tmp_path):
    got = run_worker(tmp_path)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        doc = json.loads(GOLDEN.read_text())
        doc["losses"] = {r: v["losses"] for r, v in got.items()}
        GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    for rank, losses in want.items():
        assert got[rank]["step"] == 20
        assert len(got[rank]["losses"]) == len(losses) == 20
        for step, (g, w) in enumerate(zip(got[rank]["losses"], losses, strict=True)):
            assert g.keys() == w.keys(), f"{rank} step {step + 1}: {sorted(g)} != {sorted(w)}"
            for key in w:  # exact on the machine that wrote the file; a relative 1e-6 absorbs other CPUs' BLAS
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), f"{rank} step {step + 1} {key}"
