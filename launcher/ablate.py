"""The paper's ablation (its Table 2) on the toy world, trained and scored with the same budget and seeds.

    python -m launcher.ablate --config configs/toy.yaml --seeds 0 1 2          # or: make ablate
    python -m launcher.ablate --seeds 0 1 2 3 4 train.max_steps=600           # more seeds, overrides last

Variants: the teacher; DMD; DMD + TR; DMD + TR + regression (fixed weights); DMD + TR + adaptive regression; the full
method with VIF. Each (variant, seed) is its own run directory under --out with its job.log: finished runs are
reused, unfinished ones resume, failed ones are reported with their log and left out of the means (exit 1). Writes
the ablation section of docs/RESULTS.md, docs/results/ablation.json ({variant: {metric: [one value per seed]}}),
docs/results/teacher.json, docs/results/ablation_runs.json and the plots beside them. Runs unattended:
`nohup python -m launcher.ablate --seeds 0 1 2 > runs/ablation.log 2>&1 &`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from engine import console
from engine.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RUN_DEFAULTS = [
    "logging.sample_every=50",  # the quality monitor's curve points (the paper's Figure 1)
    "logging.sample_count=32",  # held-out prompts scored at each of them
    "checkpoint.every_steps=100",  # an interrupted set loses at most 100 steps of one run
    "checkpoint.keep_last=1",
    "logging.progress_bar=false",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="at least 3 for a spread")
    p.add_argument("--out", default="runs/ablation", help="one run directory per variant and seed under it")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where RESULTS.md and results/ are written")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks of each distillation run")
    p.add_argument("--eval-clips", type=int, default=100, help="held-out prompts scored per seed")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the variants (default: all)")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: score the finished runs, write a partial report"
    )
    console.add_verbose_flag(p)
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config for every training run")
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value words are overrides wherever they stand (--seeds and --variants take several values)
    given = [a for a in argv if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in argv if a not in given])
    args.overrides = [*args.overrides, *given]
    console.install(verbose=args.verbose)
    from engine.toy.ablation import BY_NAME, Ablation, temporal_loss_of

    if args.variants:
        unknown = [v for v in args.variants if v not in BY_NAME]
        if unknown:
            print(f"ablate: unknown variant(s) {unknown}; choose from {list(BY_NAME)}", file=sys.stderr)
            return 2
    if len(set(args.seeds)) != len(args.seeds):
        print(f"ablate: --seeds has duplicates: {args.seeds}", file=sys.stderr)
        return 2
    overrides = [*RUN_DEFAULTS, *args.overrides]
    try:
        cfg = load_config(args.config, overrides)
        for v in args.variants or BY_NAME:  # every variant's config is valid before anything runs
            load_config(args.config, [*BY_NAME[v].overrides, *overrides])
    except ConfigError as exc:
        print(f"ablate: {exc}", file=sys.stderr)
        return 2
    if cfg.vae.kind != "toy":
        print("ablate: config key `vae.kind`: the ablation runs on the toy world (vae.kind=toy)", file=sys.stderr)
        return 2
    abl = Ablation(Path(args.config), Path(args.out), args.seeds, overrides, args.nproc, args.eval_clips)
    if args.variants:
        abl.variants = tuple(args.variants)
    abl.report_only = args.report_only
    records = abl.run()
    from engine.toy.ablation_report import write_results
    from engine.toy.data import toy_tensors
    from engine.toy.parts import toy_parts

    parts = toy_parts(cfg)
    real_latents = toy_tensors(cfg.toy, parts.codec, parts.text, split="train").latents
    command = "python -m launcher.ablate " + shlex.join(argv)
    out = write_results(
        records, abl.real, args.seeds, Path(args.docs), Path(args.out), command=command,
        wall_seconds=abl.wall_seconds, tau=cfg.method.temporal.tau,
        real_temporal_loss=temporal_loss_of(real_latents, cfg), codec=parts.codec, n=args.eval_clips,
        monitored=cfg.logging.sample_count,
    )  # fmt: skip
    for v in out["verdicts"]:
        print(f"ablate: {v['verdict']:>12}: {v['claim']} ({v['metric']} {v['effect']:+.3f}, sd {v['spread']:.3f})")
    print(f"ablate: wrote {Path(args.docs) / 'RESULTS.md'} and {Path(args.docs) / 'results'}")
    if out["failed"]:
        print(f"ablate: error: {out['failed']} run(s) failed; see docs/results/ablation_runs.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
