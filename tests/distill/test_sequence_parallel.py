"""Ulysses sequence parallelism in the distillation job (configs/toy.yaml on gloo ranks, the worker:
tests/distill/sp_worker.py): an SP=2 run equals the data-parallel run of the same global batch, and a killed SP run
resumes exactly. The toy clips are 40x40 here: 5 x 5 x 9 = 225 tokens per sample, which 2 ranks do not divide, so
every forward of all three roles pads and masks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.distill.job import check_world_size
from engine.train import checkpoint as ckpt

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("sp_worker.py")
TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"
OVERRIDES = [
    "toy.num_clips=16",  # 14 training clips, 2 held out: their captions are the sample prompts
    "toy.height=40",
    "toy.width=40",
    "train.max_steps=4",
    "checkpoint.every_steps=2",
    "method.critic_per_generator=2",  # generator updates at steps 1 and 3
    "diffusion.teacher_steps=10",  # the quality monitor's teacher reference videos (sampled under SP too)
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "deepspeed.dtype=fp32",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")  # the clips are rendered once, by the first run


def launch(tmp_path, cache, name, nproc, sp, env=None):
    run = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", str(WORKER)]
    cmd += [str(run / "out"), f"toy.cache_dir={cache}", f"logging.run_dir={run / 'run'}", *OVERRIDES]
    cmd += [f"parallel.sequence_parallel={sp}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=900)
    return proc, run


def result(run, rank=0):
    return json.loads((run / "out" / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory, cache):
    proc, run = launch(tmp_path_factory.mktemp("sp"), cache, "sp2", nproc=2, sp=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, cache, sp_run):
    proc, run = launch(tmp_path_factory.mktemp("dp"), cache, "single", nproc=1, sp=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_sp2_distillation_equals_the_data_parallel_run_of_the_same_batch(sp_run, single_run):
    """2 ranks splitting each sample's tokens vs 1 rank holding them whole (1 data-parallel rank each, 4 samples per
    update): same batches, same losses, gradient norms (the gradient scale: a missing factor of 2 shows here, not in
    Adam's steps), regression EMA, weights and sample videos, to fp32 rounding."""
    sp, single = result(sp_run), result(single_run)
    assert sp["layout"] == {"sp": 2, "data_rank": 0, "data_world": 1}
    assert result(sp_run, 1)["layout"] == {"sp": 2, "data_rank": 0, "data_world": 1}
    assert sp["batches"] == result(sp_run, 1)["batches"] == single["batches"]  # a group reads one stream
    assert [r["step"] for r in sp["rows"]] == [1, 2, 3, 4]
    assert {"loss_generator", "grad_norm_generator"} <= set(sp["rows"][0]) and "loss_dmd" in sp["rows"][2]
    for a, b in zip(sp["rows"], single["rows"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key == "reg_ema":
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)
            elif key != "step":
                assert _rel(a[key], b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    a, b = torch.load(sp_run / "out" / "final.pt"), torch.load(single_run / "out" / "final.pt")
    start = torch.load(sp_run / "out" / "initial.pt")
    for role in ("generator", "critic"):
        diff = max(float((a[role][k] - b[role][k]).abs().max()) for k in a[role])
        moved = max(float((a[role][k] - start[role][k]).abs().max()) for k in a[role])
        assert diff <= 5e-5 and moved >= 20 * diff, (role, diff, moved)  # lr 1e-4: a step moves a weight <= ~1e-4
    samples_sp = torch.load(sp_run / "out" / "samples.pt")
    samples_single = torch.load(single_run / "out" / "samples.pt")
    assert samples_sp.shape == samples_single.shape == (4, 16, 9, 10, 10)  # the teacher's 2 reference videos, ours
    assert float((samples_sp - samples_single).abs().max()) <= 5e-4


def test_sp2_kill_and_resume_is_exact(tmp_path, cache, sp_run):
    """Killed after step 3 (the step-2 checkpoint is the latest), the same command resumes and retraces the
    uninterrupted SP run exactly: the ZeRO-3 partitions over both ranks, each rank's noise and data position."""
    killed, run = launch(tmp_path, cache, "killed", nproc=2, sp=2, env={"VIDISTILL_FAULT": "step:3"})
    assert killed.returncode != 0
    assert (run / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    resumed, _ = launch(tmp_path, cache, "killed", nproc=2, sp=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in (run / "run" / "train.log").read_text()
    straight = result(sp_run)
    for rank in (0, 1):
        rows = result(run, rank)["rows"]
        assert [r["step"] for r in rows] == [3, 4]
        assert rows == [r for r in result(sp_run, rank)["rows"] if r["step"] >= 3]
    assert result(run)["rows"] == [r for r in straight["rows"] if r["step"] >= 3]
    a, b = torch.load(run / "out" / "final.pt"), torch.load(sp_run / "out" / "final.pt")
    assert all(torch.equal(a[role][k], b[role][k]) for role in a for k in a[role])
    # the same checkpoints with another degree: refused before anything is built (run_distillation's first checks)
    with pytest.raises(ConfigError, match=r"^config key `parallel.sequence_parallel`: 1, but .* written with 2"):
        ckpt.check_sequence_degree(run / "run" / "checkpoints", "auto", 1)
    ckpt.check_sequence_degree(run / "run" / "checkpoints", "auto", 2)


def test_a_degree_that_does_not_divide_the_world_or_the_heads_is_one_config_error():
    key = r"^config key `parallel.sequence_parallel`: "
    with pytest.raises(ConfigError, match=key + "3 does not divide model.num_heads=4"):
        load_config(TOY, ["parallel.sequence_parallel=3"])
    with pytest.raises(ConfigError, match=key + "must be >= 1"):
        load_config(TOY, ["parallel.sequence_parallel=0"])
    cfg = load_config(TOY, ["parallel.sequence_parallel=4"])
    with pytest.raises(ConfigError, match=key + r"4 does not divide the world size 6; .*: \[1, 2\]$"):
        check_world_size(cfg, 6)
    check_world_size(cfg, 8)
    cfg = load_config(TOY, ["parallel.sequence_parallel=2", "optim.global_batch_size=8"])
    check_world_size(cfg, 4)  # 4 per micro-batch x 2 data-parallel ranks
    with pytest.raises(ConfigError, match=r"`optim.global_batch_size`: 8 != .* x 1 data-parallel ranks"):
        check_world_size(cfg, 2)


@pytest.mark.slow
def test_sp2_over_two_data_parallel_groups_equals_plain_data_parallelism(tmp_path, cache):
    """4 ranks as 2 sequence-parallel groups of 2 vs 2 ranks without: the data-parallel groups ({0, 2}, {1, 3}) read
    and reduce what the 2 plain ranks do, and the weights and sample videos agree."""
    proc, four = launch(tmp_path, cache, "sp2x2", nproc=4, sp=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc, two = launch(tmp_path, cache, "dp2", nproc=2, sp=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank, data_rank in ((0, 0), (1, 0), (2, 1), (3, 1)):
        a, b = result(four, rank), result(two, data_rank)
        assert a["layout"] == {"sp": 2, "data_rank": data_rank, "data_world": 2}
        assert a["batches"] == b["batches"]
        for ra, rb in zip(a["rows"], b["rows"], strict=True):
            for key in ra:
                if key == "reg_ema":
                    assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7)
                elif key != "step":
                    assert _rel(ra[key], rb[key]) <= 1e-5, (rank, ra["step"], key, ra[key], rb[key])
    assert result(two, 0)["batches"] != result(two, 1)["batches"]  # the two data-parallel ranks read other samples
    a, b = torch.load(four / "out" / "final.pt"), torch.load(two / "out" / "final.pt")
    for role in ("generator", "critic"):
        assert max(float((a[role][k] - b[role][k]).abs().max()) for k in a[role]) <= 5e-5, role
    samples = torch.load(four / "out" / "samples.pt"), torch.load(two / "out" / "samples.pt")
    assert float((samples[0] - samples[1]).abs().max()) <= 5e-4
