"""GPU check, stage "kernels": every fused Triton kernel against the pure-torch reference in eager mode and under
torch.compile, forward and forward+backward, at the engine's shapes (benchmarks/kernels/test_bench_kernels.py: the
cases, their byte and FLOP formulas, and the device peaks). Each row has GB/s or TFLOP/s and the fraction of peak.

Fused and eager rows come first for every kernel, then the torch.compile ones (its compilations take most of the
stage's time), so a stage cut off by its budget still compares the fused kernels with eager everywhere.
"""

from __future__ import annotations

import importlib
import os

from common import Stage, stage_args

bk = importlib.import_module("test_bench_kernels")  # benchmarks/kernels, which importing common put on sys.path


def _tiny() -> None:
    """Shrink the benchmark's shapes for a CPU dry run (the case builders read these module globals)."""
    bk.TOKENS, bk.DIM, bk.HEADS, bk.LATENT = 64, 64, 2, (1, 4, 3, 8, 8)
    bk.INTERP_WIDTHS, bk.INTERP_FRAMES = (8, 16, 32), 3


def _interpreted_providers() -> dict:
    """Dry run under TRITON_INTERPRET=1 and VIDISTILL_KERNELS=triton (run_all.sh sets both on a CPU): the fused
    kernels run in Triton's interpreter next to eager, so their launchers and arguments are exercised."""
    return {"torch_eager": lambda c: c.reference, "fused_triton": lambda c: c.fused}


def main() -> None:
    args = stage_args(__doc__.split("\n\n")[0])
    with Stage("kernels", args) as st:
        if args.dry_run:
            _tiny()
            if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("VIDISTILL_KERNELS") == "triton":
                bk.providers = _interpreted_providers
        peak, peak_tflops = bk.peak_bandwidth(None), bk.peak_compute(None)
        st.set(peak_gbps=peak, peak_tflops=peak_tflops, dtype=str(bk.DTYPE).split(".")[-1], tokens=bk.TOKENS)
        providers = list(bk.providers())
        first = [p for p in providers if p != "torch_compile"]
        later = [] if args.dry_run else ["torch_compile"]  # inductor on a CPU compiles C++ for minutes: not a check
        cases = bk.cases()
        for group in (first, later):
            for case in cases:
                for backward in (False,) if case.forward_only else (False, True):
                    for provider in group:
                        if st.left() < (30 if provider == "torch_compile" else 5):  # a compilation takes ~20 s
                            st.note(f"budget spent: stopped before {case.kernel} {provider}")
                            return
                        if args.dry_run:  # one call each: the path runs, nothing is timed
                            bk.runner(bk.providers()[provider](case), case.make(), backward)()
                            st.add(dict(kernel=case.kernel, passes="fwd+bwd" if backward else "fwd", provider=provider))
                            continue
                        row = bk.measure(case, provider, backward, peak, peak_tflops)
                        row["formula"] = case.formula
                        st.add(row)
                        pct = f"{100 * row['peak_fraction']:.1f}% of peak" if row["peak_fraction"] else "peak n/a"
                        print(
                            f"{case.kernel:15} {row['passes']:8} {provider:14} {row['ms']:9.3f} ms  {pct}", flush=True
                        )


if __name__ == "__main__":
    main()
