"""Toy-teacher experiments: train resumably and score the EMA at checkpoints, one curve row per point.

    # train (resumes from runs/teacher-exp/<run>/checkpoints), score every 1000 steps, stop at --until
    python launcher/teacher_experiment.py train --config configs/toy.yaml --run proc --lever procedural \\
        --until 6000 toy_teacher.data=procedural
    # the curve as a Markdown table against the bar
    python launcher/teacher_experiment.py table
    # score an exported teacher (diffusers layout) with the same protocol
    python launcher/teacher_experiment.py score --config configs/toy.yaml --run shipped --lever baseline \\
        --weights engine/assets/toy_teacher --step 12000 --cpu-minutes 124

Rows go to --curve (docs/results/teacher_curve.csv): run, lever, step, training CPU minutes of the process (render
and encode of procedural clips included, scoring excluded), wall minutes, every metric, and how many of the bar's
seven criteria are met. The LR schedule follows toy_teacher.steps, so a run stopped at --until continues on the same
schedule when re-run with a larger --until. The EMA at each scored step is exported to <out_dir>/ema-<step>/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from engine import console
from engine.config import ConfigError, load_config
from engine.models.checkpoint import save_weights
from engine.toy.recipes import load_teacher, teacher_data, toy_parts
from engine.toy.teacher import TeacherTrainer
from engine.toy.teacher_curve import Stopwatch, append_row, bar_passed, eval_set, read_rows, real_row_values, score


def _row(args, step, cpu_s, wall_s, steps, es, metrics) -> dict:
    return {
        "run": args.run,
        "lever": args.lever,
        "step": step,
        "cpu_minutes": cpu_s / 60,
        "wall_minutes": wall_s / 60,
        "eval_steps": steps,
        "n": len(es.params),
        **metrics,
        "bar_passed": bar_passed(metrics, es),
    }


def _score_and_log(args, cfg, parts, es, model, step, cpu_s, wall_s) -> dict:
    watch = Stopwatch()
    metrics = score(model, es, cfg, parts, steps=args.eval_steps)
    row = _row(args, step, cpu_s, wall_s, args.eval_steps or cfg.diffusion.teacher_steps, es, metrics)
    append_row(args.curve, row)
    cpu, wall = watch.elapsed()
    print(json.dumps({**row, "score_cpu_s": round(cpu, 1), "score_wall_s": round(wall, 1)}), flush=True)
    return row


def train(args, cfg) -> int:
    parts = toy_parts(cfg)
    es = eval_set(cfg, parts, args.n)
    real_path = Path(args.curve).with_name("teacher_real.json")
    real_path.parent.mkdir(parents=True, exist_ok=True)
    if not real_path.is_file():
        real_path.write_text(json.dumps(real_row_values(es), indent=1) + "\n")
    trainer = TeacherTrainer(cfg.toy_teacher, cfg.model, parts.schedule, teacher_data(cfg, parts), parts.uncond)
    clock_path = trainer.out / "clock.json"
    clock = json.loads(clock_path.read_text()) if clock_path.is_file() else {"cpu_s": 0.0, "wall_s": 0.0}
    done = {int(r["step"]) for r in read_rows(args.curve) if r["run"] == args.run}
    until = min(args.until or cfg.toy_teacher.steps, cfg.toy_teacher.steps)
    state = {"watch": Stopwatch()}

    def score_point(step: int) -> None:
        if (step % args.eval_every == 0 or step == until) and step not in done:
            save_weights(trainer.ema, cfg.model, trainer.out / f"ema-{step:06d}")
            _score_and_log(args, cfg, parts, es, trainer.ema, step, clock["cpu_s"], clock["wall_s"])
            done.add(step)

    def on_step(loop, metrics) -> None:  # after every step (metrics None: once, after any resume)
        if metrics is None:
            if clock.get("step", 0) != loop.step:
                print(f"warning: clock.json is at step {clock.get('step')}, the checkpoint at {loop.step}", flush=True)
            print(f"{args.run}: step {loop.step} -> {until} (schedule {cfg.toy_teacher.steps})", flush=True)
        else:
            cpu, wall = state["watch"].elapsed()
            clock["cpu_s"] += cpu
            clock["wall_s"] += wall
            if loop.step % 100 == 0:
                print(
                    f"step {loop.step} loss {float(metrics['loss']):.4f} cpu_min {clock['cpu_s'] / 60:.1f}", flush=True
                )
        if loop.step > 0:
            score_point(loop.step)  # also a point lost to an interruption during scoring
        state["watch"] = Stopwatch()  # scoring is not training time

    def after_save(loop, path) -> None:
        clock_path.write_text(json.dumps({**clock, "step": loop.step}))

    trainer.run(progress=False, until=until, on_step=on_step, after_save=after_save)
    return 0


def score_weights(args, cfg) -> int:
    parts = toy_parts(cfg)
    es = eval_set(cfg, parts, args.n)
    model = load_teacher(args.weights)
    _score_and_log(args, cfg, parts, es, model, args.step, args.cpu_minutes * 60, float("nan"))
    return 0


TABLE_METRICS = (
    ("instance_preservation", "inst."),
    ("direction_accuracy", "dir."),
    ("shape_accuracy", "shape"),
    ("colour_accuracy", "colour"),
    ("travel", "travel"),
    ("saturation_ratio", "sat. ratio"),
    ("frechet_distance", "FD"),
    ("prompt_alignment", "align"),
)


def table(args) -> int:
    """The curve as a Markdown table (one row per scored point), the bar and the real clips first."""
    real = json.loads(Path(args.curve).with_name("teacher_real.json").read_text())
    head = ["run", "lever", "step", "CPU min", *(short for _, short in TABLE_METRICS), "bar"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rt, rfd = real["real (val)"]["travel"], real["real via codec"]["frechet_distance"]
    bar = [">= 0.85", ">= 0.85", ">= 0.90", ">= 0.95", f"{0.85 * rt:.2f}-{1.15 * rt:.2f}", "0.95-1.05"]
    lines.append("| **bar** | | | | " + " | ".join(bar) + f" | <= {3 * rfd:.3f} | | 7/7 |")
    for name, row in real.items():
        cells = [f"{row[m]:.3f}" for m, _ in TABLE_METRICS]
        lines.append(f"| {name} | | | | " + " | ".join(cells) + " | |")
    for r in read_rows(args.curve):
        cpu = float(r["cpu_minutes"])
        cells = [f"{float(r[m]):.3f}" for m, _ in TABLE_METRICS]
        cpu_text = "-" if cpu != cpu else f"{cpu:.1f}"
        lines.append(
            f"| {r['run']} | {r['lever']} | {r['step']} | {cpu_text} | "
            + " | ".join(cells)
            + f" | {r['bar_passed']}/7 |"
        )
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("train", "score", "table"))
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--run", default="", help="run name (the curve's `run` column; out_dir runs/teacher-exp/<run>)")
    p.add_argument("--lever", default="", help="what this run varies (the curve's `lever` column)")
    p.add_argument("--curve", default="docs/results/teacher_curve.csv")
    p.add_argument("--n", type=int, default=100, help="held-out (val) prompts scored")
    p.add_argument("--eval-steps", type=int, default=None, help="sampler steps (default diffusion.teacher_steps)")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--until", type=int, default=None, help="stop at this step (default toy_teacher.steps)")
    p.add_argument("--weights", help="score: an exported teacher directory")
    p.add_argument("--step", type=int, default=0, help="score: the step to record")
    p.add_argument("--cpu-minutes", type=float, default=float("nan"), help="score: the CPU minutes to record")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. toy_teacher.data=procedural")
    console.add_verbose_flag(p)
    args = p.parse_intermixed_args(argv)
    console.install(verbose=args.verbose)
    if args.mode == "table":
        return table(args)
    if not args.run:
        p.error("--run is required to train or score")
    torch.set_num_threads(1)
    overrides = [f"toy_teacher.out_dir=runs/teacher-exp/{args.run}", *args.overrides]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"teacher_experiment: {exc}", file=sys.stderr)
        return 2
    from engine.train.errors import TrainingStopped, report

    try:
        return train(args, cfg) if args.mode == "train" else score_weights(args, cfg)
    except TrainingStopped as exc:  # out of space, non-finite values, SIGTERM/SIGINT: one line
        return report("teacher_experiment", exc)


if __name__ == "__main__":
    sys.exit(main())
