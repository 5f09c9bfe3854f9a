"""The toy-world demo: distill a tiny Wan-architecture teacher into a 4-step student on this CPU, end to end.

    make demo                                 # installs what it needs, then runs this
    python -m launcher.demo [key=value ...]   # overrides of configs/toy.yaml, e.g. train.max_steps=600

Writes runs/demo/: the job's checkpoints, TensorBoard logs, sample videos (mp4), the exported student (diffusers
layout) and metrics.md (real clips vs teacher vs student). Re-running skips what is done.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from engine import console
from engine.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks of the distillation job")
    p.add_argument("--eval-clips", type=int, default=100, help="held-out prompts scored")
    console.add_verbose_flag(p)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    console.install(verbose=args.verbose)  # --verbose is exported to the distillation ranks (VIDISTILL_VERBOSE)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    from engine.toy.demo import run_demo

    try:
        summary = run_demo(
            cfg, Path(args.config), Path(args.run_dir), args.overrides, nproc=args.nproc, eval_clips=args.eval_clips
        )
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:  # the distillation job said why above; point at its log
        print(f"demo: error: the distillation job failed (exit {exc.returncode}); see {args.run_dir}/train.log",
              file=sys.stderr)  # fmt: skip
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
