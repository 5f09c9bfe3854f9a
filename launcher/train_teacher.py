"""Train the toy world's teacher (a tiny Wan2.1 DiT) by flow matching, resumably, then export it.

    python launcher/train_teacher.py --config configs/toy.yaml [toy_teacher.steps=2000 ...]
    python launcher/train_teacher.py --config configs/toy.yaml --eval 64     # score the exported teacher

Re-running the same command continues from the newest checkpoint in <toy_teacher.out_dir>/checkpoints (exact resume);
the EMA weights are exported to <toy_teacher.export_dir> (diffusers layout) at the end.
"""

from __future__ import annotations

import argparse
import sys

from engine import console
from engine.config import ConfigError, check_writable_dir, load_config
from engine.toy.recipes import evaluate_teacher, train_teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--eval", type=int, default=0, metavar="N", help="only score the exported teacher on N val prompts")
    console.add_verbose_flag(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. toy_teacher.steps=2000")
    args = p.parse_args(argv)
    console.install(verbose=args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.eval:  # training writes its checkpoints and log there
            check_writable_dir(cfg.toy_teacher.out_dir, "toy_teacher.out_dir")
    except ConfigError as exc:
        print(f"train_teacher: {exc}", file=sys.stderr)
        return 2
    if args.eval:
        print(evaluate_teacher(cfg, args.eval))
        return 0
    from engine.train.errors import TrainingStopped, report

    try:
        print(train_teacher(cfg))
    except TrainingStopped as exc:  # out of space, no checkpoint to resume, non-finite values, SIGTERM/SIGINT
        return report("train_teacher", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
