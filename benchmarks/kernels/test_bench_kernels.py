"""Fused Triton kernels vs the baselines a user would pick: the pure-torch reference in eager mode and under
torch.compile, side by side, forward and forward+backward.

    python benchmarks/kernels/test_bench_kernels.py     # table with formulas; rows to benchmarks/results/kernels.jsonl
    pytest benchmarks/kernels --benchmark-only -o addopts=''   # the same cases under pytest-benchmark

Bytes are those an ideal fused kernel must move (each input read once, each output written once); every provider's
GB/s uses that same count, so GB/s compares providers and, on CUDA, the fraction of peak bandwidth says how close the
fused kernel gets to the memory roof. FLOPs count the element-wise arithmetic (these ops are bound by memory).
The interpolation U-Net cases (conv_norm_act, interpolate) are bound by compute instead: FLOPs count the convolutions
(2 * Cin * 9 * Cout * N * H * W per 3x3 conv), the fraction of peak is of the GPU's dense TFLOP/s, and they run forward
only (inference kernels; training uses the torch path).
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

from engine.models.interp_unet import InterpUNet, fused_interpolate  # noqa: E402
from kernels.adaln import adaln_modulate, adaln_modulate_reference  # noqa: E402
from kernels.gated_residual import gated_residual, gated_residual_reference  # noqa: E402
from kernels.interp_unet import conv_norm_act, conv_norm_act_reference  # noqa: E402
from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference  # noqa: E402
from kernels.temporal_variance import temporal_loss, temporal_variance_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # bf16 gains nothing on AVX2 CPUs (docs/architecture.md#cpu-speed)
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
# Dense bf16 tensor-core TFLOP/s (vendor data sheets, no sparsity); --peak-tflops overrides.
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H800": 989, "H200": 989, "A100": 312, "L40S": 362}
# Interpolation U-Net at the paper's widths (configs/interp-wan.yaml) on Wan's 60 x 104 latent: 21 -> 11 frames
# -> 10 pairs per video. On CPU 2 pairs (3 frames), so that the suite runs in seconds; the maps are the real ones.
INTERP_WIDTHS, INTERP_FRAMES = (128, 256, 512), 11 if CUDA else 3


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
    forward_only: bool = False  # inference kernels: no fwd+bwd rows
    roof: str = "memory"  # "memory": % of peak GB/s; "compute": % of peak TFLOP/s


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
        *interp_cases(),
    ]  # fmt: skip


def _interp_model() -> InterpUNet:
    """The paper-width U-Net with random weights (the zero-initialized output conv included), eval mode, DTYPE."""
    net = InterpUNet(LATENT[1], INTERP_WIDTHS)
    torch.nn.init.normal_(net.out.weight, std=0.02)
    return net.to(DEVICE, DTYPE).eval().requires_grad_(False)


def _interp_torch(model: InterpUNet, latents: torch.Tensor) -> torch.Tensor:
    """The model's own torch path (the interpolate case's reference)."""
    return model.interpolate(latents, fused=False)


def _unet_costs(c: int, widths, pairs: int, h: int, w: int, s: int) -> tuple[int, int]:
    """(FLOPs, bytes) of one interpolate call. FLOPs: 3x3 convs, 2x2 transposed convs, the 1x1 conv. Bytes: what the
    fused path moves: every map it materializes written once and read once per consumer (the pair convs read the
    latent twice per frame, pooled inputs are read at full size), the latent, the 2F - 1 output, the weights."""
    c1, c2, c3 = widths
    hw = [(h, w)]
    for _ in range(3):
        hw.append(((hw[-1][0] + 1) // 2, (hw[-1][1] + 1) // 2))
    px = [a * b for a, b in hw]  # pixels per map at levels 0..3 (3: the pooled bottom)
    units = [
        (2 * c, c1, 0, 2 * c * px[0]),
        (c1, c1, 0, c1 * px[0]),
        (c1, c2, 1, c1 * px[0]),
        (c2, c2, 1, c2 * px[1]),
        (c2, c3, 2, c2 * px[1]),
        (c3, c3, 2, c3 * px[2]),
        (2 * c3, c3, 2, 2 * c3 * px[2]),
        (c3, c3, 2, c3 * px[2]),
        (2 * c2, c2, 1, 2 * c2 * px[1]),
        (c2, c2, 1, c2 * px[1]),
        (2 * c1, c1, 0, 2 * c1 * px[0]),
        (c1, c1, 0, c1 * px[0]),
    ]  # (Cin, Cout, level, input elements read): the 12 ConvNormAct units
    ups = [(c3, c3, 3), (c3, c2, 2), (c2, c1, 1)]  # (Cin, Cout, coarse level) of the transposed convs
    flops = sum(2 * 9 * ci * co * px[lv] for ci, co, lv, _ in units) + 2 * c1 * c * px[0]
    flops += sum(2 * ci * co * 4 * px[lv] for ci, co, lv in ups)
    elems = sum(read + co * px[lv] for _, co, lv, read in units) + c3 * (px[2] + px[3])  # + the bottom max-pool
    elems -= c1 * px[0]  # the last unit's activation stays in the head kernel
    elems += sum(ci * px[lv] + co * 4 * px[lv] for ci, co, lv in ups)
    elems += 2 * c * px[0]  # the head reads both frames of each pair again (residual, originals)
    params = sum(9 * ci * co + 3 * co for ci, co, _, _ in units) + sum(4 * ci * co + co for ci, co, _ in ups)
    out_frames = 2 * pairs + 1  # one video: F = pairs + 1 frames in (read by the pair conv), 2F - 1 written
    return pairs * flops, (pairs * elems + out_frames * c * px[0] + params + c1 * c + c) * s


def interp_cases() -> list[Case]:
    """The first encoder level's second unit (128 -> 128 channels, 60 x 104) and the whole interpolate: forward."""
    s, c, (h, w) = DTYPE.itemsize, LATENT[1], LATENT[3:]
    pairs, cw = INTERP_FRAMES - 1, INTERP_WIDTHS[0]
    unit_flops = 2 * 9 * cw * cw * pairs * h * w + 10 * cw * pairs * h * w
    unit_bytes = (2 * cw * pairs * h * w + 9 * cw * cw + 3 * cw) * s
    unet_flops, unet_bytes = _unet_costs(c, INTERP_WIDTHS, pairs, h, w, s)

    def unit_args():
        x = _t(pairs, cw, h, w, grad=False)
        conv = _t(cw, cw, 3, 3, grad=False, scale=(9 * cw) ** -0.5)
        return (x, conv, *(_t(cw, grad=False) for _ in range(3)), 1e-5)

    return [
        Case("conv_norm_act", f"x ({pairs}, {cw}, {h}, {w}) -> {cw} ch", unit_args, conv_norm_act,
             conv_norm_act_reference, unit_bytes, 0, unit_flops, 0,
             "flops 2*9*Cin*Cout*N*H*W + 10*Cout*N*H*W (conv; bias, norm, affine, SiLU); bytes (N*Cin*H*W + "
             "N*Cout*H*W + 9*Cin*Cout + 3*Cout)*s (x read once, y written once, weights)", True, "compute"),
        Case("interpolate", f"latents (1, {c}, {INTERP_FRAMES}, {h}, {w}), widths {INTERP_WIDTHS}",
             lambda: (_interp_model(), _t(1, c, INTERP_FRAMES, h, w, grad=False)), fused_interpolate,
             _interp_torch, unet_bytes, 0, unet_flops, 0,
             "flops: sum of 2*9*Cin*Cout*N*H*W over the 12 3x3 convs + 2*Cin*Cout*N*(2h)*(2w) over the 3 transposed "
             "convs + 2*c1*C*N*H*W (1x1), N = F - 1 pairs; bytes: each map the fused path materializes written once "
             "and read once per consumer, latent, 2F - 1 output, weights", True, "compute"),
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


def measure(case: Case, provider: str, backward: bool, peak_gbps: float | None, peak_tflops: float | None = None):
    fn = providers()[provider](case)
    seconds = median_time(runner(fn, case.make(), backward), repeats=10, warmup=3)
    moved = case.bytes_fwd + (case.bytes_bwd if backward else 0)
    flops = case.flops_fwd + (case.flops_bwd if backward else 0)
    gbps, gflops = moved / seconds / 1e9, flops / seconds / 1e9
    if case.roof == "compute":
        fraction = gflops / (peak_tflops * 1e3) if peak_tflops else None
    else:
        fraction = gbps / peak_gbps if peak_gbps else None
    return dict(kernel=case.kernel, shape=case.shape, dtype=str(DTYPE).split(".")[-1], device=DEVICE,
                passes="fwd+bwd" if backward else "fwd", provider=provider, ms=seconds * 1e3, bytes=moved,
                flops=flops, gbps=gbps, gflops=gflops, roof=case.roof, peak_fraction=fraction)  # fmt: skip


def peak_bandwidth(override: float | None) -> float | None:
    if override or not CUDA:
        return override
    name = torch.cuda.get_device_name()
    return next((gbps for key, gbps in PEAK_GBPS.items() if key in name), None)


def peak_compute(override: float | None) -> float | None:
    """Dense TFLOP/s of this GPU in DTYPE (bf16 on CUDA); None when unknown or on CPU."""
    if override or not CUDA:
        return override
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


# ------------------------------------------------------------------------------------------------ pytest-benchmark ---
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "fused_triton"])
@pytest.mark.parametrize(
    "kernel", ["adaln", "gated_residual", "qk_norm_rope", "temporal_loss", "conv_norm_act", "interpolate"]
)
def test_kernel(benchmark, kernel, provider, backward):
    if provider not in providers():
        pytest.skip("the fused Triton kernels need CUDA (the CPU interpreter is not a speed measurement)")
    case = next(c for c in cases() if c.kernel == kernel)
    if backward and case.forward_only:
        pytest.skip(f"{kernel} is an inference kernel: forward only")
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
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of this GPU in bf16")
    parser.add_argument("--kernels", nargs="*", default=None, help="subset of kernels to run")
    args = parser.parse_args()
    peak, peak_tflops = peak_bandwidth(args.peak_gbps), peak_compute(args.peak_tflops)
    if not CUDA:
        print("No CUDA device: timing the reference paths only (torch eager, torch.compile) on CPU, fp32.")
        print(
            "GPU figures (fused Triton kernels, GB/s and TFLOP/s against peak) need CUDA: run this script on a GPU.\n"
        )
    elif peak is None or peak_tflops is None:
        print(f"Unknown peak for {torch.cuda.get_device_name()}: pass --peak-gbps / --peak-tflops to get % of peak.\n")
    rows = []
    for case in cases():
        if args.kernels and case.kernel not in args.kernels:
            continue
        print(f"{case.kernel}: {case.shape}, {DTYPE}, % of peak {case.roof}\n  {case.formula}")
        print(f"  {'passes':8} {'provider':14} {'ms':>9} {'GB/s':>8} {'% peak':>7} {'GFLOP/s':>8} {'vs eager':>8}")
        for backward in (False,) if case.forward_only else (False, True):
            eager_ms = None
            for provider in providers():
                row = measure(case, provider, backward, peak, peak_tflops)
                eager_ms = eager_ms or row["ms"]
                rows.append(row)
                pct = f"{100 * row['peak_fraction']:6.1f}%" if row["peak_fraction"] else f"{'n/a':>7}"
                print(f"  {row['passes']:8} {provider:14} {row['ms']:9.3f} {row['gbps']:8.1f} {pct} "
                      f"{row['gflops']:8.1f} {eager_ms / row['ms']:7.2f}x")  # fmt: skip
        print()
    print("rows written to", write_rows("kernels", rows))


if __name__ == "__main__":
    main()
