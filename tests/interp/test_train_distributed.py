"""Two gloo processes (torchrun) train the interpolator data-parallel and resume: the same losses and weights as one
process on the global batch, one ZeRO-1 optimizer shard and one data position per rank, one export."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.config import load_config
from engine.interp.data import SyntheticLatents
from engine.interp.train import train_interp

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "model.preset=tiny",  # in_dim 4 (Wan2.1: 16)
    "interp.channels=[4,8,8]",
    "interp.batch_size=4",  # 2 per rank
    "interp.lr=1e-3",
    "checkpoint.every_steps=2",
    "logging.log_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, steps: int) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"  # docs/architecture.md#deepspeed
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(ROOT / "launcher" / "train_interp.py"),
        "--synthetic",
        "5x8x8",
        *OVERRIDES,
        f"interp.steps={steps}",
        f"logging.run_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.distributed
def test_two_processes_with_resume_match_one_process_on_the_global_batch(tmp_path):
    dp = tmp_path / "dp"
    _torchrun(dp, steps=2)
    _torchrun(dp, steps=3)  # resumes from step 2: every rank restores its own data position
    step = dp / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in (step / "unet").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert sorted(p.name for p in (step / "trainer").glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert (dp / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    cfg = load_config(overrides=[*OVERRIDES, "interp.steps=3", f"logging.run_dir={tmp_path / 'single'}"])
    single = train_interp(cfg, SyntheticLatents(4, 5, 8, 8, batch_size=4, seed=cfg.train.seed))
    dp_losses = _scalars(dp, "interp/loss")
    assert sorted(dp_losses) == [1, 2, 3]
    assert [dp_losses[s] for s in (1, 2, 3)] == pytest.approx([h["loss"] for h in single.history], rel=1e-5)
    a = load_file(str(dp / "interpolator" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "interpolator" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
