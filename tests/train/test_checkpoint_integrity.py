"""Checkpoint integrity: every fault is injected into a real checkpoint and the engine must notice it, name it, and
resume from the newest checkpoint that verifies (the interpolator trainer: 1-rank DeepSpeed ZeRO-1, in-process; and
fake checkpoints for the resume decisions). The 2-rank ZeRO-3 shard case is in
tests/distill/test_trainer_distributed.py.
"""

import json

import pytest
import torch

from engine.config import load_config
from engine.interp.data import SyntheticLatents
from engine.interp.train import micro_batch, train_interp
from engine.train import checkpoint as ckpt
from engine.train.checkpoint import TrainCheckpointError

C, F, H, W = 4, 5, 8, 8


def _cfg(tmp_path, steps, keep_last=2, name="run"):
    over = {
        "model.preset": "tiny",
        "interp.channels": "[4,8,8]",
        "interp.batch_size": 4,
        "interp.steps": steps,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": keep_last,
        "logging.log_every": 1,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "logging.run_dir": str(tmp_path / name),
    }
    return load_config(overrides=[f"{k}={v}" for k, v in over.items()])


def _train(tmp_path, steps, **kw):
    cfg = _cfg(tmp_path, steps, **kw)
    mb, _ = micro_batch(cfg, 1)
    return train_interp(cfg, SyntheticLatents(C, F, H, W, batch_size=mb, seed=0))


def _log(tmp_path, name="run"):
    return (tmp_path / name / "train.log").read_text()


def _names(root):
    return [p.name for p in ckpt.complete_checkpoints(root)]


# -- the manifest ------------------------------------------------------------------------------------------------------


def test_every_written_file_is_in_the_manifest(tmp_path):
    _train(tmp_path, 2)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    manifest = json.loads((step / "manifest" / "rank_00000.json").read_text())
    assert manifest["world_size"] == 1 and manifest["step"] == 2
    files = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()}
    written = files - {"COMPLETE", "manifest/rank_00000.json"} - {f for f in files if f.startswith("interpolator/")}
    assert set(manifest["files"]) == written  # the after_save export comes after the checkpoint is complete
    assert {"unet/mp_rank_00_model_states.pt", "unet/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= written
    assert {"trainer/shared.pt", "trainer/rank_00000.pt", "zero_to_fp32.py"} <= written
    entry = manifest["files"]["trainer/shared.pt"]
    assert entry["size"] == (step / "trainer" / "shared.pt").stat().st_size
    assert entry["blake2b"] == ckpt.file_digest(step / "trainer" / "shared.pt")
    assert ckpt.quick_check(step) == []


# -- faults in a real checkpoint ---------------------------------------------------------------------------------------


def test_a_truncated_shared_state_falls_back_to_the_older_checkpoint_and_names_the_file(tmp_path):
    _train(tmp_path, 4)
    root = tmp_path / "run" / "checkpoints"
    shared = root / "step_00000004" / "trainer" / "shared.pt"
    shared.write_bytes(shared.read_bytes()[:100])
    run = _train(tmp_path, 6)
    assert run.start == 2 and run.step == 6  # resumed from step 2, then trained on
    log = _log(tmp_path)
    assert f"checkpoint step_00000004 does not verify, skipped: {shared} is truncated: 100 bytes" in log
    assert "resuming from step_00000002, the newest checkpoint that verifies" in log
    assert _names(root) == ["step_00000004", "step_00000006"]  # step 4 rewritten by the resumed run
    assert all(ckpt.quick_check(root / n) == [] for n in _names(root))


def test_a_garbled_optimizer_shard_falls_back_to_the_older_checkpoint(tmp_path):
    _train(tmp_path, 4)
    root = tmp_path / "run" / "checkpoints"
    shard = root / "step_00000004" / "unet" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert ckpt.quick_check(root / "step_00000004") == []  # sizes alone cannot see it
    run = _train(tmp_path, 6)
    assert run.start == 2
    assert f"{shard} is corrupt: its checksum differs" in _log(tmp_path)


def test_a_missing_rank_file_is_named_as_missing(tmp_path):
    _train(tmp_path, 4)
    root = tmp_path / "run" / "checkpoints"
    missing = root / "step_00000004" / "trainer" / "rank_00000.pt"
    missing.unlink()
    run = _train(tmp_path, 6)
    assert run.start == 2
    log = _log(tmp_path)
    assert f"{missing} is missing" in log and "world size" not in log


def test_a_complete_marker_in_an_empty_directory_is_not_trusted_and_keeps_nothing_from_being_kept(tmp_path):
    _train(tmp_path, 4, keep_last=1)
    root = tmp_path / "run" / "checkpoints"
    fake = root / "step_00000099"
    fake.mkdir()
    (fake / ckpt.COMPLETE).write_text("99\n")
    run = _train(tmp_path, 6, keep_last=1)
    assert run.start == 4  # not 99
    assert "checkpoint step_00000099 does not verify" in _log(tmp_path)
    # keep_last=1 keeps the newest checkpoint that verifies, not the fake one
    assert (root / "step_00000006" / ckpt.COMPLETE).is_file() and ckpt.quick_check(root / "step_00000006") == []
    assert not (root / "step_00000004").exists()  # older than the newest verified one: pruned
    assert fake.is_dir()  # newer than it: left alone, and never trusted


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(tmp_path):
    _train(tmp_path, 4)
    root = tmp_path / "run" / "checkpoints"
    for name in ("step_00000002", "step_00000004"):
        (root / name / "trainer" / "rank_00000.pt").unlink()
    with pytest.raises(
        TrainCheckpointError,
        match=r"no checkpoint in .* verifies: step_00000004: .*rank_00000.pt is "
        r"missing \| step_00000002: .*rank_00000.pt is missing",
    ):
        _train(tmp_path, 6)


def test_disk_full_before_a_save_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_free_bytes", lambda root: 1000)  # the step-2 checkpoint takes more than that
    with pytest.raises(
        TrainCheckpointError,
        match=r"not enough free space to save checkpoint step_00000004.*"
        r"nothing was saved and step_00000002 is still the newest complete checkpoint",
    ):
        _train(tmp_path, 4)
    root = tmp_path / "run" / "checkpoints"
    assert not list(root.glob(".partial-*")) and _names(root) == ["step_00000002"]
    assert (root / "latest").read_text().strip() == "step_00000002"


def test_disk_full_during_a_save_removes_the_partial_save_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    from launcher.train_interp import main

    args = ["--synthetic", "5x8x8", "model.preset=tiny", "interp.channels=[4,8,8]", "interp.batch_size=2"]
    args += ["interp.steps=4", "checkpoint.every_steps=2", "logging.progress_bar=false", "logging.tensorboard=false"]
    args += [f"logging.run_dir={tmp_path / 'run'}"]
    monkeypatch.setenv("VIDISTILL_FAULT", "enospc:4")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"train_interp: error: no space left on device while saving checkpoint step_00000004 in "
        f"{tmp_path / 'run' / 'checkpoints'}: the partial save was removed; step_00000002 is still the newest "
        "complete checkpoint"
    ]
    root = tmp_path / "run" / "checkpoints"
    assert not (root / ".partial-step_00000004").exists() and _names(root) == ["step_00000002"]
    assert (root / "latest").read_text().strip() == "step_00000002" and ckpt.quick_check(root / "step_00000002") == []
    monkeypatch.delenv("VIDISTILL_FAULT")
    (root / ".partial-step_00000003").mkdir()  # a stale partial save (a run killed mid-save)
    (root / ".partial-step_00000003" / "junk.pt").write_bytes(b"x" * 10)
    assert main(args) == 0
    assert "trained steps 3-4" in capsys.readouterr().out  # resumed from step 2
    assert "removed .partial-step_00000003, the partial save of an interrupted run" in _log(tmp_path)
    assert not list(root.glob(".partial-*")) and _names(root) == ["step_00000002", "step_00000004"]


# -- resume decisions on fake checkpoints ------------------------------------------------------------------------------


def _fake(root, step, world_size=1, rank_files=True):
    path = root / ckpt.step_name(step)
    (path / "trainer").mkdir(parents=True)
    torch.save({"step": step}, path / ckpt.SHARED)
    files = [path / ckpt.SHARED]
    for r in range(world_size):
        if rank_files:
            torch.save({"rank": r}, ckpt.rank_file(path, r))
        mine = ([ckpt.rank_file(path, r)] if rank_files else []) + (files if r == 0 else [])
        ckpt.write_manifest(path, mine, rank=r, world_size=world_size, step=step)
    (path / ckpt.COMPLETE).write_text(f"{step}\n")
    return path


@pytest.mark.parametrize(
    "latest, why",
    [
        (b"\xff\xfe\x00\x81garbage\x00", "it is not text"),
        (b"../elsewhere/step_00000004\n", "'../elsewhere/step_00000004' is not a checkpoint name in"),
        (b"/abs/step_00000004\n", "'/abs/step_00000004' is not a checkpoint name in"),
        (b"step_00000007\n", "step_00000007 is not a complete checkpoint"),
    ],
)
def test_a_garbage_latest_pointer_is_ignored_with_a_warning(tmp_path, latest, why):
    root = tmp_path / "checkpoints"
    _fake(root, 2)
    newest = _fake(root, 4)
    (root / "latest").write_bytes(latest)
    notes = []
    assert ckpt.select(root, "auto", note=notes.append) == newest
    assert len(notes) == 1 and notes[0].startswith(f"ignoring {root / 'latest'}: {why}")
    assert notes[0].endswith("; resuming from the newest complete checkpoint that verifies")
    assert ckpt.find_resume(root, "auto") == newest  # no UnicodeDecodeError on the rank-0 path either
    assert ckpt.finished(root, "auto", max_steps=4)["step"] == 4


def test_a_stale_latest_is_not_a_fault(tmp_path):
    """Killed between the rename and the pointer update: `latest` names the older one; the newest is complete."""
    root = tmp_path / "checkpoints"
    _fake(root, 2)
    newest = _fake(root, 4)
    (root / "latest").write_text("step_00000002\n")
    notes = []
    assert ckpt.select(root, "auto", note=notes.append) == newest and notes == []


def test_a_world_size_mismatch_is_not_reported_as_a_missing_file(tmp_path):
    root = tmp_path / "checkpoints"
    _fake(root, 2, world_size=2)
    with pytest.raises(TrainCheckpointError, match=r"written by 2 rank\(s\), this run has 1: .*resume with 2"):
        ckpt.select(root, "auto", note=lambda m: None)


def test_missing_files_and_manifests_are_named(tmp_path):
    root = tmp_path / "checkpoints"
    old = _fake(root, 2)
    new = _fake(root, 4, world_size=1)
    (new / "manifest" / "rank_00000.json").unlink()
    notes = []
    assert ckpt.select(root, "auto", note=notes.append) == old
    assert (
        notes[0]
        == f"checkpoint step_00000004 does not verify, skipped: {new / 'manifest' / 'rank_00000.json'} is missing"
    )
    # the model-states file of an engine, listed in the manifest, removed
    states = old / "unet" / "mp_rank_00_model_states.pt"
    states.parent.mkdir()
    states.write_bytes(b"states")
    ckpt.write_manifest(old, [old / ckpt.SHARED, ckpt.rank_file(old, 0), states], step=2)
    states.unlink()
    with pytest.raises(TrainCheckpointError, match=rf"step_00000002: {states} is missing"):
        ckpt.select(root, "auto", note=notes.append)
    # load() itself names what it cannot read
    from engine.train.engines import TorchEngine

    net = torch.nn.Linear(2, 2)
    engine = TorchEngine(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TrainCheckpointError, match=rf"cannot load the unet engine state: {old / 'unet'} holds none"):
        ckpt.load(old, {"unet": engine})
    ckpt.rank_file(old, 0).unlink()
    with pytest.raises(TrainCheckpointError, match=rf"{ckpt.rank_file(old, 0)} is missing"):
        ckpt.load(old, {})
    (old / ckpt.SHARED).write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(TrainCheckpointError, match=rf"{old / ckpt.SHARED} cannot be read"):
        ckpt.read_shared(old)


def test_step_directories_without_a_marker_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    real = _fake(root, 2)
    (root / "step_00000004" / "trainer").mkdir(parents=True)  # no COMPLETE
    notes = []
    assert ckpt.select(root, "auto", note=notes.append) == real
    assert not (root / "step_00000004").exists()
    assert notes == ["removed step_00000004: it has no COMPLETE marker"]


# -- untrusted files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        "unet/mp_rank_00_model_states.pt",
        "unet/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "trainer/shared.pt",
        "trainer/rank_00000.pt",
    ],
)
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, rel):
    """An attacker replaced a file and its manifest entry (so the checksums verify): the resume refuses the file in
    one line naming it, and the code in it never runs (DeepSpeed's own loads are made weights-only too)."""
    from tests.crafted import craft

    _train(tmp_path, 2)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    marker = tmp_path / "marker"
    craft(step / rel, marker, manifest_root=step)
    assert ckpt.quick_check(step) == []  # it verifies: only the loading can stop it
    with pytest.raises(TrainCheckpointError) as err:
        _train(tmp_path, 4)
    msg = str(err.value)
    assert f"{step / rel}: refused to load" in msg and "GLOBAL posix.system" in msg and "\n" not in msg
    assert not marker.exists()


def test_a_manifest_naming_a_file_outside_the_checkpoint_does_not_verify(tmp_path):
    root = tmp_path / "checkpoints"
    good, bad = _fake(root, 2), _fake(root, 4)
    (tmp_path / "outside.pt").write_bytes(b"x")
    body = json.loads(ckpt.manifest_file(bad, 0).read_text())
    body["files"]["../../outside.pt"] = {"size": 1, "blake2b": ckpt.file_digest(tmp_path / "outside.pt")}
    ckpt.manifest_file(bad, 0).write_text(json.dumps(body))
    assert ckpt.quick_check(bad) == [f"the manifest of {bad}: '../../outside.pt' is not a file inside {bad}"]
    assert ckpt.find_resume(root, "auto") == good


# -- signals -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def own_signal_handlers():
    """The loop leaves SIGTERM/SIGINT ignored once it stops for one (the process is on its way out): put them back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_sigint_in_a_lone_process_saves_and_the_launcher_prints_one_line(tmp_path, monkeypatch, capsys,
                                                                        own_signal_handlers):  # fmt: skip
    """launcher/train_interp.py in this process: SIGINT at step index 2 saves step 3 (not a regular checkpoint step),
    exits 130 with one line; a second signal (SIGTERM) in the middle of that save changes nothing; the re-run resumes
    there."""
    import os
    import signal

    from launcher import train_interp as cli

    real_write = ckpt._write

    def write_and_get_a_second_signal(partial, step, *args):
        if step == 3:  # the save for the SIGINT, under way
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write(partial, step, *args)

    monkeypatch.setattr(ckpt, "_write", write_and_get_a_second_signal)

    cfg = _cfg(tmp_path, 6)
    over = ["model.preset=tiny", "interp.channels=[4,8,8]", "interp.batch_size=4", "interp.steps=6",
            "checkpoint.every_steps=2", "logging.log_every=1", "logging.progress_bar=false",
            "logging.tensorboard=false", f"logging.run_dir={cfg.logging.run_dir}"]  # fmt: skip
    monkeypatch.setenv("VIDISTILL_FAULT", "sigint:2")
    capsys.readouterr()
    assert cli.main(["--synthetic", f"{F}x{H}x{W}", "model.in_dim=4", *over]) == 130
    step3 = tmp_path / "run" / "checkpoints" / "step_00000003"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [
        f"train_interp: stopped: SIGINT at step 3: saved checkpoint {step3}; re-run the same command to resume"
    ]
    assert ckpt.quick_check(step3) == [] and ckpt._verify_everywhere(step3) == []  # complete and intact
    monkeypatch.delenv("VIDISTILL_FAULT")
    monkeypatch.setattr(ckpt, "_write", real_write)
    assert cli.main(["--synthetic", f"{F}x{H}x{W}", "model.in_dim=4", *over]) == 0
    assert f"resumed from {step3} at step 3" in _log(tmp_path)
