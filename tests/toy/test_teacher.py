"""The toy teacher's training code: schedule, loss, caption dropout, exact resume, export."""

import pytest
import torch

from engine.config import ToyTeacherConfig, model_preset
from engine.diffusion.flow import FlowSchedule
from engine.models.checkpoint import load_weights
from engine.models.wan import WanModel
from engine.toy.teacher import TeacherTrainer, flow_matching_loss, lr_at


def test_warmup_stable_decay_schedule():
    cfg = ToyTeacherConfig(steps=1000, lr=1e-3, warmup_steps=100, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-5)  # (0 + 1) / 100 of the peak
    assert lr_at(cfg, 99) == pytest.approx(1e-3)
    assert lr_at(cfg, 500) == pytest.approx(1e-3)  # stable
    assert lr_at(cfg, 800) == pytest.approx(1e-3)  # decay starts at 80%
    assert lr_at(cfg, 900) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))
    assert lr_at(cfg, 1000) == pytest.approx(1e-4)


def test_flow_matching_loss_is_the_velocity_mse():
    """Against the formula written out: sigma from the same generator, x_t = (1-s) x0 + s e, target e - x0."""
    x0 = torch.randn(3, 4, 2, 4, 4)
    schedule = FlowSchedule(shift=2.0)
    seen = {}

    def model(x_t, t, ctx):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss = flow_matching_loss(model, x0, torch.zeros(3, 5, 8), schedule, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    u = torch.rand(3, generator=g)
    s = 2.0 * u / (1 + u)
    e = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(seen["t"], s * 1000)
    torch.testing.assert_close(seen["x_t"], (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * e)
    assert loss.item() == pytest.approx((e - x0).square().mean().item(), rel=1e-6)


def _trainer(tmp_path, steps, name="run", accum=1):
    cfg = ToyTeacherConfig(
        grad_accum_steps=accum,
        steps=steps,
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        save_every=3,
        caption_dropout=0.5,
        out_dir=str(tmp_path / name),
        export_dir=str(tmp_path / name / "export"),
    )
    model_cfg = model_preset("tiny", gradient_checkpointing=False)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(10, 4, 3, 4, 4, generator=g), torch.randn(10, 6, 16, generator=g))
    return TeacherTrainer(cfg, model_cfg, FlowSchedule(shift=2.0), data, torch.zeros(1, 6, 16))


def test_caption_dropout_uses_the_empty_prompt(tmp_path):
    t = _trainer(tmp_path, 1)
    t.cfg.batch_size = 2000
    t.latents = t.latents.repeat(200, 1, 1, 1, 1)
    t.context = t.context.repeat(200, 1, 1)
    _, context = t._batch()
    dropped = (context == 0).all(dim=(1, 2)).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact_and_export_holds_the_ema(tmp_path, accum):
    straight = _trainer(tmp_path, 6, "straight", accum)
    straight.run(progress=False)
    first = _trainer(tmp_path, 3, "split", accum)  # stops (and saves) at step 3
    first.run(progress=False)
    second = _trainer(tmp_path, 6, "split", accum)  # same directory: resumes at 3
    summary = second.run(progress=False)
    assert summary["resumed"] and summary["steps_run"] == 3
    opt_steps = {int(v["step"]) for v in second.engines["teacher"].optimizer.state_dict()["state"].values()}
    assert opt_steps == {6}  # one optimizer update per step, whatever the number of micro-batches
    for (n, a), (_, b) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), n
    out = second.export()
    model = WanModel(model_preset("tiny"))
    load_weights(model, out)
    for (n, a), (_, b) in zip(model.named_parameters(), second.ema.named_parameters()):
        assert torch.equal(a, b), n
    assert not torch.equal(second.ema.head.head.weight, second.model.head.head.weight)  # the average, not the last


def test_a_held_output_directory_refuses_a_second_teacher_run(tmp_path):
    from engine.train.runlock import RunDirBusyError, RunLock

    trainer = _trainer(tmp_path, 2)
    lock = RunLock.acquire(trainer.out)
    try:
        with pytest.raises(RunDirBusyError, match="in use by another job"):
            trainer.run(progress=False)
    finally:
        lock.release()
    assert not (trainer.out / "checkpoints").exists()


def test_non_finite_teacher_weights_are_not_checkpointed_or_exported(tmp_path):
    from engine.train.guards import NonFiniteWeightsError

    first = _trainer(tmp_path, 3)
    first.run(progress=False)  # a good checkpoint at step 3
    again = _trainer(tmp_path, 6)
    again.cfg.lr = float("inf")  # the first update after the resume makes every weight non-finite
    with pytest.raises(NonFiniteWeightsError, match="non-finite weights in teacher: checkpoint refused"):
        again.run(progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003"]
    with torch.no_grad():
        again.ema.head.head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="export"):
        again.export()
    assert not (tmp_path / "run" / "export").exists()
