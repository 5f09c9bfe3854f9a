"""The attention entry point: SDPA against softmax written out, backend selection and its errors."""

import pytest
import torch

from engine.models.attention import attention, available_backends, resolve_backend


def test_sdpa_matches_softmax_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    out = attention(q, k, v, "sdpa")
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(out, expected)


def test_cpu_picks_sdpa_and_explicit_unusable_backend_is_an_error():
    q = torch.randn(1, 4, 2, 8)
    assert resolve_backend("auto", q) == "sdpa"
    assert "sdpa" in available_backends()
    for name in ("flash3", "flash2", "xformers"):
        with pytest.raises(RuntimeError, match=name):
            resolve_backend(name, q)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("magic", q)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flash2", "flash3", "xformers"])
def test_gpu_backends_match_sdpa(backend):
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if backend != "auto" and backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    ref = attention(q.float(), k.float(), v.float(), "sdpa")
    out = attention(q, k, v, backend)
    assert (out.float() - ref).abs().max() < 2e-2
