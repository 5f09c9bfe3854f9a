"""Fused gated residual x + y * gate vs its reference (kernels/gated_residual.py)."""

import pytest
import torch

from kernels.gated_residual import gated_residual, gated_residual_reference

pytestmark = pytest.mark.interpreter
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _inputs(batch, tokens, dim, dtype, y_dtype=None):
    """x, y (B, N, D); the fp32 modulation (B, 6, D) whose row 2 is the gate; upstream d out in x's dtype."""
    x = torch.randn(batch, tokens, dim).to(dtype)
    y = torch.randn(batch, tokens, dim).to(y_dtype or dtype)
    mod = torch.randn(batch, 6, dim)
    return x, y, mod, torch.randn(batch, tokens, dim).to(dtype)


def _run(fn, x, y, mod, dout):
    x, y, mod = (t.detach().requires_grad_() for t in (x, y, mod))
    gate = mod.unsqueeze(2).unbind(1)[2]  # (B, 1, D), batch stride 6D as in the DiT
    out = fn(x, y, gate)
    return (out, *torch.autograd.grad(out, (x, y, mod), dout))


def _compare(check_close, x, y, mod, dout):
    fused = _run(gated_residual, x, y, mod, dout)
    ref = _run(gated_residual_reference, x.float(), y.float(), mod, dout.float())
    lowp = x.dtype in LOW_PRECISION or y.dtype in LOW_PRECISION
    torch_lowp = _run(gated_residual_reference, x, y, mod, dout) if lowp else (None,) * 4
    assert (fused[0].dtype, fused[1].dtype, fused[2].dtype, fused[3].dtype) == (x.dtype, x.dtype, y.dtype, mod.dtype)
    for name, out, r, lp in zip(("out", "dx", "dy", "dgate"), fused, ref, torch_lowp):
        check_close(name, out, r, lp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 15, 16), (1, 26, 100), (3, 11, 48), (1, 1100, 16)])
def test_matches_reference(check_close, shape, dtype):
    """Out, d x, d y and d gate; (1, 1100, 16) makes each backward program loop over several row tiles."""
    _compare(check_close, *_inputs(*shape, dtype))


def test_low_precision_branch_into_fp32_stream(check_close):
    """y in bf16 (an attention output) added into an fp32 residual stream, as the official Wan code does."""
    _compare(check_close, *_inputs(2, 15, 48, torch.float32, y_dtype=torch.bfloat16))


def test_custom_ops_pass_opcheck():
    x, y, mod, dout = _inputs(2, 5, 24, torch.float32)
    gate = mod[:, 2:3]
    torch.library.opcheck(torch.ops.vidistill.gated_residual_fwd, (x, y, gate))
    torch.library.opcheck(torch.ops.vidistill.gated_residual_bwd, (dout, y, gate))


def test_bad_gate_shape_is_a_clear_error():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="gate must be"):
        gated_residual(x, x, torch.zeros(1, 1, 8))
