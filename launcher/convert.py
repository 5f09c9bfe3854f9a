"""Convert a Wan2.1 DiT checkpoint between the official layout and the diffusers layout.

    python launcher/convert.py SRC DST                 # official -> diffusers, or diffusers -> official (detected)
    python launcher/convert.py SRC DST --to diffusers  # force the target layout

SRC: a .safetensors file, a *.safetensors.index.json, a directory holding either, or a diffusers pipeline root (its
transformer/ is used). A config.json must sit next to the weights. Tensors stream one at a time; dtypes are kept.
"""

from __future__ import annotations

import argparse
import sys

from engine import console
from engine.models.checkpoint import CheckpointError, checkpoint_keys, convert_checkpoint, detect_layout


def _parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["diffusers", "official"], help="target layout (default: the other one)")
    p.add_argument(
        "--from", dest="src_layout", choices=["official", "diffusers"], help="source layout (default: detect)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    console.add_verbose_flag(p)
    args = p.parse_args(argv)
    console.install(verbose=args.verbose)
    try:
        src_layout = args.src_layout or detect_layout(checkpoint_keys(args.src))
        to = args.to or ("diffusers" if src_layout == "official" else "official")
        layout, n = convert_checkpoint(args.src, args.dst, to, src_layout, _parse_size(args.max_shard_size))
    except (CheckpointError, OSError, KeyError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {n} tensors: {layout} {args.src} -> {to} {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
