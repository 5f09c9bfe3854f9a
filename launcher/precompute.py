"""Precompute text-embedding and latent caches for a manifest.

    python -m launcher.precompute --config configs/wan2.1-1.3b-24gpu.yaml data.manifest=m.jsonl data.cache_dir=cache/
    torchrun --nproc_per_node 8 -m launcher.precompute --config ... --kinds latents   # one rank per GPU
    python -m launcher.precompute --config ... --dmd-prompts    # data.dmd_prompts.path -> data.dmd_prompts.cache_dir

Re-running the same command resumes (finished shards are skipped). The text cache also stores the negative prompt's
embedding (text/negative.safetensors) for training without the text encoder; a cache made before that gets it from
a re-run with --kinds text.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine import console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (data, text_encoder and vae sections are used)")
    parser.add_argument("--kinds", nargs="+", default=["text", "latents"], help="text, latents (default: both)")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--text-shard-size", type=int, default=256, help="prompts per text shard")
    parser.add_argument("--latent-shard-size", type=int, default=64, help="clips per latent shard")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts or clips encoded at once")
    parser.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> when CUDA is present, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--dmd-prompts",
        action="store_true",
        help="encode data.dmd_prompts.path into the text cache data.dmd_prompts.cache_dir instead (--kinds ignored)",
    )
    console.add_verbose_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.cache_dir=cache/")
    args = parser.parse_intermixed_args(argv)
    args.overrides += [k for k in args.kinds if "=" in k]  # overrides written after --kinds are overrides
    args.kinds = [k for k in args.kinds if "=" not in k]
    if not args.kinds or set(args.kinds) - {"text", "latents"}:
        parser.error(f"argument --kinds: expected text and/or latents, got {args.kinds}")
    console.install(verbose=args.verbose)
    console.setup_logging()

    from engine.config import ConfigError, load_config
    from engine.data.cache import CacheError
    from engine.data.skips import AllSamplesBadError
    from engine.worlds.precompute import run_precompute, run_prompt_precompute, select_device

    try:
        device = str(select_device(args.device))  # cuda:<LOCAL_RANK>: run_precompute makes it the current device
        cfg = load_config(args.config, args.overrides)
        common = dict(rank=args.rank, world_size=args.world_size, batch_size=args.batch_size, device=device)
        if args.dmd_prompts:
            done = run_prompt_precompute(cfg, **common, shard_size=args.text_shard_size, progress=not args.no_progress)
        else:
            done = run_precompute(
                cfg,
                kinds=args.kinds,
                text_shard_size=args.text_shard_size,
                latent_shard_size=args.latent_shard_size,
                progress=not args.no_progress,
                **common,
            )
    except ConfigError as exc:
        print(f"precompute: error: {exc}", file=sys.stderr)
        return 2
    except CacheError as exc:  # shards of another configuration in data.cache_dir
        print(f"precompute: error: config key `data.cache_dir`: {exc}", file=sys.stderr)
        return 2
    except AllSamplesBadError as exc:
        print(f"precompute: error: config key `data.manifest`: {exc}", file=sys.stderr)
        return 1
    for kind, ok in done.items():
        print(f"{kind}: {'index written' if ok else 'this rank is done; the last rank to finish writes the index'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
