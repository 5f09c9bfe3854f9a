"""The prepared GPU check (benchmarks/gpu/run_all.sh) on a machine without CUDA: it checks what it can (preflight,
every stage dry-run on tiny CPU shapes, the Triton kernels in the interpreter, the summary) and then exits 3 with a
"needs CUDA" line. CUDA is hidden from the script, so this tests the CPU path on any machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_all.sh"
sys.path.insert(0, str(SCRIPT.parent))
import summary  # noqa: E402  (benchmarks/gpu/summary.py)

KERNELS = {"adaln", "gated_residual", "qk_norm_rope", "temporal_loss", "conv_norm_act", "interpolate"}


def test_run_all_checks_everything_it_can_then_says_it_needs_cuda(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(["bash", str(SCRIPT), str(results)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run_all: needs CUDA: every check that runs without a GPU passed"), last
    assert json.loads((results / "preflight.json").read_text())["problems"] == []
    report = json.loads((results / "summary.json").read_text())
    assert report["dry_run"] and report["ok"]
    assert {k: s["status"] for k, s in report["stages"].items()} == dict.fromkeys(summary.STAGES, "dry-run ok")
    rec = {k: s["record"] for k, s in report["stages"].items()}
    fused = {r["kernel"] for r in rec["kernels"]["rows"] if r["provider"] == "fused_triton"}
    assert fused == KERNELS  # every fused kernel ran (interpreter), not only the torch references
    assert [r["step"] for r in rec["distill"]["rows"]] == [1, 2, 3, 4, 5, 6] and rec["distill"]["cycle_s"] > 0
    assert rec["gpu_tests"]["collected"] >= 9  # DALI, BT.709 routing, text encoder, VAE, attention backends
    assert rec["vif"]["full_s"] > 0 and rec["dit"]["rows"][-1]["forward_backward_ms"] > 0
    md = (results / "summary.md").read_text()
    assert md.startswith("# GPU check (dry run on CPU") and "| distill | dry-run ok |" in md
    assert not (results / "distill_run").exists()  # the job's checkpoint is removed


def test_summary_statuses(tmp_path):
    """A stage cut off by its timeout keeps its rows and reads "cut off"; one that died before it wrote a record
    is "missing"; a failed one carries its error line; the summary then fails."""
    base = {"dry_run": False, "rows": [], "notes": [], "device": {"name": "x"}, "seconds": 1}
    records = {"gpu_tests": "ok", "kernels": "running", "dit": "failed", "distill": "ok"}
    for name, status in records.items():
        rec = {
            **base,
            "stage": name,
            "status": status,
            **({"error": "RuntimeError: boom"} if status == "failed" else {}),
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    for name, rc in {"gpu_tests": 0, "kernels": 124, "dit": 1, "distill": 0, "vif": 1}.items():
        (tmp_path / f"{name}.rc").write_text(str(rc))
    stages = summary.load(tmp_path)
    assert {k: s["status"] for k, s in stages.items()} == {
        "gpu_tests": "ok", "kernels": "cut off", "dit": "failed", "distill": "ok", "vif": "missing"
    }  # fmt: skip
    md = summary.markdown(stages, {"name": "x"}, dry_run=False)
    assert "| dit | failed: RuntimeError: boom |" in md and "| vif | missing |" in md
    assert "(incomplete record: missing 'cycle_s')" not in md and "steps timed: []" in md


def test_summary_tables_of_measured_rows():
    row = dict(kernel="adaln", passes="fwd", gbps=2000.0, gflops=8000.0, roof="memory")
    rows = [{**row, "provider": "torch_eager", "ms": 2.0, "peak_fraction": 0.3},
            {**row, "provider": "fused_triton", "ms": 0.5, "peak_fraction": 0.6}]  # fmt: skip
    table = summary.kernels_md({"rows": rows})
    assert table[0].startswith("| kernel | passes | provider |") and len(table) == 4
    assert table[2] == "| adaln | fwd | fused_triton | 0.500 | 2000 | 8.0 | 60.0% (memory) | 4.00x |"
    dit = dict(
        blocks=30,
        tokens=32760,
        attention_backend="sdpa",
        forward_ms=700.0,
        forward_backward_ms=2500.0,
        forward_backward_tflops=350.0,
        peak_fraction=0.354,
        projected_30_blocks_forward_backward_s=2.5,
    )
    assert summary.dit_md({"rows": [dit]})[2] == "| 30 | 32760 | sdpa | 700.0 | 2500.0 | 350.0 | 35.4% | 2.50 |"
