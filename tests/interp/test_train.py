"""The interpolator trainer: the objective against the paper's all-frames form, PSNR by hand, exact resume through
DeepSpeed checkpoints, gradient accumulation, checkpoint layout, the export, and bad inputs."""

import math

import pytest
import torch
from safetensors.torch import load_file

from engine.config import load_config
from engine.interp.data import SyntheticLatents
from engine.interp.train import evaluate, interp_objective, latent_psnr, micro_batch, train_interp
from engine.models.interp_unet import InterpolatorError, InterpUNet, drop_frames, load_interpolator
from engine.train.checkpoint import complete_checkpoints

C, F, H, W = 4, 5, 8, 8  # Wan2.1: 16 channels, 21 frames of 60x104


def _cfg(tmp_path, name="run", **over):
    base = {
        "model.preset": "tiny",  # in_dim 4
        "interp.channels": "[4,8,8]",  # 128/256/512 for Wan
        "interp.batch_size": 4,
        "interp.steps": 4,
        "interp.lr": 3e-3,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 1,
        "logging.log_every": 1,
        "logging.progress_bar": False,
        "logging.run_dir": str(tmp_path / name),
    }
    base.update(over)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])


def _source(cfg, **kw):
    mb, _ = micro_batch(cfg, 1)
    return SyntheticLatents(C, F, H, W, batch_size=mb, seed=0, **kw)


def _losses(run):
    return [(h["step"], h["loss"], h["psnr"]) for h in run.history]


def test_objective_equals_the_papers_all_frames_loss_up_to_its_constant():
    """MSE over generated frames x (F-1)/(2F-1) == MSE(interpolate(drop_frames(x)), x) over all 2F-1 frames."""
    torch.manual_seed(0)
    net = InterpUNet(C, (4, 8, 8), residual=False)
    x = torch.randn(2, C, 9, H, W)
    ours, _ = interp_objective(net, x)
    paper = torch.nn.functional.mse_loss(net.interpolate(drop_frames(x)), x)
    torch.testing.assert_close(ours * 4 / 9, paper)


def test_psnr_by_hand_and_pooled_over_the_set():
    assert latent_psnr(0.01, 2.0).item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-12)
    torch.manual_seed(0)
    net = InterpUNet(C, (4, 8, 8), residual=False)
    batches = [torch.randn(2, C, 5, H, W), 3 * torch.randn(1, C, 5, H, W)]
    scores = evaluate(net, batches)
    # by hand: one MSE over every generated value of the set, one peak (range of those values)
    with torch.no_grad():
        err = torch.cat([(net.interpolate(x[:, :, ::2]) - x)[:, :, 1::2].flatten() for x in batches])
        blend_err = torch.cat([(0.5 * (x[:, :, 0:-1:2] + x[:, :, 2::2]) - x[:, :, 1::2]).flatten() for x in batches])
    targets = torch.cat([x[:, :, 1::2].flatten() for x in batches])
    peak = (targets.max() - targets.min()).item()
    assert scores["loss"] == pytest.approx(err.square().mean().item(), rel=1e-5)
    assert scores["psnr"] == pytest.approx(10 * math.log10(peak**2 / err.square().mean().item()), rel=1e-5)
    assert scores["psnr_blend"] == pytest.approx(10 * math.log10(peak**2 / blend_err.square().mean().item()), rel=1e-5)


def test_resume_continues_exactly(tmp_path):
    """4 steps straight == 2 steps, a new process state resuming from `latest`, 2 more: same losses, same weights."""
    cfg = _cfg(tmp_path, "straight")
    straight = train_interp(cfg, _source(cfg))
    first = train_interp(_cfg(tmp_path, "split", **{"interp.steps": 2}), _source(cfg))
    cfg2 = _cfg(tmp_path, "split")
    second = train_interp(cfg2, _source(cfg2))
    assert first.step == 2 and second.step == 4
    assert _losses(first) + _losses(second) == _losses(straight)
    a = load_file(str(tmp_path / "straight" / "interpolator" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "interpolator" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.history[-1]["loss"] != straight.history[0]["loss"]  # it trained


def test_checkpoint_layout_export_and_tensorboard(tmp_path):
    cfg = _cfg(tmp_path)
    run = train_interp(cfg, _source(cfg))
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000004"]  # keep_last=1 pruned step 2
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert (ckpts / "step_00000004" / "interpolator" / "model.safetensors").is_file()
    assert (ckpts / "step_00000004" / "unet" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed engine state
    assert run.export_dir == tmp_path / "run" / "interpolator"
    model = load_interpolator(run.export_dir, in_channels=C)
    assert model.channels == (4, 8, 8)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "config.yaml").is_file()
    # the export is the trained state, not the initial one: it differs from a fresh net
    fresh = InterpUNet(C, (4, 8, 8)).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in model.state_dict().items())


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full_cfg = _cfg(tmp_path, "full", **{"interp.steps": 2})
    acc_cfg = _cfg(tmp_path, "acc", **{"interp.steps": 2, "interp.micro_batch_size": 2})
    assert micro_batch(acc_cfg, 1) == (2, 2)
    full = train_interp(full_cfg, _source(full_cfg))
    acc = train_interp(acc_cfg, _source(acc_cfg))
    for h_full, h_acc in zip(full.history, acc.history):
        assert h_acc["loss"] == pytest.approx(h_full["loss"], rel=1e-5)
    a = load_file(str(tmp_path / "full" / "interpolator" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "interpolator" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_the_interpolator_warms_up_its_learning_rate(tmp_path):
    from engine.interp.train import build_engine

    engine = build_engine(_cfg(tmp_path, **{"interp.warmup_steps": 4}), 1)
    assert engine.get_lr() == [pytest.approx(3e-3 / 4, rel=1e-12)]  # update 0 at lr / 4
    assert build_engine(_cfg(tmp_path, "flat"), 1).lr_scheduler is None  # warmup_steps 0: a constant rate


def test_bad_inputs(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(InterpolatorError, match=r"expected \(B, 4, F, H, W\) with 4 = model.in_dim"):
        train_interp(cfg, SyntheticLatents(16, F, H, W, batch_size=4))
    with pytest.raises(InterpolatorError, match="at least 3 latent frames"):
        train_interp(_cfg(tmp_path, "two"), SyntheticLatents(C, 2, H, W, batch_size=4))
    with pytest.raises(ValueError, match="interp.batch_size=4 is not divisible by the 3 data-parallel ranks"):
        micro_batch(cfg, 3)
    with pytest.raises(ValueError, match="interp.micro_batch_size=3 does not divide the 4 samples per rank"):
        micro_batch(_cfg(tmp_path, **{"interp.micro_batch_size": 3}), 1)


def test_even_clips_lose_their_last_frame(tmp_path):
    """F = 6 trains on frames 0..4 (keep 0, 2, 4; predict 1, 3): the loss equals the one computed on x[:, :, :5]."""
    torch.manual_seed(0)
    net = InterpUNet(C, (4, 8, 8), residual=False)
    x = torch.randn(1, C, 6, H, W)
    assert evaluate(net, [x])["loss"] == pytest.approx(interp_objective(net, x[:, :, :5])[0].item(), rel=1e-6)


@pytest.mark.slow
def test_learns_motion_beyond_the_linear_blend(tmp_path):
    """On moving patterns the trained interpolator beats the linear blend's MSE on held-out clips (it starts equal)."""
    over = {
        "interp.steps": 400,
        "interp.channels": "[16,32,64]",
        "interp.batch_size": 8,
        "interp.lr": 1e-3,
        "checkpoint.every_steps": 1000,
        "logging.log_every": 100,
    }
    run = train_interp(_cfg(tmp_path, **over), SyntheticLatents(C, F, 16, 16, batch_size=8, seed=0))
    held_out = SyntheticLatents(C, F, 16, 16, batch_size=8, seed=999)
    scores = evaluate(load_interpolator(run.export_dir), held_out, max_batches=4)
    assert scores["loss"] < 0.85 * scores["loss_blend"]


def test_cli(tmp_path, capsys):
    from launcher.train_interp import main

    args = [
        "--synthetic",
        "5x8x8",
        "model.preset=tiny",
        "interp.channels=[4,8,8]",
        "interp.batch_size=2",
        "interp.steps=2",
        "logging.progress_bar=false",
        f"logging.run_dir={tmp_path / 'cli'}",
    ]
    assert main(args) == 0
    assert f"trained steps 1-2; interpolator exported to {tmp_path / 'cli' / 'interpolator'}" in capsys.readouterr().out
    assert main(args) == 0  # resumes from `latest` at step 2
    assert "nothing to train" in capsys.readouterr().out
    assert main(["--latents", str(tmp_path / "missing"), "model.preset=tiny"]) == 2
    assert "latent directory not found" in capsys.readouterr().err
    assert main(["--synthetic", "5x8x8", "interp.zero_stage=3"]) == 2
    assert "config key `interp.zero_stage`" in capsys.readouterr().err
