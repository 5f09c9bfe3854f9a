"""Fused RMSNorm across heads + interleaved RoPE on q and k vs its reference (kernels/qk_norm_rope.py)."""

import pytest
import torch

from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

pytestmark = pytest.mark.interpreter
LOW_PRECISION = (torch.float16, torch.bfloat16)
EPS = 1e-6


def _inputs(batch, tokens, heads, head_dim, dtype):
    """q, k (B, N, D) and RMSNorm weights (D,) in dtype (bf16 training keeps bf16 params); fp32 cos/sin (N, Dh/2)."""
    dim = heads * head_dim
    q, k = (torch.randn(batch, tokens, dim).to(dtype) for _ in range(2))
    wq, wk = ((1 + 0.2 * torch.randn(dim)).to(dtype) for _ in range(2))
    angles = torch.rand(tokens, head_dim // 2) * 2 * torch.pi
    dq, dk = (torch.randn(batch, tokens, heads, head_dim).to(dtype) for _ in range(2))
    return (q, k, wq, wk, angles.cos(), angles.sin()), (dq, dk)


def _run(fn, tensors, upstream, heads):
    q, k, wq, wk = (t.detach().requires_grad_() for t in tensors[:4])
    out_q, out_k = fn(q, k, wq, wk, *tensors[4:], heads, EPS)
    return (out_q, out_k, *torch.autograd.grad((out_q, out_k), (q, k, wq, wk), upstream))


def _float(ts):
    return tuple(t.float() for t in ts)


def _compare(check_close, batch, tokens, heads, head_dim, dtype):
    tensors, upstream = _inputs(batch, tokens, heads, head_dim, dtype)
    fused = _run(qk_norm_rope, tensors, upstream, heads)
    ref = _run(qk_norm_rope_reference, _float(tensors), _float(upstream), heads)
    lowp = _run(qk_norm_rope_reference, tensors, upstream, heads) if dtype in LOW_PRECISION else (None,) * 6
    assert fused[0].shape == (batch, tokens, heads, head_dim) and all(t.dtype == dtype for t in fused)
    for name, out, r, lp in zip(("q", "k", "dq", "dk", "dweight_q", "dweight_k"), fused, ref, lowp):
        check_close(name, out, r, lp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 15, 2, 8), (1, 26, 3, 12), (2, 11, 4, 6), (1, 1100, 2, 8)])
def test_matches_reference(check_close, shape, dtype):
    """q, k, d q, d k, d weight_q, d weight_k. D = 36 (3 x 12) is not a power of two; (1, 1100, 2, 8) makes each
    backward program loop over several row tiles."""
    _compare(check_close, *shape, dtype)


@pytest.mark.slow
def test_matches_reference_wan_heads(check_close):
    """12 heads of 128 (Wan2.1 1.3B) in bf16."""
    _compare(check_close, 1, 64, 12, 128, torch.bfloat16)


def test_custom_ops_pass_opcheck():
    (q, k, wq, wk, cos, sin), (dq, dk) = _inputs(2, 5, 2, 8, torch.float32)
    torch.library.opcheck(torch.ops.vidistill.qk_norm_rope_fwd, (q, k, wq, wk, cos, sin, 2, EPS))
    *_, rstd_q, rstd_k = torch.ops.vidistill.qk_norm_rope_fwd(q, k, wq, wk, cos, sin, 2, EPS)
    torch.library.opcheck(torch.ops.vidistill.qk_norm_rope_bwd, (dq, dk, q, k, wq, wk, cos, sin, rstd_q, rstd_k))


def test_bad_rope_table_is_a_clear_error():
    (q, k, wq, wk, cos, sin), _ = _inputs(1, 5, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="cos/sin must be"):
        qk_norm_rope(q, k, wq, wk, cos[:, :3], sin[:, :3], 2, EPS)
