"""The demo driver end to end on a small world: dataset, a (random) teacher, a 2-rank ZeRO-3 distillation through
launcher/run.py, mp4s, and the metrics table with teacher, student and both VIF variants."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import model_preset
from engine.data.mp4 import probe
from engine.models.checkpoint import save_weights
from engine.models.wan import WanModel

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_and_reprints_without_redoing(tmp_path):
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    cfg = model_preset("toy", gradient_checkpointing=False)
    model = WanModel(cfg)
    model.init_weights()
    save_weights(model, cfg, teacher)
    run_dir = tmp_path / "demo"
    overrides = [
        f"model.checkpoint={teacher}", f"toy.cache_dir={tmp_path / 'cache'}", "toy.num_clips=48",
        "train.max_steps=2", "optim.micro_batch_size=2", "checkpoint.every_steps=2", "diffusion.teacher_steps=2",
        "diffusion.guidance_scale=3",
        "logging.log_every=1",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "launcher.demo", "--run-dir", str(run_dir), "--eval-clips", "4", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (run_dir / "metrics.md").read_text()
    for row in ("real (val)", "teacher (2 steps, CFG 3)", "student (4 steps)", "contiguous RoPE", "stride2 RoPE"):
        assert row in table
    assert "| instance_preservation |" in table and "| frechet_distance |" in table
    assert table in proc.stdout  # printed and saved
    for name in ("teacher_00.mp4", "student_00.mp4", "vif_contiguous_00.mp4"):
        assert probe(run_dir / "videos" / name)["frames"] == 9
    assert list((run_dir / "samples").glob("step0000002_seed0_*.mp4"))  # the trainer's own end-of-run samples
    # ... scored by the quality monitor against the teacher's videos of the same prompts and seeds
    last = json.loads((run_dir / "quality" / "scores.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and 0 <= last["instance_preservation"] <= 1 and last["saturation"] > 0
    assert json.loads((run_dir / "quality" / "teacher.json").read_text())["scores"]["saturation"] > 0
    assert "step 2 quality: saturation=" in (run_dir / "train.log").read_text()
    assert (run_dir / "export" / "transformer" / "config.json").is_file()
    # the configured interpolator (interp.checkpoint) is exported next to the student: the directory serves VIF as is
    shipped = ROOT / "engine" / "assets" / "toy_interpolator" / "model.safetensors"
    exported = load_file(run_dir / "export" / "interpolator" / "model.safetensors")
    assert exported.keys() == load_file(shipped).keys()
    assert all(torch.equal(exported[k], v) for k, v in load_file(shipped).items())
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "skipping" in again.stdout  # the finished distillation is not redone
    # ... but it was distilled from these teacher weights: after a retrain the run is refused, not silently reused
    with torch.no_grad():
        model.head.head.weight.add_(0.01)
    save_weights(model, cfg, teacher)
    changed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert changed.returncode == 2
    assert "`model.checkpoint`" in changed.stderr and "distilled from other teacher weights" in changed.stderr
    assert (run_dir / "export" / "transformer" / "config.json").is_file()  # nothing of the old run was deleted
