"""Scoring toy-teacher checkpoints against issue 13's bar, and the quality-vs-CPU curve file.

The protocol is :func:`engine.toy.recipes.evaluate_teacher`'s: the first ``n`` (100) prompts of the world's val split,
the teacher's Euler sampler with CFG (``diffusion.teacher_steps``, ``diffusion.guidance_scale``), sampling seed 0,
metrics on decoded pixels against the reference calibrated on the train split. The real rows are the same ``n`` val
clips, as decoded from their files and after a codec round trip (the Frechet-distance yardstick).
"""

from __future__ import annotations

import csv
import fcntl
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.toy.captions import ClipParams
from engine.toy.data import toy_tensors
from engine.toy.evaluate import reference_for
from engine.toy.metrics import METRICS, Reference, compute_metrics
from engine.toy.recipes import ToyParts
from engine.toy.sampling import decode, teacher_latents
from engine.toy.videos import to_tensor
from engine.toy.world import ensure_dataset, load_clips

COLUMNS = ("run", "lever", "step", "cpu_minutes", "wall_minutes", "eval_steps", "n", *METRICS, "bar_passed")


@dataclass
class EvalSet:
    context: torch.Tensor  # (n, L, D)
    params: list[ClipParams]
    latent_shape: tuple[int, int, int, int]
    reference: Reference
    real: dict[str, float]  # the n val clips from their files
    real_codec: dict[str, float]  # the same clips after a codec round trip


def eval_set(cfg: RunConfig, parts: ToyParts, n: int = 100) -> EvalSet:
    val = toy_tensors(cfg.toy, parts.codec, parts.text, split="val")
    n = min(n, val.latents.shape[0])
    ref = reference_for(cfg.toy)
    videos, params, _ = load_clips(ensure_dataset(cfg.toy, progress=False), split="val", limit=n)
    with torch.no_grad():
        through = parts.codec.decode(parts.codec.encode(to_tensor(videos)))
    return EvalSet(
        context=val.context[:n],
        params=val.params[:n],
        latent_shape=tuple(val.latents.shape[1:]),
        reference=ref,
        real=compute_metrics(videos, params, ref),
        real_codec=compute_metrics(through, params, ref),
    )


def score(model, es: EvalSet, cfg: RunConfig, parts: ToyParts, steps: int | None = None) -> dict[str, float]:
    """Metrics of the model's CFG samples on the eval prompts (model in eval mode, no grad)."""
    d = cfg.diffusion
    was_training = model.training
    model.eval()
    latents = teacher_latents(
        model,
        es.context,
        parts.uncond,
        es.latent_shape,
        parts.schedule,
        steps=steps or d.teacher_steps,
        scale=d.guidance_scale,
        form=d.guidance_form,
    )
    model.train(was_training)
    return compute_metrics(decode(parts.codec, latents), es.params, es.reference)


# The bar of issue 13 (part 1): (metric, test, description).
BAR = (
    ("instance_preservation", lambda v, es: v >= 0.85, ">= 0.85"),
    ("direction_accuracy", lambda v, es: v >= 0.85, ">= 0.85"),
    ("shape_accuracy", lambda v, es: v >= 0.90, ">= 0.90"),
    ("colour_accuracy", lambda v, es: v >= 0.95, ">= 0.95"),
    ("travel", lambda v, es: abs(v / es.real["travel"] - 1) <= 0.15, "within 15% of real"),
    ("saturation_ratio", lambda v, es: abs(v - 1) <= 0.05, "1.00 +- 0.05"),
    ("frechet_distance", lambda v, es: v <= 3 * es.real_codec["frechet_distance"], "<= 3x real via codec"),
)


def bar_passed(row: dict[str, float], es: EvalSet) -> int:
    """How many of the bar's seven criteria the row meets."""
    return sum(bool(test(row[m], es)) for m, test, _ in BAR if not math.isnan(row[m]))


def append_row(path: str | Path, row: dict) -> None:
    """Append one row (header on a new file), under a lock: several runs write the same curve file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        if handle.tell() == 0:
            writer.writeheader()
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def real_row_values(es: EvalSet) -> dict[str, dict[str, float]]:
    return {"real (val)": es.real, "real via codec": es.real_codec}


class Stopwatch:
    """Process CPU seconds and wall seconds since construction."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.time()

    def elapsed(self) -> tuple[float, float]:
        return time.process_time() - self.cpu, time.time() - self.wall
