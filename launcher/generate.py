"""Generate videos with the distilled student (4 steps, or VIF with the interpolator) or the teacher (Euler + CFG).

    python launcher/generate.py --config configs/toy.yaml --student runs/demo/export/transformer \
        --prompt "a red circle moves left on a black background" --seeds 0 1 2 --out runs/demo/videos
    python launcher/generate.py --config configs/wan2.1-1.3b-24gpu.yaml --student deploy/ --sampler vif \
        --prompts prompts.txt --batch 4 --out videos/
    python launcher/generate.py --config configs/toy.yaml --sampler teacher --steps 50 --prompt "..." --out teacher/
    torchrun --nproc_per_node 8 launcher/generate.py --config configs/wan2.1-14b-24gpu.yaml --student deploy/ \
        --prompts prompts.txt --out videos/                  # each video's tokens split over the 8 GPUs

Writes <out>/<index>_<slug>_seed<k>.mp4 (H.264 at data.fps; toy clips repeated 4x for viewing) and a .json sidecar
beside each (prompt, seed, sampler, timesteps, half-rate steps, RoPE positions, model paths, timings, tokens per step).
The world (toy codec + text, or Wan VAE + umT5 from local paths) and the clip size come from the run config.
--sampler vif finds <deploy>/interpolator next to the student unless --interpolator is given (launcher/export.py puts
one there). The same prompt and seed give the same video whatever the batch. Under torchrun the ranks split each
video's tokens (Ulysses sequence parallelism) in groups of parallel.sequence_parallel ranks (1, the default: all of
them); several groups take the batches in turn, and rank 0 prints. Fused Triton kernels run on CUDA
(model.fused_kernels). Every input check runs before any weight is read. Trailing key=value arguments override the
run config (after a list option such as --seeds, separate them with --: `--seeds 0 1 -- diffusion.shift=3`).
"""

from __future__ import annotations

import argparse
import os
import sys

from engine import console
from engine.config import ConfigError, load_config
from engine.generate import SAMPLERS, GenerateError, GenerateSettings, generate
from engine.models.checkpoint import CheckpointError
from engine.models.interp_unet import InterpolatorError


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (world, clip size, schedule)")
    p.add_argument("--student", help="student DiT: diffusers dir, deployment root, checkpoint file or trainer step dir")
    p.add_argument("--interpolator", help="interpolator dir for --sampler vif (default: <deploy>/interpolator)")
    p.add_argument("--teacher", help="DiT for --sampler teacher (default: model.checkpoint of the config)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", help="every prompt once per seed")
    seeds.add_argument("--seed", type=int, help="a single seed (default 0)")
    p.add_argument("--batch", type=int, default=4, help="videos per batch (default 4)")
    p.add_argument("--sampler", choices=SAMPLERS, default="student")
    p.add_argument("--timesteps", type=float, nargs="+", help="student timesteps (default diffusion.student_timesteps)")
    p.add_argument("--steps", type=int, help="teacher Euler steps (default diffusion.teacher_steps)")
    p.add_argument("--half-rate-steps", type=int, help="vif: steps at half frame rate (default interp.half_rate_steps)")
    p.add_argument("--rope-positions", choices=["contiguous", "stride2"], help="vif: half-rate RoPE frame positions")
    p.add_argument("--view-scale", type=int, help="pixel repeat of the mp4 (default 4 for the toy world, else 1)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    console.add_verbose_flag(p)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. diffusion.shift=3.0")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console.install(verbose=args.verbose)
    console.setup_logging()
    settings = GenerateSettings(
        out_dir=args.out,
        student=args.student,
        prompts=args.prompt or [],
        prompts_file=args.prompts,
        seeds=args.seeds if args.seeds else [0 if args.seed is None else args.seed],
        batch_size=args.batch,
        sampler=args.sampler,
        interpolator=args.interpolator,
        teacher=args.teacher,
        timesteps=args.timesteps,
        teacher_steps=args.steps,
        half_rate_steps=args.half_rate_steps,
        rope_positions=args.rope_positions,
        device=args.device,
        view_scale=args.view_scale,
        progress=not args.no_progress,
    )
    try:
        infos = generate(load_config(args.config, args.overrides), settings)
    except (ConfigError, GenerateError, CheckpointError, InterpolatorError, FileNotFoundError) as exc:
        print(f"generate: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 speaks for the launch
        return 0
    for info in infos:
        print(info["video"])
    sampling = sum(i["timings"].get("sampling_s", 0.0) / i["timings"]["batch_videos"] for i in infos)
    print(f"wrote {len(infos)} videos to {args.out} ({sampling:.2f} s of sampling)")
    return 0


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
