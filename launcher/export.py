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
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from engine import console
from engine.deploy import export_deploy
from engine.models.checkpoint import CheckpointError
from engine.models.interp_unet import InterpolatorError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trainer step directory (<run>/checkpoints/step_N) or a DiT checkpoint")
    p.add_argument("--interpolator", help="trained interpolator directory")
    p.add_argument("--config", help="run config of a trainer checkpoint (default: <run>/config.yaml)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of a trainer-checkpoint export")
    p.add_argument("--out", required=True, help="deployment directory")
    console.add_verbose_flag(p)
    args = p.parse_args(argv)
    console.install(verbose=args.verbose)
    if not (args.checkpoint or args.interpolator):
        p.error("nothing to export: give --checkpoint and/or --interpolator")
    try:
        info = export_deploy(
            args.out,
            student=args.checkpoint,
            interpolator=args.interpolator,
            run_config=args.config,
            dtype=DTYPES[args.dtype],
        )
    except (CheckpointError, InterpolatorError, FileNotFoundError, ValueError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
