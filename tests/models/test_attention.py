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


@pytest.mark.parametrize(
    ("capability", "expected"), [((8, 0), "flash2"), ((9, 0), "flash3"), ((10, 0), "flash2"), ((12, 0), "flash2")]
)
def test_flash3_only_on_hopper(monkeypatch, capability, expected):
    """FA3 is built for sm_90 only: auto picks it on Hopper, flash2 on Ampere and on Blackwell (sm_100, sm_120)."""
    from types import SimpleNamespace

    import engine.models.attention as attn

    installed = {"flash3": object(), "flash2": object()}
    monkeypatch.setattr(attn, "_module", lambda backend: installed.get(backend))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    q = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    assert resolve_backend("auto", q) == expected
    if expected != "flash3":
        with pytest.raises(RuntimeError, match="sm90 for flash3"):
            resolve_backend("flash3", q)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flash2", "flash3", "xformers"])
def test_gpu_backends_match_sdpa(backend):
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if backend != "auto" and backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    ref = attention(q.float(), k.float(), v.float(), "sdpa")
    out = attention(q, k, v, backend)
    assert (out.float() - ref).abs().max() < 2e-2
