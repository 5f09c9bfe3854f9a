"""Caches: rank-parallel sharded safetensors + index, resume, fingerprint guard, and the cache dataset."""

from __future__ import annotations

import pytest
import torch

from engine.config import DataConfig, RunConfig, TextEncoderConfig, VAEConfig
from engine.data.cache import CacheError, precompute_latents, precompute_text, shard_path, write_index
from engine.data.decoders import PyAVDecoder
from engine.data.manifest import ManifestEntry, load_manifest
from engine.data.reader import VideoReader
from engine.data.source import CacheDataset, build_source
from engine.data.text import UMT5TextEncoder
from engine.data.vae import WanVAE, load_autoencoder
from engine.worlds.precompute import run_precompute
from tests.data.conftest import write_jsonl
from tests.data.tiny_models import save_text_encoder, save_vae

PRINT = {"test": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_text_encoder(root)
    save_vae(root)
    return root


@pytest.fixture(scope="module")
def encoder(models):
    return UMT5TextEncoder.from_pretrained(models, max_length=12)


@pytest.fixture(scope="module")
def codec(models):
    return WanVAE(load_autoencoder(models), tiling=False)


def entries_with_bad(vp9_entries, tmp_path) -> list[ManifestEntry]:
    (tmp_path / "empty.webm").write_bytes(b"")
    return [*vp9_entries[:5], ManifestEntry(5, str(tmp_path / "empty.webm"), "an empty file")]


def reader(entries):
    return VideoReader(entries, PyAVDecoder(), batch_size=2, num_frames=9, fps=16.0, height=16, width=16)


def test_text_cache_two_ranks_resume_and_dataset(vp9_entries, encoder, tmp_path):
    entries = vp9_entries
    written = [precompute_text(entries, encoder, tmp_path, fingerprint=PRINT, shard_size=2, batch_size=3, rank=r,
                               world_size=2, progress=False) for r in (0, 1)]  # fmt: skip
    assert written == [[0, 2], [1]]  # shard k goes to rank k mod 2
    with pytest.raises(CacheError, match="missing"):
        write_index(tmp_path, "text", len(entries) + 2, 2)  # a shard that no rank wrote yet
    mtime = shard_path(tmp_path, "text", 1).stat().st_mtime_ns
    assert precompute_text(entries, encoder, tmp_path, fingerprint=PRINT, shard_size=2, rank=1, world_size=2,
                           progress=False) == []  # fmt: skip
    assert shard_path(tmp_path, "text", 1).stat().st_mtime_ns == mtime  # resume: finished shards untouched
    index = write_index(tmp_path, "text", len(entries), 2)
    assert [s["index"] for s in index["shards"]] == [[0, 1], [2, 3], [4, 5]] and index["max_length"] == 12

    ds = CacheDataset(tmp_path, kinds=["text"], batch_size=3, shuffle=False, num_epochs=1)
    batches = list(ds)
    emb, lengths = encoder.encode([e.caption for e in entries])
    got = torch.cat([b["text_emb"] for b in batches])
    assert got.shape == (6, 12, 16)
    torch.testing.assert_close(got, emb, rtol=1e-2, atol=1e-2)  # stored in bf16
    assert torch.count_nonzero(got[0, lengths[0] :]) == 0
    assert torch.cat([b["text_len"] for b in batches]).tolist() == lengths.tolist()
    assert sum((b["caption"] for b in batches), []) == [e.caption for e in entries]


def test_fingerprint_mismatch_stops(vp9_entries, encoder, tmp_path):
    precompute_text(vp9_entries, encoder, tmp_path, fingerprint=PRINT, shard_size=4, progress=False)
    with pytest.raises(CacheError, match="use a new cache_dir"):
        precompute_text(vp9_entries, encoder, tmp_path, fingerprint={"test": 2}, shard_size=4, progress=False)


def test_latent_cache_matches_online_encoding_and_lists_skips(vp9_entries, codec, tmp_path):
    entries = entries_with_bad(vp9_entries, tmp_path)
    for rank in (0, 1):
        precompute_latents(reader(entries), codec, tmp_path / "c", fingerprint=PRINT, shard_size=2, batch_size=2,
                           rank=rank, world_size=2, progress=False)  # fmt: skip
    index = write_index(tmp_path / "c", "latents", len(entries), 2)
    assert [s["index"] for s in index["shards"]] == [[0, 1], [2, 3], [4]]
    assert index["shards"][2]["skipped"][0]["index"] == 5 and index["shards"][2]["skipped"][0]["reason"] == "empty_file"

    ds = CacheDataset(tmp_path / "c", kinds=["latents"], batch_size=5, shuffle=False, num_epochs=1)
    (batch,) = list(ds)
    clips = torch.stack([clip for _, clip in reader(entries[:5]).iter_clips(range(5))])
    expected = codec.encode(clips)
    assert batch["latents"].shape == (5, 16, 3, 2, 2)
    torch.testing.assert_close(batch["latents"], expected, rtol=2e-2, atol=2e-2)  # bf16 storage


def test_cache_dataset_sharding_and_resume(vp9_entries, encoder, tmp_path):
    precompute_text(vp9_entries, encoder, tmp_path, fingerprint=PRINT, shard_size=4, progress=False)
    write_index(tmp_path, "text", len(vp9_entries), 4)

    def new(rank=0, world=1):
        return CacheDataset(tmp_path, kinds=["text"], batch_size=2, rank=rank, world_size=world, seed=1, num_epochs=2)

    halves = [[i for b in new(r, 2) for i in b["index"].tolist()] for r in (0, 1)]
    assert not set(halves[0][:3]) & set(halves[1][:3]) and sorted(halves[0][:3] + halves[1][:3]) == list(range(6))
    full = [b["index"].tolist() for b in new()]
    ds = new()
    it = iter(ds)
    head = [next(it)["index"].tolist() for _ in range(4)]
    resumed = new()
    resumed.load_state_dict(ds.state_dict())
    assert head + [b["index"].tolist() for b in resumed] == full


def test_run_precompute_end_to_end_and_build_source(tmp_path, vp9_entries, models):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"path": e.path, "caption": e.caption} for e in vp9_entries])
    cfg = RunConfig(
        text_encoder=TextEncoderConfig(path=str(models), max_length=12),
        vae=VAEConfig(path=str(models), tiling=False),
        data=DataConfig(
            manifest=str(manifest),
            cache_dir=str(tmp_path / "cache"),
            source="cache",
            num_frames=9,
            height=16,
            width=16,
            reader="pyav",
        ),  # fmt: skip
    )
    for rank in (0, 1):
        done = run_precompute(cfg, rank=rank, world_size=2, text_shard_size=2, latent_shard_size=2, progress=False)
    assert done == {"text": True, "latents": True}  # the last rank to finish wrote both indexes
    source = build_source(cfg.data, batch_size=3, rank=0, world_size=1)
    batch = next(iter(source))
    assert batch["latents"].shape == (3, 16, 3, 2, 2) and batch["text_emb"].shape == (3, 12, 16)
    assert len(load_manifest(manifest)) == 6


def test_online_source_encodes_reader_batches(vp9_entries, encoder, codec):
    from engine.data.source import OnlineSource

    r = VideoReader(vp9_entries, PyAVDecoder(), batch_size=2, num_frames=9, fps=16.0, height=16, width=16,
                    num_epochs=1, seed=2)  # fmt: skip
    source = OnlineSource(r, codec, encoder)
    batch = next(iter(source))
    ref = next(iter(VideoReader(vp9_entries, PyAVDecoder(), batch_size=2, num_frames=9, fps=16.0, height=16,
                                width=16, num_epochs=1, seed=2)))  # fmt: skip
    torch.testing.assert_close(batch["latents"], codec.encode(ref["video"]))
    torch.testing.assert_close(batch["text_emb"], encoder.encode(ref["caption"])[0])
    assert batch["index"].tolist() == ref["index"].tolist()
    assert source.state_dict()["cursor"] == 2
