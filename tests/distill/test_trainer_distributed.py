"""The trainer on DeepSpeed ZeRO-3 with 2 gloo ranks: partitioning, the 5:1 schedule, resume after SIGKILL, export.

Each test launches tests/distill/ds_worker.py under torchrun (a real multi-process job on this CPU).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from engine.config import model_preset
from engine.models.checkpoint import read_model_config, save_weights
from engine.models.wan import WanModel

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("ds_worker.py")

RUN_YAML = """
model: {{preset: tiny, checkpoint: {teacher}}}
diffusion: {{guidance_scale: 3.0}}
optim: {{lr: 1.0e-3, critic_lr: 1.0e-3, micro_batch_size: 2}}
train: {{max_steps: {steps}}}
checkpoint: {{every_steps: {every}, keep_last: 2}}
logging: {{run_dir: {run_dir}, log_every: 1, progress_bar: false}}
deepspeed: {{param_persistence_threshold: 0}}
data: {{num_frames: 9, height: 32, width: 32}}
vae: {{kind: toy, temporal_stride: 1, spatial_stride: 8}}
text_encoder: {{kind: toy}}
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "transformer"
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    model = WanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    save_weights(model, cfg, path)
    return path


def launch(tmp_path, teacher, name, steps, every, nproc=2, env=None, overrides=()):
    run_dir = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(RUN_YAML.format(teacher=teacher, steps=steps, every=every, run_dir=run_dir))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        str(WORKER),
        str(cfg),
        *overrides,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    return proc, run_dir


def report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def test_zero3_partitions_every_role_and_follows_the_5_to_1_schedule(tmp_path, teacher):
    proc, run_dir = launch(tmp_path, teacher, "run", steps=6, every=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = report(run_dir)
    assert rep["zero3_vs_plain"] <= 1e-5  # the partitioned forward computes what the plain model does
    for role, fractions in rep["partition"].items():  # each rank holds about half of every parameter
        assert all(0.45 <= f <= 0.55 for f in fractions), role
    rows = rep["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["changed"]["critic"] for r in rows)
    assert [r["changed"]["generator"] for r in rows] == [True, False, False, False, False, True]
    assert not any(r["changed"]["teacher"] for r in rows)
    for r in rows:
        assert all(torch.isfinite(torch.tensor(v)) for v in r["losses"].values())
    gen_rows = [r for r in rows if r["changed"]["generator"]]
    assert all({"loss_dmd", "loss_reg", "loss_temp", "loss_generator"} <= set(r["losses"]) for r in gen_rows)
    # keep-last-2 and the latest pointer
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tensorboard").is_dir()
    _check_export(run_dir)


def _check_export(run_dir):
    """The consolidated generator loads in diffusers and reproduces our model with the final gathered weights."""
    export = run_dir / "export" / "transformer"
    weights = torch.load(run_dir / "final_weights.pt")
    ours = WanModel(read_model_config(export, gradient_checkpointing=False)).eval()
    ours.load_state_dict(weights["generator"])
    ref = WanTransformer3DModel.from_pretrained(export).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 6, 16, generator=g)
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        assert (ref(x, t, ctx, return_dict=False)[0] - ours(x, t, ctx)).abs().max() <= 1e-5
    assert not torch.equal(weights["generator"]["head.head.weight"], weights["critic"]["head.head.weight"])


def _assert_same_tail(straight, resumed, first_step):
    tail = [r for r in straight["rows"] if r["step"] >= first_step]
    assert [r["step"] for r in resumed["rows"]] == [r["step"] for r in tail]
    for a, b in zip(tail, resumed["rows"]):
        assert a["losses"] == b["losses"], (a["step"], a["losses"], b["losses"])


def _assert_same_weights(dir_a, dir_b):
    a, b = torch.load(dir_a / "final_weights.pt"), torch.load(dir_b / "final_weights.pt")
    for role in ("generator", "critic"):
        for name in a[role]:
            assert torch.equal(a[role][name], b[role][name]), (role, name)


def test_resume_after_sigkill_is_exact(tmp_path, teacher):
    straight_proc, straight = launch(tmp_path, teacher, "straight", steps=12, every=6)
    assert straight_proc.returncode == 0, straight_proc.stderr[-3000:]
    # killed at the start of step 7 (after the step-6 checkpoint), then resumed with the same command
    killed, run = launch(tmp_path, teacher, "killed", steps=12, every=6, env={"VIDISTILL_FAULT": "step:7"})
    assert killed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    resumed, _ = launch(tmp_path, teacher, "killed", steps=12, every=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_tail(report(straight), report(run), first_step=7)
    _assert_same_weights(straight, run)
    assert "resumed from" in (run / "train.log").read_text()


def test_kill_during_a_checkpoint_save_resumes_from_the_last_complete_one(tmp_path, teacher):
    straight_proc, straight = launch(tmp_path, teacher, "straight", steps=8, every=4)
    assert straight_proc.returncode == 0, straight_proc.stderr[-3000:]
    killed, run = launch(tmp_path, teacher, "killed", steps=8, every=4, env={"VIDISTILL_FAULT": "save:8"})
    assert killed.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / ".partial-step_00000008").is_dir()  # the interrupted save
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    resumed, _ = launch(tmp_path, teacher, "killed", steps=8, every=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_tail(report(straight), report(run), first_step=5)
    _assert_same_weights(straight, run)
    assert not (ckpts / ".partial-step_00000008").exists()


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, teacher):
    # batches 0 and 10 carry NaN latents (batch index = position in the epoch stream: 2 draws of 2 per step)
    proc, run_dir = launch(tmp_path, teacher, "nan", steps=6, every=6, nproc=1, env={"NAN_BATCHES": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = report(run_dir)
    assert rep["summary"]["skipped"] == {"generator": 1, "critic": 0}
    assert rep["rows"][0]["changed"] == {"generator": False, "critic": True, "teacher": False}
    assert rep["rows"][5]["changed"]["generator"]  # the next generator step (step 6) runs normally
    assert "non-finite generator loss" in (run_dir / "train.log").read_text()
    proc, _ = launch(
        tmp_path,
        teacher,
        "nan-stop",
        steps=6,
        every=6,
        nproc=1,
        env={"NAN_BATCHES": "0"},
        overrides=["train.max_nonfinite_in_a_row=1"],
    )
    assert proc.returncode != 0 and "max_nonfinite_in_a_row" in proc.stderr


def test_resume_against_a_retrained_teacher_fails_before_building(tmp_path, teacher):
    own = tmp_path / "teacher"
    shutil.copytree(teacher, own)
    first, run_dir = launch(tmp_path, own, "run", steps=2, every=2, nproc=1)
    assert first.returncode == 0, first.stderr[-3000:]
    cfg = model_preset("tiny")
    other = WanModel(cfg)  # same architecture, other weights
    save_weights(other, cfg, own)
    again, _ = launch(tmp_path, own, "run", steps=4, every=2, nproc=1)
    assert again.returncode != 0
    assert "`model.checkpoint`" in again.stderr and "distilled from other teacher weights" in again.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # untouched


def test_a_finished_job_reports_and_builds_nothing(tmp_path, teacher):
    first, run_dir = launch(tmp_path, teacher, "done", steps=2, every=2, nproc=1)
    assert first.returncode == 0, first.stderr[-3000:]
    export = run_dir / "export" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = export.stat().st_mtime_ns
    again, _ = launch(tmp_path, teacher, "done", steps=2, every=2, nproc=1)
    assert again.returncode == 0, again.stderr[-3000:]
    rep = report(run_dir)
    assert rep["summary"]["finished"] and rep["summary"]["step"] == 2
    assert rep["partition"] is None and rep["rows"] == []  # no model was built, no step ran
    assert export.stat().st_mtime_ns == before  # the export was not rewritten
    more, _ = launch(tmp_path, teacher, "done", steps=3, every=3, nproc=1)  # a higher max_steps trains on
    assert more.returncode == 0, more.stderr[-3000:]
    assert report(run_dir)["summary"]["step"] == 3 and "finished" not in report(run_dir)["summary"]


def test_a_garbled_zero3_shard_falls_back_to_the_older_checkpoint(tmp_path, teacher):
    """Rank 1's optimizer partition of the newest checkpoint gets other bytes (same size): rank 1 finds it, every rank
    agrees, the run resumes from the older checkpoint and retraces the first run's steps exactly."""
    first, run = launch(tmp_path, teacher, "run", steps=8, every=4)
    assert first.returncode == 0, first.stderr[-3000:]
    before = report(run)
    step8 = run / "checkpoints" / "step_00000008"
    manifests = [json.loads((step8 / "manifest" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]
    for role in ("generator", "critic"):  # each rank hashed its own ZeRO-3 partitions
        for r in (0, 1):
            assert f"{role}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in manifests[r]["files"]
            assert f"{role}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" in manifests[r]["files"]
    assert "trainer/rank_00001.pt" in manifests[1]["files"] and "trainer/shared.pt" in manifests[0]["files"]
    shard = step8 / "critic" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[-4096:-2048] = bytes(2048)
    shard.write_bytes(bytes(data))
    resumed, _ = launch(tmp_path, teacher, "run", steps=8, every=4, overrides=["train.max_steps=10"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert f"checkpoint step_00000008 does not verify, skipped: {shard} is corrupt" in log
    assert "resuming from step_00000004, the newest checkpoint that verifies" in log
    after = report(run)
    assert [r["step"] for r in after["rows"]] == list(range(5, 11))
    for a, b in zip([r for r in before["rows"] if r["step"] >= 5], after["rows"]):  # steps 5-8 again, exactly
        assert a["losses"] == b["losses"], (a["step"], a["losses"], b["losses"])


def _finite_weights(run_dir):
    weights = torch.load(run_dir / "final_weights.pt")
    return all(torch.isfinite(t).all() for role in weights.values() for t in role.values())


@pytest.mark.parametrize("nproc,zero_stage", [(2, 3), (1, 0)])
def test_non_finite_gradients_and_scores_skip_the_update(tmp_path, teacher, nproc, zero_stage):
    # step 2: the critic's gradients are NaN (its loss is finite); step 5 (a generator step): the teacher's score is NaN
    env = {"NAN_GRADS": "critic:2", "NAN_SCORES": "teacher:5"}
    overrides = [f"deepspeed.zero_stage={zero_stage}"]
    proc, run_dir = launch(tmp_path, teacher, "guards", steps=7, every=7, nproc=nproc, env=env, overrides=overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = report(run_dir)
    assert rep["summary"]["skipped"] == {"generator": 1, "critic": 1}
    assert rep["summary"]["nonfinite"] == {
        "generator": {"loss": 1, "teacher_score": 1, "loss_dmd": 1},
        "critic": {"grad_norm": 1},
    }
    rows = rep["rows"]
    assert [r["changed"]["critic"] for r in rows] == [True, True, False, True, True, True, True]
    assert [r["changed"]["generator"] for r in rows] == [True, False, False, False, False, False, False]
    # the regression EMA moved with the applied generator update (step 0) only, not with the skipped one (step 5)
    assert rows[0]["reg_ema"] != [0.0] * len(rows[0]["reg_ema"])
    assert all(r["reg_ema"] == rows[0]["reg_ema"] for r in rows)
    assert _finite_weights(run_dir)  # the NaN gradients did not leak into a later update
    log = (run_dir / "train.log").read_text()
    assert "step 2: non-finite critic gradient norm, update skipped on all ranks" in log
    assert "step 5: non-finite generator loss (loss_dmd, teacher_score), update skipped on all ranks" in log


def test_a_generator_that_never_updates_stops_the_run_though_the_critic_trains(tmp_path, teacher):
    env = {"NAN_GRADS": "generator:0,generator:5"}
    proc, _ = launch(
        tmp_path, teacher, "gen-stop", steps=8, every=8, nproc=1, env=env,
        overrides=["train.max_nonfinite_in_a_row=2"],
    )  # fmt: skip
    assert proc.returncode != 0
    assert "2 consecutive generator updates were skipped" in proc.stderr, proc.stderr[-3000:]


def test_non_finite_weights_are_never_saved_or_exported(tmp_path, teacher):
    # after step 4, rank 1's partition of the generator goes NaN (rank 0's stays finite: the ranks must agree)
    env = {"POISON_WEIGHTS": "generator:4:1"}
    proc, run_dir = launch(tmp_path, teacher, "poison", steps=6, every=2, env=env)
    assert proc.returncode != 0
    assert "non-finite weights in generator: checkpoint refused" in proc.stderr, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (run_dir / "export").exists()
    assert "non-finite weights in generator" in (run_dir / "train.log").read_text()


def test_one_job_per_run_directory(tmp_path, teacher):
    import fcntl

    from engine.train.runlock import LOCK_NAME

    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    with open(run_dir / LOCK_NAME, "w") as held:  # a live job holds the directory
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(json.dumps({"host": "node-7", "pid": os.getpid(), "started": "2026-01-01T00:00:00"}) + "\n")
        held.flush()
        proc, _ = launch(tmp_path, teacher, "locked", steps=1, every=1, nproc=1)
    assert proc.returncode != 0
    assert f"is in use by another job (host node-7 pid {os.getpid()}" in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    # a lock left by a process that is gone is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": host, "pid": dead.pid, "started": "then"}) + "\n")
    proc, _ = launch(tmp_path, teacher, "locked", steps=1, every=1, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over the stale lock of {run_dir} (host {host} pid {dead.pid}" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").is_file() and not (run_dir / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "fault,signame,code",
    [("sigterm:3", "SIGTERM", None), ("sigint:3:1", "SIGINT", 130)],
    ids=["sigterm-to-torchrun", "sigint-to-rank-1-only"],
)
def test_a_signal_saves_at_the_next_step_boundary_and_the_rerun_resumes_exactly(
    tmp_path, teacher, fault, signame, code
):
    """SIGTERM to torchrun (which forwards it to both workers), or SIGINT to rank 1 only (rank 0 never gets one): both
    ranks save the same step at the next boundary, the job exits non-zero with one line, the re-run retraces the
    uninterrupted run exactly."""
    straight_proc, straight = launch(tmp_path, teacher, "straight", steps=8, every=8)
    assert straight_proc.returncode == 0, straight_proc.stderr[-3000:]
    stopped, run = launch(tmp_path, teacher, "stopped", steps=8, every=8, env={"VIDISTILL_FAULT": fault})
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("ds_worker:")]
    assert len(lines) == 1, stopped.stderr[-3000:]  # rank 0 prints it, once
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert 3 < step < 8  # the step boundary after the signal, not the end of the run
    ckpt_dir = run / "checkpoints" / latest
    assert lines[0] == (
        f"ds_worker: stopped: {signame} at step {step}: saved checkpoint {ckpt_dir}; re-run the same command to resume"
    )
    assert not [line for line in stopped.stderr.splitlines() if line.startswith("[rank")]  # no worker traceback
    if code is not None:  # torchrun's failure report (none when torchrun itself was signalled): 128 + the signal
        assert stopped.stderr.count(f"exitcode  : {code} ") == 2, stopped.stderr[-3000:]
    manifests = sorted(p.name for p in (ckpt_dir / "manifest").iterdir())
    assert manifests == ["rank_00000.json", "rank_00001.json"]  # every rank saved its part
    resumed, _ = launch(tmp_path, teacher, "stopped", steps=8, every=8)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt_dir} at step {step}" in (run / "train.log").read_text()
    _assert_same_tail(report(straight), report(run), first_step=step + 1)
    _assert_same_weights(straight, run)


def test_a_sigkilled_launcher_leaves_no_worker_running(tmp_path, teacher):
    import psutil

    run_dir = tmp_path / "orphans"
    cfg = tmp_path / "orphans.yaml"
    cfg.write_text(RUN_YAML.format(teacher=teacher, steps=10_000, every=10_000, run_dir=run_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER), str(cfg)]
    agent = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    workers = []
    try:
        deadline = time.monotonic() + 300
        while " step 2 " not in _text(run_dir / "train.log"):  # training, well past start-up
            assert agent.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.5)
        workers = psutil.Process(agent.pid).children(recursive=True)
        assert len(workers) >= 2
        agent.kill()
        agent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, [p.pid for p in alive]  # without PR_SET_PDEATHSIG they train on alone
    finally:  # orphans are no longer our children: kill them by pid
        for p in [*psutil.Process().children(recursive=True), *workers]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _text(path):
    return path.read_text() if path.is_file() else ""


ACCUM_EMA = (
    "optim.grad_accum_steps=2", "optim.warmup_steps=3", "method.ema.enabled=true", "method.ema.decay=0.5",
    "method.ema.start_step=2",
)  # fmt: skip


def _exported(run_dir, name, root="export"):
    from engine.models.checkpoint import load_weights

    path = run_dir / root / name
    model = WanModel(read_model_config(path, gradient_checkpointing=False))
    load_weights(model, path)
    return model.state_dict()


def test_accumulation_warmup_and_generator_ema_in_distillation(tmp_path, teacher):
    """grad_accum_steps=2: still one generator update per 5 trainer steps and the regression EMA moving with it only;
    the warm-up of both roles per update; the EMA (decay 0.5 from step 2) is the exported student, the raw weights
    beside it, and equals the average of the gathered weights after the two generator updates; the sample videos
    are generated with it."""
    proc, run_dir = launch(
        tmp_path, teacher, "accum", steps=6, every=3, env={"RECORD_GENERATOR": "1"}, overrides=ACCUM_EMA
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = report(run_dir)["rows"]
    assert [r["changed"]["generator"] for r in rows] == [True, False, False, False, False, True]
    assert all(r["changed"]["critic"] for r in rows)
    reg = [r["reg_ema"] for r in rows]
    assert reg[0] != [0.0] * len(reg[0]) and reg[1:5] == [reg[0]] * 4 and reg[5] != reg[4]  # per generator update
    base = 1e-3
    for r in rows:  # after trainer step s: the critic made s updates, the generator 1 + (s - 1) // 5
        assert r["lr"]["critic"] == pytest.approx(base * min(1.0, (r["step"] + 1) / 3), rel=1e-9)
        assert r["lr"]["generator"] == pytest.approx(base * min(1.0, (2 + (r["step"] - 1) // 5) / 3), rel=1e-9)
    ema, raw = _exported(run_dir, "transformer"), _exported(run_dir, "transformer_raw")
    final = torch.load(run_dir / "final_weights.pt")["generator"]
    first, last = torch.load(run_dir / "generator_step1.pt"), torch.load(run_dir / "generator_step6.pt")
    assert all(torch.equal(raw[k], final[k]) and torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    for k in raw:  # step 0 < start_step: a copy; step 5: 0.5 ema + 0.5 w
        torch.testing.assert_close(ema[k], 0.5 * first[k] + 0.5 * last[k], rtol=0, atol=1e-6)
    sampled = torch.load(run_dir / "sampled_step6.pt")  # the end-of-run sample videos are the EMA's
    assert all(torch.equal(sampled[k], ema[k]) for k in ema)
    # offline, from the step directory (launcher/export.py): the EMA partitions of both ranks consolidated
    from engine.deploy import export_student

    export_student(run_dir / "checkpoints" / "step_00000006", tmp_path / "deploy")
    for name, want in (("transformer", ema), ("transformer_raw", raw)):
        got = _exported(tmp_path / "deploy", name, root="")
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_resume_with_accumulation_and_ema_is_exact(tmp_path, teacher):
    straight_proc, straight = launch(tmp_path, teacher, "straight", steps=12, every=6, overrides=ACCUM_EMA)
    assert straight_proc.returncode == 0, straight_proc.stderr[-3000:]
    killed, run = launch(
        tmp_path, teacher, "killed", steps=12, every=6, env={"VIDISTILL_FAULT": "step:7"}, overrides=ACCUM_EMA
    )
    assert killed.returncode != 0
    resumed, _ = launch(tmp_path, teacher, "killed", steps=12, every=6, overrides=ACCUM_EMA)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_tail(report(straight), report(run), first_step=7)
    assert [r["lr"] for r in report(run)["rows"]] == [r["lr"] for r in report(straight)["rows"][6:]]
    _assert_same_weights(straight, run)
    for name in ("transformer", "transformer_raw"):  # the EMA continued bit for bit
        a, b = _exported(straight, name), _exported(run, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
