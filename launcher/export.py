"""Assemble a deployment directory: the student DiT (diffusers layout) and the frame interpolator side by side.

    python launcher/export.py --checkpoint runs/toy/checkpoints/step_00000600 --out deploy/toy
    python launcher/export.py --checkpoint runs/x/checkpoints/step_00000600 --interpolator runs/interp/interpolator \
        --out deploy/x --dtype bf16
    python launcher/export.py --interpolator runs/interp-toy/interpolator --out runs/demo/export
    python launcher/export.py --checkpoint wan2.1-official/ --out deploy/teacher

Writes <out>/transformer/ (diffusion_pytorch_model*.safetensors + config.json; for a run with method.ema the EMA, the
trained weights beside it in <out>/transformer_raw/) and <out>/interpolator/ (model.safetensors + config.json);
`launcher/generate.py --student <out>` (or <out>/transformer) then finds the interpolator by itself. --checkpoint takes
a distillation step directory (<run>/checkpoints/step_N, whose generator/ holds ZeRO partitions: DeepSpeed's
zero_to_fp32 consolidates it offline, no GPU or process group, with the architecture from <run>/config.yaml or
--config), or a DiT already on disk (official or diffusers layout, rewritten in the diffusers layout). --interpolator
takes an interpolator export, or a run/step directory holding interpolator/.
Both are checked (architecture, config, channel counts) before anything is written.

    python launcher/export.py --checkpoint runs/x/checkpoints/step_00000600 --single-file deploy/x.safetensors \
        --dtype bf16 [--fp8]

--single-file writes the student as one safetensors file in the official Wan2.1 key layout (ComfyUI's "Load
Diffusion Model"; bf16 by default, fp16 or fp32 with --dtype; --fp8 stores the blocks' linear weights as scaled
float8_e4m3fn). --pipeline makes --out a complete diffusers pipeline (model_index.json, the student scheduler,
VAE, umT5 and tokenizer from the run config) that WanPipeline.from_pretrained(out, trust_remote_code=True) loads.

    python launcher/export.py --checkpoint runs/x/checkpoints/step_00000600 --teacher wan2.1-official/ \
        --lora deploy/x_lora.safetensors --rank 64 [--lora-format comfy|diffusers]
    python launcher/export.py --checkpoint my-finetune/ --merge-lora deploy/x_lora.safetensors --out deploy/y

--lora extracts a LoRA of the student over --teacher (SVD per block linear; <lora>.report.json holds the per-layer
reconstruction error) in ComfyUI's or diffusers' key layout; --merge-lora merges one into --checkpoint.

    python launcher/export.py --checkpoint runs/lora/checkpoints/step_00000600 --lora deploy/x_lora.safetensors

A LoRA-trained run (model.lora) needs no SVD: --lora without --teacher writes its generator's adapters as trained
(the EMA's when the run kept one), and --out/--single-file write the merged student (W + alpha / r B A).
See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from engine import console
from engine.deploy import (
    export_deploy,
    export_lora,
    export_pipeline,
    export_single_file,
    export_trained_lora,
    pipeline_run_config,
)
from engine.models.checkpoint import CheckpointError
from engine.models.interp_unet import InterpolatorError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trainer step directory (<run>/checkpoints/step_N) or a DiT checkpoint")
    p.add_argument("--interpolator", help="trained interpolator directory")
    p.add_argument("--config", help="run config of a trainer checkpoint (default: <run>/config.yaml)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="dtype of a trainer-checkpoint export (default fp32; bf16 for --single-file and --lora)",
    )
    p.add_argument("--out", help="deployment directory")
    p.add_argument("--single-file", help="also write the student as one .safetensors file, official Wan2.1 keys")
    p.add_argument("--fp8", action="store_true", help="--single-file: blocks' linear weights in scaled float8_e4m3fn")
    p.add_argument(
        "--pipeline", action="store_true", help="make --out a complete diffusers WanPipeline (VAE, umT5, scheduler)"
    )
    p.add_argument(
        "--lora",
        help="write a LoRA of --checkpoint into this .safetensors file: by SVD over --teacher, or a LoRA-"
        "trained run's adapters as they are (no --teacher)",
    )
    p.add_argument("--teacher", help="--lora: the model the LoRA applies to (any DiT checkpoint)")
    p.add_argument("--rank", type=int, help="--lora: the LoRA rank (of a LoRA-trained run: its own)")
    p.add_argument("--lora-format", choices=["comfy", "diffusers"], default="comfy", help="--lora: key layout")
    p.add_argument("--merge-lora", help="merge this LoRA file into --checkpoint before writing --out/--single-file")
    console.add_verbose_flag(p)
    args = p.parse_args(argv)
    console.install(verbose=args.verbose)
    if not (args.checkpoint or args.interpolator):
        p.error("nothing to export: give --checkpoint and/or --interpolator")
    if not (args.out or args.single_file or args.lora):
        p.error("nowhere to export to: give --out, --single-file and/or --lora")
    try:
        info = run(args)
    except (CheckpointError, InterpolatorError, FileNotFoundError, ValueError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


def run(args: argparse.Namespace) -> dict:
    """Each requested output; every check that needs no weights comes before the first write."""
    if args.fp8 and not args.single_file:
        raise ValueError("--fp8 applies to --single-file (the deployment directory stays in --dtype)")
    if (args.single_file or args.fp8) and not args.checkpoint:
        raise ValueError("--single-file needs --checkpoint (the student)")
    if args.single_file and not str(args.single_file).endswith(".safetensors"):
        raise ValueError(f"--single-file: {args.single_file} must end in .safetensors")
    if args.pipeline and not (args.out and args.checkpoint):
        raise ValueError("--pipeline needs --checkpoint (the student) and --out (the pipeline directory)")
    if args.lora and not args.checkpoint:
        raise ValueError("--lora needs --checkpoint (the student; with --teacher and --rank for an SVD extraction)")
    if args.lora and args.teacher and not args.rank:
        raise ValueError("--lora with --teacher (an SVD extraction) needs --rank")
    if args.merge_lora and not (args.checkpoint and (args.out or args.single_file)):
        raise ValueError("--merge-lora needs --checkpoint (the base model) and --out and/or --single-file")
    run_cfg = pipeline_run_config(args.checkpoint, args.config) if args.pipeline else None
    info = {}
    if args.out:
        dtype = DTYPES[args.dtype or "fp32"]
        info = export_deploy(
            args.out,
            student=args.checkpoint,
            interpolator=args.interpolator,
            run_config=args.config,
            dtype=dtype,
            lora=args.merge_lora,
        )
    if run_cfg is not None:
        info["pipeline"] = str(export_pipeline(args.out, run_cfg))
    if args.single_file:
        dtype = DTYPES[args.dtype or "bf16"]
        path = export_single_file(
            args.checkpoint, args.single_file, run_config=args.config, dtype=dtype, fp8=args.fp8, lora=args.merge_lora
        )
        info["single_file"] = {"path": str(path), "bytes": path.stat().st_size, "fp8": args.fp8}
    if args.lora and not args.teacher:  # a LoRA-trained run's adapters, as trained
        dtype = DTYPES[args.dtype or "bf16"]
        report = export_trained_lora(args.checkpoint, args.lora, layout=args.lora_format, dtype=dtype,
                                     run_config=args.config, rank=args.rank)  # fmt: skip
        info["lora"] = {"path": args.lora, "rank": report["rank"], "alpha": report["alpha"], "layout": args.lora_format,
                        "trained": True, "ema": report["ema"], "layers": len(report["layers"])}  # fmt: skip
    elif args.lora:
        dtype = DTYPES[args.dtype or "bf16"]
        report = export_lora(args.checkpoint, args.teacher, args.lora, args.rank, layout=args.lora_format,
                             dtype=dtype, run_config=args.config)  # fmt: skip
        worst = sorted(report["layers"].items(), key=lambda kv: -kv[1]["rel_error"])[:3]
        info["lora"] = {"path": args.lora, "rank": args.rank, "layout": args.lora_format,
                        "mean_rel_error": report["mean_rel_error"], "max_rel_error": report["max_rel_error"],
                        "worst_layers": {k: v["rel_error"] for k, v in worst},
                        "not_in_lora": len(report["not_in_lora"]), "report": args.lora[: -len(".safetensors")]
                        + ".report.json"}  # fmt: skip
    return info


if __name__ == "__main__":
    sys.exit(main())
