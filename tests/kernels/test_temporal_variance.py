"""Fused temporal variance + truncated temporal loss vs its pure-torch reference (kernels/temporal_variance.py)."""

import pytest
import torch

from kernels.temporal_variance import temporal_loss, temporal_variance_reference

pytestmark = pytest.mark.interpreter
LOW_PRECISION = (torch.float16, torch.bfloat16)
EPS, TAU = 1e-6, 0.6  # docs/method.md#temporal-regularization
# Latent std 0.1 gives v ~ 0.01 and loss ~ 4.6 >= tau: the kept regime. Std 1 gives loss ~ 0 < tau: truncated.
KEPT_STD, TRUNCATED_STD = 0.1, 1.0


def _latents(shape, dtype, std=KEPT_STD):
    return (torch.randn(shape) * std).to(dtype)  # (B, C, F, H, W), values representable in dtype


def _loss_and_grad(fn, x, power=1.0, tau=TAU):
    x = x.detach().requires_grad_()
    loss, v = fn(x, EPS, power, tau)
    (dx,) = torch.autograd.grad(loss, x)
    return loss, v, dx


def _compare(check_close, shape, dtype, power=1.0):
    x = _latents(shape, dtype)
    loss, v, dx = _loss_and_grad(temporal_loss, x, power)
    ref = _loss_and_grad(temporal_variance_reference, x.float(), power)
    lowp = _loss_and_grad(temporal_variance_reference, x, power) if dtype in LOW_PRECISION else (None,) * 3
    assert loss.dtype == v.dtype == torch.float32 and loss.shape == v.shape == ()
    assert dx.dtype == dtype and dx.shape == x.shape
    assert ref[0] > 0, "test set-up: the loss must be in the kept regime"
    for name, out, r, lp in zip(("loss", "v", "dx"), (loss, v, dx), ref, lowp):
        check_close(name, out, r, lp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 11, 15, 26), (1, 16, 21, 15, 26), (2, 3, 70, 5, 7)])
def test_matches_reference(check_close, shape, dtype):
    """Loss, v and d loss/dx; F = 11 and 21 (latent frame counts) and F = 70 (three frame chunks merged)."""
    _compare(check_close, shape, dtype)


def test_power_two(check_close):
    """p is configurable (Eq. 8 is ambiguous): -log((v + eps)^2) and its gradient."""
    _compare(check_close, (1, 4, 11, 5, 6), torch.float32, power=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_full_latent(check_close, dtype):
    """The real latent size of one 832x480x81 video: (1, 16, 21, 60, 104)."""
    _compare(check_close, (1, 16, 21, 60, 104), dtype)


def test_truncated_regime_is_zero_with_zero_gradient(check_close):
    """Below tau the loss and its gradient are exactly 0; v still reports the variance."""
    x = _latents((1, 16, 11, 15, 26), torch.float32, std=TRUNCATED_STD)
    loss, v, dx = _loss_and_grad(temporal_loss, x)
    _, v_ref, _ = _loss_and_grad(temporal_variance_reference, x)
    assert -torch.log(v_ref + EPS) < TAU, "test set-up: the untruncated loss must be below tau"
    assert loss.item() == 0.0 and torch.count_nonzero(dx) == 0
    check_close("v", v, v_ref)


def test_tau_switches_between_regimes_on_the_same_input():
    """The same latents: kept under tau = untruncated loss - 0.01, zeroed under tau = untruncated loss + 0.01."""
    x = _latents((1, 4, 11, 5, 6), torch.float32)
    untruncated = -torch.log(x.var(dim=2, unbiased=False).mean() + EPS).item()
    kept, _, dx_kept = _loss_and_grad(temporal_loss, x, tau=untruncated - 0.01)
    cut, _, dx_cut = _loss_and_grad(temporal_loss, x, tau=untruncated + 0.01)
    assert abs(kept.item() - untruncated) < 1e-5 and torch.count_nonzero(dx_kept) > 0
    assert cut.item() == 0.0 and torch.count_nonzero(dx_cut) == 0


def test_large_common_offset_is_stable():
    """mean 1000, std 0.1 across frames: E[x^2] - E[x]^2 in fp32 would lose every digit (ulp(1e6) = 0.06)."""
    x = 1000.0 + 0.1 * torch.randn(2, 3, 70, 5, 7)
    _, v, _ = _loss_and_grad(temporal_loss, x)
    v64 = x.double().var(dim=2, unbiased=False).mean()
    assert abs(v.item() - v64.item()) / v64.item() < 1e-4


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_no_host_synchronization(monkeypatch, path):
    """The whole function compiles as one graph (fullgraph=True): a .item() or a Python branch on the loss would break
    the graph and fail here. Compiled results equal eager ones in both regimes, for the fused and reference paths."""
    monkeypatch.setenv("VIDISTILL_KERNELS", path)
    compiled = torch.compile(temporal_loss, backend="aot_eager", fullgraph=True)
    for std in (KEPT_STD, TRUNCATED_STD):
        x = _latents((1, 4, 11, 5, 6), torch.float32, std)
        eager, got = _loss_and_grad(temporal_loss, x), _loss_and_grad(compiled, x)
        for a, b in zip(eager, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and AOT dispatch of both registered ops."""
    x = _latents((1, 2, 5, 3, 4), torch.float32)
    torch.library.opcheck(torch.ops.vidistill.temporal_loss_fwd, (x, EPS, 1.0, TAU))
    loss, v, keep = torch.ops.vidistill.temporal_loss_fwd(x, EPS, 1.0, TAU)
    torch.library.opcheck(torch.ops.vidistill.temporal_loss_bwd, (torch.ones(()), x, v, keep, EPS, 1.0))


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4, 5), torch.zeros(1, 2, 3, 4, 5, dtype=torch.int64)])
def test_bad_input_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        temporal_loss(bad, EPS, 1.0, TAU)
