"""Which path the public kernel functions take: VIDISTILL_KERNELS=auto|triton|reference (kernels/_dispatch.py)."""

import pytest
import torch

from kernels._dispatch import ENV_VAR, use_triton
from kernels.adaln import adaln_modulate, adaln_modulate_reference
from kernels.gated_residual import gated_residual
from kernels.temporal_variance import temporal_loss


def _adaln_inputs():
    x = torch.randn(2, 5, 8, requires_grad=True)
    return x, torch.randn(2, 1, 8), torch.randn(2, 1, 8)


@pytest.mark.parametrize("mode, fused", [("auto", False), ("reference", False), ("triton", True)])
def test_mode_selects_the_path(monkeypatch, mode, fused):
    """On CPU tensors: auto and reference take the pure-torch path, triton the custom op (seen in the grad_fn)."""
    monkeypatch.setenv(ENV_VAR, mode)
    x, shift, scale = _adaln_inputs()
    assert use_triton(x) is fused
    out = adaln_modulate(x, shift, scale, 1e-6)
    assert ("_AdaLN" in type(out.grad_fn).__name__) is fused
    if not fused:  # the reference path is the reference, bit for bit
        assert torch.equal(out, adaln_modulate_reference(x, shift, scale, 1e-6))
    x2 = torch.randn(2, 5, 8, requires_grad=True)
    assert ("_GatedResidual" in type(gated_residual(x2, x2, shift).grad_fn).__name__) is fused
    loss, _ = temporal_loss(torch.randn(1, 2, 3, 4, 5, requires_grad=True), 1e-6, 1.0, -10.0)
    assert ("_TemporalLoss" in type(loss.grad_fn).__name__) is fused


def test_unknown_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=ENV_VAR):
        use_triton(torch.zeros(1))


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(1))
