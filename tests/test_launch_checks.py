"""What a launch refuses before it builds anything: an unwritable run directory, fp16 on a CPU, and toy-world settings
that would be ignored or cannot fill a batch. Each is one line on stderr naming the config key, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from launcher import run as run_cli
from launcher import train_interp as interp_cli
from launcher import train_teacher as teacher_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOY = CONFIGS / "toy.yaml"


def _blocked(tmp_path) -> str:
    (tmp_path / "a_file").write_text("")
    return str(tmp_path / "a_file" / "run")  # a directory under a file: no user (root included) can create it


def _one_line(capsys, key):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config key `{key}`" in err, err
    return err


def test_run_stops_on_an_unwritable_run_dir(tmp_path, capsys, monkeypatch):
    import engine.distill.job as job

    monkeypatch.setattr(job, "run_distillation", lambda cfg: pytest.fail("started"))
    assert run_cli.main(["--config", str(TOY), f"logging.run_dir={_blocked(tmp_path)}"]) == 2
    assert "not a writable directory" in _one_line(capsys, "logging.run_dir")


def test_run_stops_on_fp16_without_cuda(tmp_path, capsys, monkeypatch):
    import torch

    import engine.distill.job as job

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(job, "run_distillation", lambda cfg: pytest.fail("started"))
    argv = ["--config", str(TOY), f"logging.run_dir={tmp_path / 'run'}", "deepspeed.dtype=fp16"]
    assert run_cli.main(argv) == 2
    assert "fp16 needs CUDA" in _one_line(capsys, "deepspeed.dtype")


def test_train_interp_stops_on_an_unwritable_run_dir(tmp_path, capsys):
    argv = [
        "--config",
        str(CONFIGS / "interp-toy.yaml"),
        "--synthetic",
        "9x8x8",
        f"logging.run_dir={_blocked(tmp_path)}",
    ]
    assert interp_cli.main(argv) == 2
    _one_line(capsys, "logging.run_dir")


def test_train_teacher_stops_on_an_unwritable_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(teacher_cli, "train_teacher", lambda cfg: pytest.fail("started"))
    assert teacher_cli.main(["--config", str(TOY), f"toy_teacher.out_dir={_blocked(tmp_path)}"]) == 2
    _one_line(capsys, "toy_teacher.out_dir")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.source=cache", "data.cache_dir=/data/cache"], "data.source"),
        (["data.cache_dir=/data/cache"], "data.cache_dir"),
        (["data.manifest=clips.jsonl"], "data.manifest"),
    ],
)
def test_the_toy_distillation_world_refuses_data_it_would_ignore(overrides, key, tmp_path):
    from engine.worlds import build_world

    cfg = load_config(TOY, [f"toy.cache_dir={tmp_path / 'never'}", *overrides])
    with pytest.raises(ConfigError, match=rf"config key `{key}`: .*toy world renders its own clips"):
        build_world(cfg, training=True)
    assert not (tmp_path / "never").exists()  # refused before the dataset is rendered
    build_world(cfg)  # generation, precompute and the interpolator's --online codec do not read it: still allowed


def test_the_toy_micro_batch_must_fit_each_ranks_share(tmp_path, monkeypatch):
    from engine.train import dist
    from engine.worlds import build_world

    cfg = load_config(TOY, ["toy.num_clips=48", f"toy.cache_dir={tmp_path / 'never'}", "optim.micro_batch_size=22"])
    monkeypatch.setattr(dist, "world_size", lambda: 2)  # 48 clips, 5 val: 43 train, 21 per rank
    with pytest.raises(ConfigError, match=r"config key `optim.micro_batch_size`: 22 is more than the 21 toy training"):
        build_world(cfg, training=True)
    assert not (tmp_path / "never").exists()
