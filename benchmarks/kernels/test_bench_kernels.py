"""Fused Triton kernels vs the baselines a user would pick: the pure-torch reference in eager mode and under
torch.compile, side by side, forward and forward+backward.

    python benchmarks/kernels/test_bench_kernels.py     # table with formulas; rows to benchmarks/results/kernels.jsonl
    pytest benchmarks/kernels --benchmark-only -o addopts=''   # the same cases under pytest-benchmark

Bytes are those an ideal fused kernel must move (each input read once, each output written once); every provider's
GB/s uses that same count, so GB/s compares providers and, on CUDA, the fraction of peak bandwidth says how close the
fused kernel gets to the memory roof. FLOPs count the element-wise arithmetic (these ops are bound by memory).
On CPU only the reference paths run: the fused kernels need CUDA (the interpreter measures Python, not the kernel).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import median_time, write_rows  # noqa: E402

from kernels.adaln import adaln_modulate, adaln_modulate_reference  # noqa: E402
from kernels.gated_residual import gated_residual, gated_residual_reference  # noqa: E402
from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference  # noqa: E402
from kernels.temporal_variance import temporal_loss, temporal_variance_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # bf16 brings nothing on these AVX2 CPUs (DESIGN.md section 7)
# Wan2.1 1.3B at 832x480x81: 32,760 tokens of dim 1536 (12 heads of 128); latents (1, 16, 21, 60, 104).
# On CPU the token count is cut 8x so that the suite runs in seconds; the latent is the real one.
TOKENS = 32760 if CUDA else 4095
DIM, HEADS, LATENT = 1536, 12, (1, 16, 21, 60, 104)
# HBM bandwidth of common training GPUs in GB/s (vendor data sheets); --peak-gbps overrides.
PEAK_GBPS = {
    "H100 PCIe": 2000,
    "H100": 3350,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "H800": 3350,
    "H200": 4800,
    "A100-SXM4-80GB": 2039,
    "A100-SXM4-40GB": 1555,
    "A100 80GB PCIe": 1935,
    "L40S": 864,
    "A10G": 600,
}  # matched in this order against torch.cuda.get_device_name()


@dataclass
class Case:
    """One kernel at one size: how to build its inputs, its three providers' function, and its cost formulas."""

    kernel: str
    shape: str
    make: Callable[[], tuple]  # -> args; float tensors that require grad are differentiated
    fused: Callable
    reference: Callable
    bytes_fwd: int
    bytes_bwd: int
    flops_fwd: int
    flops_bwd: int
    formula: str


def _t(*shape, dtype=DTYPE, grad=True, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_(grad)


def cases() -> list[Case]:
    s, b, n, d = DTYPE.itemsize, 1, TOKENS, DIM
    m, half = b * n * d, d // HEADS // 2
    lat = 1
    for size in LATENT:
        lat *= size
    f = LATENT[2]
    return [
        Case("adaln", f"x ({b}, {n}, {d})", lambda: (_t(b, n, d), _t(b, 1, d, dtype=torch.float32),
             _t(b, 1, d, dtype=torch.float32), 1e-6), adaln_modulate, adaln_modulate_reference,
             2 * m * s + 8 * b * d + 8 * b * n, 3 * m * s + 8 * b * n + 4 * b * d, 8 * m, 14 * m,
             "fwd bytes 2*M*s + 8*B*D + 8*B*N (x, y; shift, scale; mean, rstd), bwd 3*M*s + 8*B*N + 4*B*D "
             "(x, dy, dx; mean, rstd; scale); flops fwd 8*M, bwd 14*M; M = B*N*D"),
        Case("gated_residual", f"x ({b}, {n}, {d})", lambda: (_t(b, n, d), _t(b, n, d),
             _t(b, 1, d, dtype=torch.float32)), gated_residual, gated_residual_reference,
             3 * m * s + 4 * b * d, 3 * m * s + 4 * b * d, 2 * m, 3 * m,
             "fwd bytes 3*M*s + 4*B*D (x, y, out; gate), bwd 3*M*s + 4*B*D (dout, y, dy; gate; dx = dout, no copy); "
             "flops fwd 2*M, bwd 3*M"),
        Case("qk_norm_rope", f"q, k ({b}, {n}, {d}), {HEADS} heads", lambda: (_t(b, n, d), _t(b, n, d),
             _t(d, dtype=torch.float32), _t(d, dtype=torch.float32), _t(n, half, dtype=torch.float32, grad=False),
             _t(n, half, dtype=torch.float32, grad=False), HEADS, 1e-6), qk_norm_rope, qk_norm_rope_reference,
             4 * m * s + 8 * n * half + 8 * b * n, 6 * m * s + 8 * n * half + 8 * b * n, 14 * m, 28 * m,
             "fwd bytes 4*M*s + 8*N*Dh/2 + 8*B*N (q, k in and out; cos, sin; rstd), bwd 6*M*s + 8*N*Dh/2 + 8*B*N "
             "(x, dy, dx for q and k); flops fwd 14*M, bwd 28*M"),
        Case("temporal_loss", f"x {LATENT}", lambda: (_t(*LATENT, scale=0.1), 1e-6, 1.0, 0.6),
             temporal_loss, temporal_variance_reference, lat * s, 2 * lat * s, 4 * lat, 4 * lat,
             f"fwd bytes M*s (partial sums negligible), bwd 2*M*s (x, dx); flops fwd 4*M, bwd 4*M; M = B*C*F*H*W, "
             f"F = {f}"),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------ running ---
def providers() -> dict[str, Callable[[Case], Callable]]:
    """Name -> how to get the function to time from a case. The fused provider exists only on CUDA."""
    out = {"torch_eager": lambda c: c.reference, "torch_compile": lambda c: torch.compile(c.reference)}
    if CUDA:
        out["fused_triton"] = lambda c: c.fused
    return out


def runner(fn: Callable, args: tuple, backward: bool) -> Callable[[], object]:
    """A no-argument closure: forward only (under no_grad) or forward + backward w.r.t. every differentiable input."""
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def outputs():
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return [o for o in outs if o.requires_grad]

    if not backward:

        def forward():
            with torch.no_grad():
                return fn(*args)

        return forward
    upstream = [torch.randn_like(o) for o in outputs()]
    return lambda: torch.autograd.grad(outputs(), inputs, upstream)


def measure(case: Case, provider: str, backward: bool, peak_gbps: float | None) -> dict:
    fn = providers()[provider](case)
    seconds = median_time(runner(fn, case.make(), backward), repeats=10, warmup=3)
    moved = case.bytes_fwd + (case.bytes_bwd if backward else 0)
    flops = case.flops_fwd + (case.flops_bwd if backward else 0)
    gbps = moved / seconds / 1e9
    return dict(kernel=case.kernel, shape=case.shape, dtype=str(DTYPE).split(".")[-1], device=DEVICE,
                passes="fwd+bwd" if backward else "fwd", provider=provider, ms=seconds * 1e3, bytes=moved,
                flops=flops, gbps=gbps, gflops=flops / seconds / 1e9,
                peak_fraction=gbps / peak_gbps if peak_gbps else None)  # fmt: skip


def peak_bandwidth(override: float | None) -> float | None:
    if override or not CUDA:
        return override
    name = torch.cuda.get_device_name()
    return next((gbps for key, gbps in PEAK_GBPS.items() if key in name), None)


# ------------------------------------------------------------------------------------------------ pytest-benchmark ---
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "fused_triton"])
@pytest.mark.parametrize("kernel", ["adaln", "gated_residual", "qk_norm_rope", "temporal_loss"])
def test_kernel(benchmark, kernel, provider, backward):
    if provider not in providers():
        pytest.skip("the fused Triton kernels need CUDA (the CPU interpreter is not a speed measurement)")
    case = next(c for c in cases() if c.kernel == kernel)
    run = runner(providers()[provider](case), case.make(), backward)
    benchmark.group = f"{kernel}-{'fwd+bwd' if backward else 'fwd'}"
    benchmark.extra_info.update(bytes=case.bytes_fwd + (case.bytes_bwd if backward else 0), formula=case.formula)
    benchmark(run)
    if CUDA:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- script mode ---
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth of this GPU in GB/s")
    parser.add_argument("--kernels", nargs="*", default=None, help="subset of kernels to run")
    args = parser.parse_args()
    peak = peak_bandwidth(args.peak_gbps)
    if not CUDA:
        print("No CUDA device: timing the reference paths only (torch eager, torch.compile) on CPU, fp32.")
        print("GPU figures (fused Triton kernels, GB/s against peak bandwidth) need CUDA: run this script on a GPU.\n")
    elif peak is None:
        print(f"Unknown peak bandwidth for {torch.cuda.get_device_name()}: pass --peak-gbps to get % of peak.\n")
    rows = []
    for case in cases():
        if args.kernels and case.kernel not in args.kernels:
            continue
        print(f"{case.kernel}: {case.shape}, {DTYPE}\n  {case.formula}")
        print(f"  {'passes':8} {'provider':14} {'ms':>9} {'GB/s':>8} {'% peak':>7} {'GFLOP/s':>8} {'vs eager':>8}")
        for backward in (False, True):
            eager_ms = None
            for provider in providers():
                row = measure(case, provider, backward, peak)
                eager_ms = eager_ms or row["ms"]
                rows.append(row)
                pct = f"{100 * row['peak_fraction']:6.1f}%" if row["peak_fraction"] else f"{'n/a':>7}"
                print(f"  {row['passes']:8} {provider:14} {row['ms']:9.3f} {row['gbps']:8.1f} {pct} "
                      f"{row['gflops']:8.1f} {eager_ms / row['ms']:7.2f}x")  # fmt: skip
        print()
    print("rows written to", write_rows("kernels", rows))


if __name__ == "__main__":
    main()
