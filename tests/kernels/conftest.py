"""Kernel tests: the Triton path forced on CPU tensors (interpreter, tests/conftest.py) and the shared tolerance check.

Every output and gradient is compared with the pure-torch reference run in fp32 on the same
(low-precision-representable) inputs. In fp32 the fused path may differ only by summation order. In fp16/bf16 its
error must be at most twice the error of the reference itself run in that dtype (flash-attention's rule).
"""

import pytest
import torch

# Summation order: the kernels reduce in tiles and per-program partial sums, torch in its own order, so fp32 results
# differ by a few ulps (measured: at most 2.8e-7 of the tensor's largest value over these tests, on d weight sums).
# 2e-6 of the scale (~17 ulps) is the fp32 bound. The same term is the floor of the low-precision bound, needed where
# torch's own low-precision error is exactly 0: d x of the gated residual is d out itself, and the loss and v of the
# temporal loss are fp32 statistics of low-precision latents, exact up to summation order.
REORDER = 2e-6


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def assert_close_to_reference(name: str, out, ref32, torch_lowp=None) -> None:
    """out: fused result; ref32: fp32 reference; torch_lowp: the reference run in fp16/bf16 (None for fp32 inputs)."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    floor = REORDER * max(ref32.abs().max().item(), 1e-30)
    err = max_err(out, ref32)
    if torch_lowp is None:
        assert err <= floor, f"{name}: fp32 error {err:.3e} > {floor:.3e}"
        return
    bound = 2 * max_err(torch_lowp, ref32) + floor
    assert err <= bound, f"{name}: error {err:.3e} > 2 x torch's own {torch_lowp.dtype} error + floor = {bound:.3e}"


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    """Every kernel test runs the Triton path (test_dispatch.py overrides this per test)."""
    monkeypatch.setenv("VIDISTILL_KERNELS", "triton")


@pytest.fixture
def check_close():
    """assert_close_to_reference(name, out, ref32, torch_lowp=None), as a fixture (tests import no helper modules)."""
    return assert_close_to_reference
