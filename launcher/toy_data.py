"""Toy-world data: generate or repair the dataset, verify it, fit the toy codec, print real-clip metrics.

python -m launcher.toy_data generate [--num-clips 1024] [--cache-dir cache/toy]
python -m launcher.toy_data verify [--deep]
python -m launcher.toy_data fit-codec [--out engine/assets/toy_codec.safetensors]
python -m launcher.toy_data metrics          # real val clips (and through the codec) vs the train calibration
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from engine import console
from engine.config import ToyWorldConfig


def _config(args: argparse.Namespace) -> ToyWorldConfig:
    fields = {f.name for f in dataclasses.fields(ToyWorldConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return ToyWorldConfig(**given)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["generate", "verify", "fit-codec", "metrics"])
    p.add_argument("--cache-dir", dest="cache_dir")
    p.add_argument("--num-clips", dest="num_clips", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", dest="num_frames", type=int)
    p.add_argument("--deep", action="store_true", help="verify: also decode every file")
    p.add_argument("--out", help="fit-codec: output file (default: the shipped asset)")
    p.add_argument("--z-dim", dest="z_dim", type=int, default=16, help="fit-codec: latent channels")
    console.add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.install(verbose=args.verbose)
    console.setup_logging()
    cfg = _config(args)
    if args.command == "generate":
        from engine.toy.world import sync_dataset

        print(sync_dataset(cfg).summary())
        return 0
    if args.command == "verify":
        from engine.toy.world import verify_dataset

        counts = verify_dataset(cfg, deep=args.deep)
        print(json.dumps(dict(counts), indent=1))
        return 0 if set(counts) == {"ok"} else 1
    if args.command == "fit-codec":
        from engine.toy.codec import ASSET, fit_toy_codec

        out = args.out or str(ASSET)
        report = fit_toy_codec(cfg, out, z_dim=args.z_dim)
        print(json.dumps(report, indent=1))
        return 0
    from engine.toy.evaluate import real_metrics_table

    print(real_metrics_table(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
