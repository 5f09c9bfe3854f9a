"""Train the latent frame-interpolation U-Net (paper appendix 8).

    python launcher/train_interp.py --config configs/interp-toy.yaml --toy
    python launcher/train_interp.py --config configs/interp-toy.yaml --synthetic 9x8x8
    deepspeed --num_gpus 2 launcher/train_interp.py --config configs/interp-wan.yaml --latents /data/cache
    torchrun --nproc_per_node 2 launcher/train_interp.py --config configs/interp-wan.yaml --latents /data/latents \
        interp.steps=2000 logging.run_dir=runs/interp

Latents: a precompute cache dir (latents/index.json), a directory of *.safetensors holding `latents`, `--online`
(decode data.manifest and encode with the configured VAE), or `--synthetic FxHxW` moving patterns (smoke tests).
Trailing key=value args override the config. On CPU set OMP_NUM_THREADS=1 per process (docs/architecture.md#deepspeed).
"""

from __future__ import annotations

import argparse
import sys

from engine import console
from engine.config import ConfigError, check_run_dir, load_config
from engine.interp.train import run
from engine.models.interp_unet import InterpolatorError


def _size(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FxHxW, e.g. 21x60x104, got {text!r}") from None
    return f, h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (engine.config)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--latents", help="latent cache dir or directory of *.safetensors")
    src.add_argument("--synthetic", type=_size, metavar="FxHxW", help="synthetic moving patterns of this size")
    src.add_argument("--online", action="store_true", help="decode data.manifest and encode with the VAE")
    src.add_argument("--toy", action="store_true", help="the toy world's latents (train split; val split scored)")
    p.add_argument("--export", help="where the trained interpolator goes (default <run_dir>/interpolator)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    console.add_verbose_flag(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. interp.steps=100")
    args = p.parse_args(argv)
    console.install(verbose=args.verbose)  # every rank runs this, before DeepSpeed is imported
    from engine.train.errors import TrainingStopped, report
    from engine.train.orphans import die_with_parent

    die_with_parent()  # a worker of torchrun/deepspeed does not outlive its launcher

    try:
        cfg = load_config(args.config, args.overrides)
        check_run_dir(cfg)  # a run that cannot save stops here, not at its first checkpoint
        result = run(
            cfg,
            latents=args.latents,
            synthetic=args.synthetic,
            online=args.online,
            toy=args.toy,
            export_dir=args.export,
        )
    except (ConfigError, InterpolatorError, FileNotFoundError, ValueError) as exc:
        print(f"train_interp: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # out of space, no checkpoint to resume, non-finite values, SIGTERM/SIGINT
        return report("train_interp", exc)
    if result.step == result.start:
        print(f"nothing to train: the run in {cfg.logging.run_dir} is already at step {result.step}")
    elif result.export_dir is not None:  # rank 0
        print(f"trained steps {result.start + 1}-{result.step}; interpolator exported to {result.export_dir}")
    if result.heldout:
        h = result.heldout
        print(
            f"held-out: PSNR {h['psnr']:.2f} dB (MSE {h['loss']:.4f}) vs linear blend {h['psnr_blend']:.2f} dB "
            f"(MSE {h['loss_blend']:.4f})"
        )
    return 0


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
