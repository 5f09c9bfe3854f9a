"""Precompute under torchrun: each rank works on the GPU of its LOCAL_RANK (models, the current CUDA device, and the
GPU DALI decodes on), not every rank on GPU 0. CUDA is faked (availability, count, set_device), so this runs on CPU
through the launcher's own code path."""

from __future__ import annotations

import pytest
import torch

import engine.worlds.precompute as pre
from engine.config import ConfigError
from engine.data.decoders import DaliDecoder
from launcher import precompute as precompute_cli
from tests.data.conftest import write_jsonl


@pytest.fixture
def fake_cuda(monkeypatch):
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    return current


@pytest.mark.parametrize(
    "local_rank, requested, want",
    [
        ("0", None, "cuda:0"),
        ("3", None, "cuda:3"),
        ("2", "cuda", "cuda:2"),
        ("2", "cuda:1", "cuda:1"),
        ("3", "cpu", "cpu"),
    ],
)
def test_select_device_follows_local_rank(fake_cuda, local_rank, requested, want):
    assert pre.select_device(requested, {"LOCAL_RANK": local_rank}) == torch.device(want)


def test_select_device_without_cuda_or_past_the_last_gpu(fake_cuda, monkeypatch):
    with pytest.raises(ConfigError, match=r"cuda:4 asked \(LOCAL_RANK=4\), but 4 GPUs are visible"):
        pre.select_device(None, {"LOCAL_RANK": "4"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pre.select_device(None, {"LOCAL_RANK": "3"}) == torch.device("cpu")


def test_precompute_rank_binds_its_gpu_and_dali_decodes_there(tmp_path, vp9_entries, fake_cuda, monkeypatch, capsys):
    seen = {}

    class World:  # the codec never runs: precompute_latents is replaced below
        def load_codec(self):
            return "codec"

    def build_world(cfg, device):
        seen["world_device"] = device
        return World()

    def precompute_latents(reader, codec, *a, **kw):
        seen["decoder"] = reader.decoder

    monkeypatch.setattr(pre, "build_world", build_world)
    monkeypatch.setattr(pre, "precompute_latents", precompute_latents)
    monkeypatch.setattr(pre, "_try_index", lambda *a: True)
    monkeypatch.setenv("LOCAL_RANK", "2")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"path": e.path, "caption": e.caption} for e in vp9_entries])
    (tmp_path / "vae").mkdir()  # precompute checks the VAE path exists before building anything (never loaded here)
    argv = ["--no-progress", f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'c'}", "data.reader=auto",
            "data.num_frames=9", "data.height=16", "data.width=16", f"vae.path={tmp_path / 'vae'}",
            "--kinds", "latents"]  # fmt: skip
    assert precompute_cli.main(argv) == 0
    assert fake_cuda == [torch.device("cuda", 2)]  # the current device, before anything is built
    assert seen["world_device"] == "cuda:2"
    dec = seen["decoder"]
    assert isinstance(dec, DaliDecoder) and dec.device == "gpu" and dec.device_id == 2
    assert capsys.readouterr().out.strip().endswith("latents: index written")
