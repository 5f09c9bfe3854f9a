"""Gradient accumulation and the partitioned generator EMA on 2 gloo ranks under ZeRO-3 (the worker:
tests/train/accum_worker.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("accum_worker.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum") / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER), str(out)]
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_zero3_accumulation_equals_the_large_batch(report):
    assert report["world"] == 2
    assert report["accum_max_diff"] <= 1e-6 and report["accum_max_rel"] <= 1e-5


def test_a_nan_micro_batch_on_one_rank_skips_the_update_on_both(report):
    assert report["skipped"] == {"net": 1} and report["untouched"]


def test_the_partitioned_ema_equals_a_reference_on_the_full_parameters(report):
    assert report["persistent"] >= 1 and report["partitioned"] >= 1  # both kinds of ZeRO-3 parameter are covered
    for name, full in report["full_shapes"].items():  # each rank keeps its partition only: ceil(numel / 2)
        assert report["local_shapes"][name] == [-(-math.prod(full) // 2)], name
    assert report["ema_vs_raw"] > 1e-4  # the average is not the weights
    assert report["ema_max_diff"] <= 1e-6
    assert report["ema_forward_diff"] <= 1e-6  # a forward inside the swap runs on the average, persistent params too
    assert report["raw_restored"] and report["raw_forward_diff"] <= 1e-6
