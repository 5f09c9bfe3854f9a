"""Distill a Wan2.1 teacher into a few-step student (DMD2 + adaptive regression + temporal regularization).

    deepspeed launcher/run.py --config configs/wan2.1-1.3b-24gpu.yaml [key=value ...]
    deepspeed --hostfile hostfile launcher/run.py --config configs/wan2.1-14b-24gpu.yaml
    torchrun --nproc_per_node 2 launcher/run.py --config configs/toy.yaml        # CPU, gloo

Re-running the same command resumes from <logging.run_dir>/checkpoints/latest.
"""

from __future__ import annotations

import argparse
import sys

from engine import console
from engine.config import ConfigError, check_run_dir, load_config, resolve_dtype


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (configs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from deepspeed
    console.add_verbose_flag(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6 train.max_steps=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console.install(verbose=args.verbose)  # every rank runs this, before DeepSpeed is imported
    console.setup_logging()
    from engine.train.errors import TrainingStopped, report
    from engine.train.orphans import die_with_parent

    die_with_parent()  # a worker of torchrun/deepspeed does not outlive its launcher

    try:
        cfg = load_config(args.config, args.overrides)
        check_run_dir(cfg)  # a run that cannot save stops here, not at its first checkpoint
        resolve_dtype(cfg)  # fp16 without CUDA
        from engine.distill.job import run_distillation

        summary = run_distillation(cfg)
        from engine.train import dist

        dist.shutdown()
    except ConfigError as exc:
        print(f"run: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # out of space, no checkpoint to resume, non-finite values, SIGTERM/SIGINT
        return report("run", exc)
    if summary.get("rank", 0) == 0:
        done = (
            " (already finished: nothing to train; raise train.max_steps to continue)"
            if summary.get("finished")
            else ""
        )
        print(f"finished at step {summary['step']}{done}; skipped updates: {summary['skipped']}")
    return 0


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
