"""Plan a distillation run's per-GPU memory and step time before renting the GPUs (docs/PERFORMANCE.md#planner).

    python launcher/plan.py --config configs/wan2.1-14b-24gpu.yaml
    python launcher/plan.py --config configs/wan2.1-14b-24gpu.yaml --gpus 16 --sp 4 data.height=720 data.width=1280
    python launcher/plan.py --table        # the docs/PERFORMANCE.md tables (1.3B and 14B, 480p/720p, 8-64 GPUs)

Prints each part (teacher, generator and critic under ZeRO-3, activations, gathered parameters and buckets, the VAE
and text encoder where a rank loads them, the CUDA context), the peak against the usable memory (allocator
headroom stated), whether it fits, and if not the config keys that make it fit; then the step time the FLOP model
implies at --mfu for one 5:1 cycle, and tokens/s. Exit status 0 when it fits, 1 when nothing makes it fit, 2 on a
bad config or layout (the message names the key or option and the values that would work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import console
from engine.config import ConfigError, load_config
from engine.plan import Layout, dtype_bytes_of, fit, format_plan, plan

ROOT = Path(__file__).resolve().parents[1]
TABLE_CONFIGS = {"1.3B": ROOT / "configs/wan2.1-1.3b-24gpu.yaml", "14B": ROOT / "configs/wan2.1-14b-24gpu.yaml"}
TABLE_SIZES = {"480p": (480, 832), "720p": (720, 1280)}
TABLE_GPUS = (8, 16, 24, 64)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (configs/)")
    p.add_argument("--gpus", type=int, default=24, help="GPUs in the job (default 24)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (parallel.sequence_parallel; 1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed for the step time")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense TFLOP/s per GPU (logging.peak_tflops; 989)")
    p.add_argument("--table", action="store_true", help="print the markdown tables of docs/PERFORMANCE.md")
    console.add_verbose_flag(p)
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. data.height=720 deepspeed.offload_optimizer=true"
    )
    return p.parse_args(argv)


def layout_of(cfg, args, gpus: int, sp: int | None) -> Layout:
    if sp is None:
        sp = cfg.parallel.sequence_parallel
    peak = args.peak_tflops if args.peak_tflops is not None else (cfg.logging.peak_tflops or 989.0)
    for name, value in (("--mfu", args.mfu), ("--gpu-memory-gb", args.gpu_memory_gb), ("--peak-tflops", peak)):
        if not value > 0:
            raise ConfigError(f"option `{name}`: must be positive, got {value}")
    if args.mfu > 1:
        raise ConfigError(f"option `--mfu`: a utilization lies in (0, 1], got {args.mfu}")
    return Layout(
        gpus=gpus,
        sp=sp,
        gpu_memory_gb=args.gpu_memory_gb,
        mfu=args.mfu,
        peak_tflops=peak,
        dtype_bytes=dtype_bytes_of(cfg),
    )


def report(cfg, layout: Layout) -> int:
    p = plan(cfg, layout)
    print(format_plan(p))
    if p.fits:
        return 0
    found = fit(cfg, layout)
    if found is None:
        print("nothing makes it fit on this layout (tried: SP degree, offload, checkpointing, micro-batch); more GPUs")
        return 1
    better, keys = found
    print(f"fits with: {' '.join(f'{k}={_yaml(v)}' for k, v in keys.items())}")
    print(f"  -> peak {better.peak / 1e9:.1f} GB of {better.usable / 1e9:.1f} GB usable, "
          f"{better.timing['cycle_s']:.1f} s per 5:1 cycle, {better.timing['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    return 0


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def table(args) -> int:
    """One markdown table per model: a row per clip size and GPU count, the plan as configured and the first change
    that fits (the step time and tokens/s are those of the fitting layout)."""
    for name, path in TABLE_CONFIGS.items():
        print(f"| {name} clip | GPUs | tokens | peak GB as configured | fits | change that fits | peak GB after "
              "| s per 5:1 cycle | tokens/s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for res, (h, w) in TABLE_SIZES.items():
            for gpus in TABLE_GPUS:
                overrides = [*args.overrides, f"data.height={h}", f"data.width={w}", "optim.global_batch_size=null"]
                cfg = load_config(path, overrides)
                lay = layout_of(cfg, args, gpus, args.sp)
                p = plan(cfg, lay)
                change, after = "-", p
                if not p.fits:
                    found = fit(cfg, lay)
                    after, keys = found if found is not None else (None, {})
                    keys = {k: v for k, v in keys.items() if k != "optim.global_batch_size"}
                    change = ", ".join(f"`{k}={_yaml(v)}`" for k, v in keys.items()) if after else "none"
                cells = [f"{res} {cfg.data.num_frames}x{h}x{w}", str(gpus), f"{p.tokens:,}", f"{p.peak / 1e9:.1f}",
                         "yes" if p.fits else "no", change]  # fmt: skip
                if after is None:
                    cells += ["-", "-", "-"]
                else:
                    t = after.timing
                    cells += [f"{after.peak / 1e9:.1f}", f"{t['cycle_s']:.1f}", f"{t['tokens_per_s']:,.0f}"]
                print("| " + " | ".join(cells) + " |")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console.install(verbose=args.verbose)
    try:
        if args.table:
            return table(args)
        if not args.config:
            raise ConfigError("option `--config`: a recipe is required (or --table)")
        cfg = load_config(args.config, args.overrides)
        return report(cfg, layout_of(cfg, args, args.gpus, args.sp))
    except ConfigError as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
