"""Latent sources: a directory of safetensors (values, skip reasons, resume, rank slices), the precompute cache,
synthetic patterns (deterministic, ranks partition the global batch) and online encoding."""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from engine.data.cache import write_index
from engine.interp.data import DictLatents, DirectoryLatents, EncodedLatents, SyntheticLatents, open_latents
from engine.toy.codec import ToyCodec

SHAPE = (4, 5, 3, 2)  # (C, F, H, W); Wan2.1: (16, 21, 60, 104)


def _take(source, n):
    return list(itertools.islice(iter(source), n))


@pytest.fixture
def latent_dir(tmp_path):
    """Six good samples (one 5-D file of 4, two 4-D files, one bf16) and four bad files."""
    g = torch.Generator().manual_seed(0)
    good = {f"s{i}": torch.randn(SHAPE, generator=g) for i in range(6)}
    save_file({"latents": torch.stack([good[f"s{i}"] for i in range(4)])}, str(tmp_path / "a_shard.safetensors"))
    save_file({"latents": good["s4"]}, str(tmp_path / "b_one.safetensors"))
    (tmp_path / "sub").mkdir()
    save_file({"latents": good["s5"].bfloat16()}, str(tmp_path / "sub" / "c_bf16.safetensors"))
    good["s5"] = good["s5"].bfloat16().float()
    (tmp_path / "d_corrupt.safetensors").write_bytes(b"\x00garbage")
    save_file({"other": torch.zeros(SHAPE)}, str(tmp_path / "e_nokey.safetensors"))
    save_file({"latents": torch.zeros(4, 5)}, str(tmp_path / "f_rank2.safetensors"))
    save_file({"latents": torch.zeros(4, 7, 3, 2)}, str(tmp_path / "g_othershape.safetensors"))
    return tmp_path, good


def test_directory_values_and_skip_reasons(latent_dir):
    root, good = latent_dir
    src = DirectoryLatents(root, batch_size=3, shuffle=False)
    assert dict(src.skips) == {"unreadable": 1, "missing_key": 1, "bad_shape": 1, "shape_mismatch": 1}
    a, b, c = _take(src, 3)
    assert a.shape == (3, *SHAPE) and a.dtype == torch.float32
    expected = torch.stack([good[f"s{i}"] for i in range(6)])
    torch.testing.assert_close(torch.cat([a, b]), expected, rtol=0, atol=0)
    torch.testing.assert_close(c, expected[:3], rtol=0, atol=0)  # the stream goes on into epoch 2


def test_directory_without_usable_files(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no usable latents"):
        DirectoryLatents(tmp_path, batch_size=1)
    with pytest.raises(FileNotFoundError, match="latent directory not found"):
        DirectoryLatents(tmp_path / "missing", batch_size=1)


def test_directory_resume_continues_the_same_stream(latent_dir):
    root, _ = latent_dir
    straight = _take(DirectoryLatents(root, batch_size=2, seed=7), 7)
    first = DirectoryLatents(root, batch_size=2, seed=7)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    second = DirectoryLatents(root, batch_size=2, seed=7)
    second.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip (checkpoint client state)
    for x, y in zip(head + _take(second, 4), straight):
        assert torch.equal(x, y)


def test_two_ranks_split_the_global_batch(latent_dir):
    """Rank r takes perm[r::2]: one step's two micro-batches together are the single-process batch's samples."""
    root, _ = latent_dir
    single = _take(DirectoryLatents(root, batch_size=2, seed=3), 1)[0]
    r0 = _take(DirectoryLatents(root, batch_size=1, seed=3, rank=0, world_size=2), 1)[0]
    r1 = _take(DirectoryLatents(root, batch_size=1, seed=3, rank=1, world_size=2), 1)[0]
    assert torch.equal(torch.cat([r0, r1]), single)


def test_precompute_cache_is_read_through_cache_dataset(tmp_path):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, *SHAPE, generator=g)
    shard = tmp_path / "latents" / "shard-00000.safetensors"
    shard.parent.mkdir()
    meta = {"fingerprint": json.dumps({"vae": "test"}), "skipped": json.dumps([[3, "decode_error"]])}
    save_file({"latents": rows.bfloat16(), "index": torch.tensor([0, 1, 2])}, str(shard), metadata=meta)
    write_index(tmp_path, "latents", num_entries=4, shard_size=4)
    src = open_latents(tmp_path, batch_size=3, shuffle=False)
    assert isinstance(src, DictLatents)
    torch.testing.assert_close(_take(src, 1)[0], rows.bfloat16().float(), rtol=0, atol=0)


def test_synthetic_is_deterministic_smooth_and_rank_partitioned():
    shape = (4, 5, 16, 16)
    single = _take(SyntheticLatents(*shape, batch_size=4, seed=5, max_speed=0.5), 2)
    again = _take(SyntheticLatents(*shape, batch_size=4, seed=5, max_speed=0.5), 2)
    assert all(torch.equal(a, b) for a, b in zip(single, again))
    ranks = [
        _take(SyntheticLatents(*shape, batch_size=2, seed=5, rank=r, world_size=2, max_speed=0.5), 2) for r in range(2)
    ]
    for step in range(2):  # rank r holds samples r, r + 2 of the step's global batch
        assert torch.equal(ranks[0][step], single[step][0::2]) and torch.equal(ranks[1][step], single[step][1::2])
    x = single[0]
    assert 0.5 < x.std() < 1.5  # ~unit variance, like normalized VAE latents
    assert (x[:, :, 1:] - x[:, :, :-1]).abs().mean() < 0.5 * x.abs().mean()  # smooth in time: frames move, not flicker


def test_encoded_latents_online():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(48, 16))[0].T  # (16, 48) orthonormal rows, like the fitted PCA basis
    codec = ToyCodec(torch.zeros(48), basis, torch.ones(16), spatial_stride=4)

    class Reader:
        def __init__(self):
            self.pos = 0

        def __iter__(self):
            while True:
                self.pos += 1
                yield {"video": torch.full((2, 3, 5, 8, 8), 0.1 * self.pos)}

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, state):
            self.pos = state["pos"]

    src = EncodedLatents(Reader(), codec)
    batch = _take(src, 2)[1]
    assert batch.shape == (2, 16, 5, 2, 2)
    torch.testing.assert_close(batch, codec.encode(torch.full((2, 3, 5, 8, 8), 0.2)))
    assert src.state_dict() == {"pos": 2}
