"""Fused adaLN (LayerNorm without affine, then x * (1 + scale) + shift) vs its reference (kernels/adaln.py)."""

import pytest
import torch

from kernels.adaln import adaln_modulate, adaln_modulate_reference

pytestmark = pytest.mark.interpreter
LOW_PRECISION = (torch.float16, torch.bfloat16)
EPS = 1e-6


def _inputs(batch, tokens, dim, dtype):
    """x (B, N, D) in dtype; the fp32 modulation (B, 6, D) as the DiT forms it, and upstream d out in dtype."""
    x = torch.randn(batch, tokens, dim).to(dtype)
    mod = torch.randn(batch, 6, dim) * 0.5
    dy = torch.randn(batch, tokens, dim).to(dtype)
    return x, mod, dy


def _run(fn, x, mod, dy):
    """Out and grads w.r.t. x and the whole modulation (shift = row 0, scale = row 1, strided (B, 1, D) views)."""
    x, mod = x.detach().requires_grad_(), mod.detach().requires_grad_()
    shift, scale = mod.unsqueeze(2).unbind(1)[:2]  # each (B, 1, D), batch stride 6D: no copy in the DiT
    out = fn(x, shift, scale, EPS)
    dx, dmod = torch.autograd.grad(out, (x, mod), dy)
    return out, dx, dmod


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 15, 16), (1, 26, 100), (3, 11, 48), (1, 1100, 16)])
def test_matches_reference(check_close, shape, dtype):
    """Out, d x, d shift and d scale. (1, 1100, 16) makes each backward program loop over several row tiles."""
    x, mod, dy = _inputs(*shape, dtype)
    fused = _run(adaln_modulate, x, mod, dy)
    ref = _run(adaln_modulate_reference, x.float(), mod, dy.float())
    lowp = _run(adaln_modulate_reference, x, mod, dy) if dtype in LOW_PRECISION else (None,) * 3
    assert fused[0].dtype == fused[1].dtype == dtype and fused[2].dtype == torch.float32
    for name, out, r, lp in zip(("out", "dx", "dmod"), fused, ref, lowp):
        check_close(name, out, r, lp)
    assert torch.count_nonzero(fused[2][:, 2:]) == 0  # rows of the modulation that adaLN does not read


@pytest.mark.slow
def test_matches_reference_wan_width(check_close):
    """dim 1536 (Wan2.1 1.3B) in bf16: one row per program, BLOCK_D 2048 with 512 masked columns."""
    x, mod, dy = _inputs(1, 300, 1536, torch.bfloat16)
    fused = _run(adaln_modulate, x, mod, dy)
    ref = _run(adaln_modulate_reference, x.float(), mod, dy.float())
    lowp = _run(adaln_modulate_reference, x, mod, dy)
    for name, out, r, lp in zip(("out", "dx", "dmod"), fused, ref, lowp):
        check_close(name, out, r, lp)


def test_contiguous_modulation_matches_strided():
    """shift/scale as separate contiguous (B, 1, D) tensors give the same bits as views into the (B, 6, D) tensor."""
    x, mod, _ = _inputs(2, 7, 24, torch.float32)
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    a = adaln_modulate(x, shift, scale, EPS)
    b = adaln_modulate(x, shift.contiguous(), scale.contiguous(), EPS)
    assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    x, mod, dy = _inputs(2, 5, 24, torch.float32)
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    torch.library.opcheck(torch.ops.vidistill.adaln_fwd, (x, shift, scale, EPS))
    _, mean, rstd = torch.ops.vidistill.adaln_fwd(x, shift, scale, EPS)
    torch.library.opcheck(torch.ops.vidistill.adaln_bwd, (dy, x, scale, mean, rstd))


def test_bad_modulation_shape_is_a_clear_error():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="shift/scale must be"):
        adaln_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8), EPS)
