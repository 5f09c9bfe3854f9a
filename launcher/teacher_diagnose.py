"""Is a toy teacher memorizing its training clips? Flow-matching loss and sample metrics, train vs held-out.

    python launcher/teacher_diagnose.py --weights engine/assets/toy_teacher [--n 100] [--out report.json]

Loss: the conditional flow-matching loss of the first ``n`` clips of the train split, of the val split and of fresh
procedural clips, each clip at the same nine noise levels (sigma 0.1 .. 0.9) and noise draws. Samples: the bar's
metrics (50 steps, CFG) on the first ``n`` train prompts, next to the held-out ones. A teacher that fits its train
clips much better than fresh ones is data-limited (more clips help); one that is as bad on its own train prompts as on
held-out ones is capacity- or optimization-limited.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from engine import console
from engine.config import load_config
from engine.toy.data import toy_tensors
from engine.toy.procedural import ProceduralSource
from engine.toy.recipes import load_teacher, toy_parts
from engine.toy.teacher_curve import EvalSet, eval_set, score

SIGMAS = tuple(i / 10 for i in range(1, 10))


@torch.no_grad()
def fm_loss(model, latents: torch.Tensor, context: torch.Tensor, schedule, seed: int = 0) -> float:
    """Mean velocity MSE over the clips at each of SIGMAS (noise of clip i, level j seeded by (seed, i, j))."""
    total = 0.0
    for j, s in enumerate(SIGMAS):
        g = torch.Generator().manual_seed(seed * 1000 + j)
        noise = torch.randn(latents.shape, generator=g)
        sigma = torch.full((latents.shape[0],), s)
        x_t = schedule.add_noise(latents, noise, sigma)
        v = torch.cat(
            [
                model(x_t[i : i + 50], schedule.timestep(sigma[i : i + 50]), context[i : i + 50])
                for i in range(0, len(x_t), 50)
            ]
        )
        total += (v.float() - schedule.velocity_target(latents, noise)).square().mean().item()
    return total / len(SIGMAS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--weights", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--no-samples", action="store_true", help="only the losses")
    p.add_argument("--out", default=None)
    console.add_verbose_flag(p)
    args = p.parse_args(argv)
    console.install(verbose=args.verbose)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [])
    parts = toy_parts(cfg)
    model = load_teacher(args.weights).eval()
    train = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
    val = toy_tensors(cfg.toy, parts.codec, parts.text, split="val")
    fresh = ProceduralSource(cfg.toy, parts.codec, parts.text, seed=1000).batch(0, args.n)  # a stream never trained on
    n = args.n
    report = {
        "weights": args.weights,
        "n": n,
        "fm_loss": {
            "train clips": fm_loss(model, train.latents[:n], train.context[:n], parts.schedule),
            "val clips": fm_loss(model, val.latents[:n], val.context[:n], parts.schedule),
            "fresh procedural clips": fm_loss(model, *fresh, parts.schedule),
        },
    }
    print(json.dumps(report, indent=1), flush=True)
    if not args.no_samples:
        held = eval_set(cfg, parts, n)
        own = EvalSet(
            train.context[:n], train.params[:n], held.latent_shape, held.reference, held.real, held.real_codec
        )
        report["samples"] = {
            "held-out prompts": score(model, held, cfg, parts),
            "train prompts": score(model, own, cfg, parts),
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
