"""Optimizer offload (``deepspeed.offload_optimizer``): DeepSpeed's CPU Adam instead of a client torch AdamW (which
DeepSpeed refuses with offload), the same training as without offload on 2 gloo ranks, and the config-time refusals."""

from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.train import dist
from engine.train.optim import adamw, check_offload
from launcher import run as run_cli
from tests.distill.test_trainer_distributed import launch, report, teacher  # noqa: F401 (teacher: fixture)

TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"


def _ds_config(stage=2):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "steps_per_print": 10**9,
    }


def test_deepspeed_refuses_torch_adamw_with_offload_and_takes_cpu_adam():
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    dist.init()
    cfg = load_config(TOY, ["deepspeed.offload_optimizer=true"]).optim
    refused = torch.nn.Linear(4, 3)
    with pytest.raises(ZeRORuntimeException, match="client provided optimizer"):  # the defect this avoids
        deepspeed.initialize(model=refused, optimizer=torch.optim.AdamW(refused.parameters()), config=_ds_config())
    model = torch.nn.Linear(4, 3)  # a fresh one: the refused initialize left its hooks on the first
    opt = adamw(model.parameters(), cfg, 1e-2, offload=True)
    assert isinstance(opt, DeepSpeedCPUAdam) and opt.adam_w_mode
    assert opt.defaults["weight_decay"] == cfg.weight_decay and opt.defaults["betas"] == tuple(cfg.betas)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config())
    before = model.weight.detach().clone()
    engine.backward(engine(torch.ones(2, 4)).square().mean())
    engine.step()
    assert not torch.equal(before, model.weight.detach())


def test_offload_refused_at_config_time(tmp_path, capsys, monkeypatch):
    from deepspeed.ops.op_builder import CPUAdamBuilder

    cfg = load_config(TOY, ["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"])
    with pytest.raises(ConfigError, match=r"`deepspeed.offload_optimizer`: needs deepspeed.zero_stage 1, 2 or 3"):
        check_offload(cfg)

    def no_compiler(self, verbose=False):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(CPUAdamBuilder, "load", no_compiler)
    argv = ["--config", str(TOY), f"logging.run_dir={tmp_path / 'run'}", "deepspeed.offload_optimizer=true"]
    assert run_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config key `deepspeed.offload_optimizer`" in err, err
    assert "neither is installed nor builds here (Ninja is required" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


@pytest.mark.distributed
def test_offloaded_training_matches_the_device_optimizer(tmp_path, teacher):  # noqa: F811
    runs = {}
    for name, offload in (("offload", "true"), ("device", "false")):
        proc, run_dir = launch(
            tmp_path, teacher, name, steps=2, every=2, overrides=[f"deepspeed.offload_optimizer={offload}"]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (report(run_dir), torch.load(run_dir / "final_weights.pt"))
    (rep, weights), (ref, ref_weights) = runs["offload"], runs["device"]
    assert rep["optimizers"] == {"generator": "DeepSpeedCPUAdam", "critic": "DeepSpeedCPUAdam"}
    assert ref["optimizers"] == {"generator": "AdamW", "critic": "AdamW"}
    assert [r["changed"] for r in rep["rows"]] == [r["changed"] for r in ref["rows"]]
    for a, b in zip(rep["rows"], ref["rows"]):
        assert a["losses"].keys() == b["losses"].keys()
        for k in a["losses"]:
            assert a["losses"][k] == pytest.approx(b["losses"][k], rel=1e-5, abs=1e-6), k
    for role in ("generator", "critic"):
        for name, w in weights[role].items():
            start = ref_weights[role][name]
            torch.testing.assert_close(w, start, rtol=1e-5, atol=1e-6, msg=f"{role} {name}")


def test_a_stale_build_lock_is_an_error_naming_the_file_not_a_hang(tmp_path, monkeypatch):
    """A killed just-in-time build leaves `<build dir>/lock`; torch would wait on it forever."""
    import os
    import time

    from engine.train import optim

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory("cpu_adam", verbose=False))
    optim.check_build_lock("cpu_adam")  # no lock: nothing to say
    lock = build / "lock"
    lock.touch()
    optim.check_build_lock("cpu_adam")  # a fresh lock: another build may be running, wait as torch does
    old = time.time() - 2 * optim.STALE_BUILD_LOCK_S
    os.utime(lock, (old, old))
    with pytest.raises(ConfigError) as err:
        optim.check_build_lock("cpu_adam")
    msg = str(err.value)
    assert msg.startswith("config key `deepspeed.offload_optimizer`:") and str(lock) in msg and "20 min old" in msg
    (build / "cpu_adam.so").touch()  # built: the lock is harmless
    optim.check_build_lock("cpu_adam")
