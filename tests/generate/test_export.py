"""The deployment directory: the export CLI assembles student + interpolator (checked before writing), generation finds
the interpolator next to the student, and a ZeRO-3 trainer checkpoint is consolidated offline into the diffusers
layout with exactly the trained weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from engine.config import load_config, model_preset
from engine.generate import load_dit, resolve_model
from engine.models.checkpoint import CheckpointError, diffusers_to_official, iter_tensors, load_weights, save_weights
from engine.models.wan import WanModel
from launcher import export as export_cli
from launcher import generate as generate_cli
from tests.generate.conftest import TOY_YAML, save_interp

WORKER = Path(__file__).resolve().parents[1] / "distill" / "ds_worker.py"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


def test_export_assembles_student_and_interpolator(deploy, trained):
    src, out = tensors(trained["student"]), tensors(deploy / "transformer")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    assert (deploy / "transformer" / "config.json").read_text() == (trained["student"] / "config.json").read_text()
    a = load_file(trained["interp_run"] / "interpolator" / "model.safetensors")
    b = load_file(deploy / "interpolator" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interpolator_added_to_an_existing_export_is_found_by_generate(tmp_path, trained):
    export = tmp_path / "run" / "export"  # what the distillation job leaves: export/transformer only
    shutil.copytree(trained["student"], export / "transformer")
    args = ["--config", str(TOY_YAML), "--student", str(export / "transformer"), "--sampler", "vif",
            "--prompt", "a red circle", "--out", str(tmp_path / "videos"), "--no-progress"]  # fmt: skip
    assert generate_cli.main(args) == 2  # nothing next to the student yet
    assert export_cli.main(["--interpolator", str(trained["interp_run"]), "--out", str(export)]) == 0
    assert generate_cli.main(args) == 0
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1


def test_export_checks_channels_before_writing_anything(tmp_path, trained, capsys):
    interp8 = save_interp(tmp_path / "interp8", in_channels=8)
    out = tmp_path / "deploy"
    assert export_cli.main(["--checkpoint", str(trained["student"]), "--interpolator", str(interp8),
                            "--out", str(out)]) == 2  # fmt: skip
    assert "interpolator has 8 latent channels but the student's model.in_dim is 16" in capsys.readouterr().err
    assert not out.exists()  # not even the student was written
    shutil.copytree(trained["student"], out / "transformer")  # against a student already there
    assert export_cli.main(["--interpolator", str(interp8), "--out", str(out)]) == 2
    assert not (out / "interpolator").exists()


def test_export_of_a_missing_checkpoint(tmp_path, capsys):
    assert export_cli.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# From the trainer's ZeRO-3 checkpoint (a real 2-process job, as tests/distill/test_trainer_distributed.py runs it)
# ---------------------------------------------------------------------------------------------------------------------

RUN_YAML = """
model: {{preset: tiny, checkpoint: {teacher}}}
optim: {{lr: 1.0e-3, critic_lr: 1.0e-3, micro_batch_size: 2}}
train: {{max_steps: 1}}
checkpoint: {{every_steps: 1, keep_last: 1}}
logging: {{run_dir: {run_dir}, log_every: 1, progress_bar: false}}
deepspeed: {{param_persistence_threshold: 0}}
data: {{num_frames: 9, height: 32, width: 32}}
vae: {{kind: toy, temporal_stride: 1, spatial_stride: 8}}
text_encoder: {{kind: toy}}
"""


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory) -> Path:
    """One step (a generator update: step 1 of the 5:1 schedule) of ZeRO-3 on 2 gloo ranks; its run directory."""
    root = tmp_path_factory.mktemp("zero")
    torch.manual_seed(0)
    cfg = model_preset("tiny")  # dim 24, 2 layers
    teacher = WanModel(cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.1)
    save_weights(teacher, cfg, root / "teacher")
    (root / "run.yaml").write_text(RUN_YAML.format(teacher=root / "teacher", run_dir=root / "run"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER),
           str(root / "run.yaml")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.mark.distributed
def test_export_from_a_zero3_checkpoint(tmp_path, zero_run):
    step = zero_run / "checkpoints" / "step_00000001"
    out = tmp_path / "deploy"
    assert export_cli.main(["--checkpoint", str(step), "--out", str(out)]) == 0
    trained = torch.load(zero_run / "final_weights.pt")["generator"]  # gathered by the worker after the last step
    teacher = {diffusers_to_official(k): v for k, v in tensors(zero_run.parent / "teacher").items()}
    assert any(not torch.equal(trained[k], teacher[k]) for k in trained)  # the generator did move off the teacher
    ours = WanModel(load_config(zero_run / "config.yaml").model).eval()
    assert load_weights(ours, out / "transformer") == "diffusers"
    assert all(torch.equal(ours.state_dict()[k], trained[k]) for k in trained)  # the trained fp32 weights, exactly
    # the export is a diffusers WanTransformer3DModel that computes what our model does
    ref = WanTransformer3DModel.from_pretrained(out / "transformer").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, t = (
        torch.randn(2, 4, 3, 4, 4, generator=g),
        torch.randn(2, 6, 16, generator=g),
        torch.tensor([900.0, 300.0]),
    )
    with torch.no_grad():
        assert (ref(x, t, ctx, return_dict=False)[0] - ours(x, t, ctx)).abs().max() <= 1e-5
    # generation reads the step directory directly, too (same consolidation, no export)
    direct = load_dit(
        resolve_model(str(step), "--student", load_config(zero_run / "config.yaml")), "cpu", torch.float32
    )
    assert all(torch.equal(direct.state_dict()[k], trained[k]) for k in trained)


@pytest.mark.distributed
def test_zero3_export_needs_the_run_config(tmp_path, zero_run, capsys):
    moved = tmp_path / "elsewhere" / "step_00000001"  # no <run>/config.yaml two levels up
    shutil.copytree(zero_run / "checkpoints" / "step_00000001", moved)
    assert export_cli.main(["--checkpoint", str(moved), "--out", str(tmp_path / "d")]) == 2
    assert "config file not found" in capsys.readouterr().err
    args = ["--checkpoint", str(moved), "--config", str(zero_run / "config.yaml"), "--out", str(tmp_path / "d")]
    assert export_cli.main([*args, "--dtype", "bf16"]) == 0
    assert {t.dtype for t in tensors(tmp_path / "d" / "transformer").values()} == {torch.bfloat16}


def test_a_distillation_checks_its_configured_interpolator_before_building(tmp_path):
    """interp.checkpoint is exported next to the student at the end of a job; a missing one or one of another latent
    space is a config error at the start, not after hours of training."""
    from engine.config import ConfigError
    from engine.distill.job import configured_interpolator

    cfg = load_config(TOY_YAML)
    good = save_interp(tmp_path / "run" / "interpolator", in_channels=16)
    assert configured_interpolator(load_config(TOY_YAML, ["interp.checkpoint=null"]), 16) is None
    assert configured_interpolator(load_config(TOY_YAML, [f"interp.checkpoint={good}"]), 16) == good
    assert configured_interpolator(load_config(TOY_YAML, [f"interp.checkpoint={good.parent}"]), 16) == good  # run dir
    with pytest.raises(ConfigError, match="`interp.checkpoint`.*not found"):
        configured_interpolator(load_config(TOY_YAML, [f"interp.checkpoint={tmp_path / 'none'}"]), 16)
    with pytest.raises(ConfigError, match="`interp.checkpoint`.*8 latent channels"):
        configured_interpolator(load_config(TOY_YAML, [f"interp.checkpoint={save_interp(tmp_path / 'i8', 8)}"]), 16)
    assert cfg.interp.checkpoint  # the toy recipe ships one


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_a_crafted_pickle_in_a_step_directory_is_refused_by_export_and_generate(tmp_path, zero_run, name, capsys):
    """zero_to_fp32 (behind export and generate --student <step dir>) unpickles every model- and optim-states file of
    the step directory: a crafted one is refused in one line naming it, before anything is written, and its code never
    runs."""
    from tests.crafted import craft

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000001"
    shutil.copytree(zero_run / "checkpoints" / "step_00000001", step)
    shutil.copy(zero_run / "config.yaml", run / "config.yaml")
    marker, bad = tmp_path / "marker", step / "generator" / name
    craft(bad, marker)
    capsys.readouterr()
    assert export_cli.main(["--checkpoint", str(step), "--out", str(tmp_path / "deploy")]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"export: error: {bad}: refused to load"), err
    assert not (tmp_path / "deploy" / "transformer").exists()
    # generate --student <step dir> reads it the same way (its CLI prints a CheckpointError as one line)
    with pytest.raises(CheckpointError) as refused:
        load_dit(resolve_model(str(step), "--student", load_config(run / "config.yaml")), "cpu", torch.float32)
    assert str(refused.value).startswith(f"{bad}: refused to load") and "\n" not in str(refused.value)
    assert not marker.exists()


def _lines(stderr: str) -> list[str]:
    """stderr without zero_to_fp32's progress bar (``Loading checkpoint shards``, a tqdm bar)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("Loading checkpoint shards")]
