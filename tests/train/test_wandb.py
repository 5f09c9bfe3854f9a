"""Weights & Biases beside TensorBoard, offline: a Loop run leaves an offline W&B run directory holding the same
scalars as its TensorBoard events at the same steps, the sample videos as media and the resolved config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, load_config
from engine.data.mp4 import write_mp4
from engine.train.engines import TorchEngine
from engine.train.loop import Loop, LoopSettings, Update
from engine.train.timer import PhaseTimer

wandb = pytest.importorskip("wandb")  # in the dev extra
from wandb.proto.wandb_internal_pb2 import Record  # noqa: E402

BLOCK = 32768  # the LevelDB log block size of W&B's transaction log (run-<id>.wandb)


def wandb_records(path: Path) -> list[Record]:
    """The protobuf records of an offline run's ``run-<id>.wandb``: a 7-byte W&B header, then LevelDB log records
    (crc32 4, length 2, type 1: full 1, first 2, middle 3, last 4) that never straddle a 32 KiB block."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(parts))
            parts = b""
    return records


class Regression:
    """A one-layer least-squares fit: a method of the loop with one role and a loss that moves."""

    name, samples_per_step = "toy", 4

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 1)
        self.engines = {"net": TorchEngine(self.net, torch.optim.SGD(self.net.parameters(), lr=0.1))}
        self.timer = PhaseTimer()
        self.x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    def updates(self, step, batch):
        loss = (self.net(self.x) - 1.0).square().mean()
        yield Update("net", loss, {"loss": loss.detach()})

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def rank_state_dict(self):
        return {}

    def load_rank_state_dict(self, state):
        pass

    def log_scalars(self, seconds, steps):
        self.timer.pop()
        return {"custom/answer": 42.0}


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_offline_run_holds_the_scalars_videos_and_config(tmp_path):
    run_dir = tmp_path / "run"
    written = []

    def sampler(step: int) -> dict:
        frames = np.full((5, 16, 16, 3), 40 * step, dtype=np.uint8)
        written.append(write_mp4(run_dir / "samples" / f"step{step:07d}_seed0_00_a_prompt.mp4", frames, 8.0))
        return {"videos": [written[-1]], "quality": None}

    resolved = {"optim": {"lr": 0.1}, "logging": {"wandb": {"mode": "offline"}}}
    settings = LoopSettings(run_dir, max_steps=4, every_steps=4, keep_last=1, log_every=2, progress_bar=False,
                            wandb_mode="offline", wandb_project="vidistill-test", run_config=resolved)  # fmt: skip
    Loop(settings, Regression(), sampler=sampler, sample_every=2).run()

    (offline,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    (log_file,) = offline.glob("run-*.wandb")
    records = wandb_records(log_file)
    history: dict[str, dict[int, object]] = {}  # key -> step -> value (a media item: its dict of fields)
    for r in records:
        if r.WhichOneof("record_type") == "history":
            step = r.history.step.num
            for item in r.history.item:
                key, *field = list(item.nested_key) or [item.key]
                value = json.loads(item.value_json)
                if field:
                    history.setdefault(key, {}).setdefault(step, {})[field[0]] = value
                else:
                    history.setdefault(key, {})[step] = value
    tb = tensorboard_scalars(run_dir)
    assert {"toy/loss", "custom/answer", "perf/samples_per_s"} <= set(tb)
    for tag, by_step in tb.items():  # every TensorBoard scalar, at the same steps, with the same value
        assert set(by_step) == {2, 4}, tag
        for step, value in by_step.items():
            assert history[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    assert history["toy/loss"][4] < history["toy/loss"][2]  # the loss did move
    videos = history["samples/seed0_00_a_prompt"]
    assert set(videos) == {2, 4} and all(v["_type"] == "video-file" for v in videos.values())
    assert all((offline / "files" / v["path"]).is_file() for v in videos.values())  # the mp4s, copied as media
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    assert config["optim"] == {"lr": 0.1} and config["logging"] == {"wandb": {"mode": "offline"}}
    assert (run_dir / "wandb-run-id").read_text().strip() == log_file.stem.removeprefix("run-")


def test_settings_follow_the_config_and_default_off(tmp_path, monkeypatch):
    cfg = load_config(None, [f"logging.run_dir={tmp_path / 'r'}", "logging.wandb.mode=offline",
                             "logging.wandb.project=p"])  # fmt: skip
    s = LoopSettings.of(cfg)
    assert (s.wandb_mode, s.wandb_project) == ("offline", "p")
    assert s.run_config["logging"]["wandb"] == {"project": "p", "mode": "offline"}
    assert s.run_config["optim"]["lr"] == cfg.optim.lr  # the whole resolved config
    assert LoopSettings.of(load_config(None, [])).wandb_mode == "disabled"
    Loop(LoopSettings(tmp_path / "off", 1, 1, 1, progress_bar=False, tensorboard=False), Regression()).run()
    assert not (tmp_path / "off" / "wandb").exists()  # off by default: nothing written
    monkeypatch.setattr("engine.config._importable", lambda module: False)
    with pytest.raises(ConfigError, match="`logging.wandb.mode`: needs the wandb package"):
        load_config(None, ["logging.wandb.mode=offline"])
