"""The toy world's recipes: training and scoring the teacher.

Everything here is glue over engine/toy (data, codec, text, metrics) and the engine's own model and samplers.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.config import RunConfig
from engine.models.checkpoint import load_weights, read_model_config
from engine.models.wan import WanModel
from engine.toy.data import toy_tensors
from engine.toy.evaluate import real_rows, reference_for
from engine.toy.metrics import compute_metrics, format_table
from engine.toy.parts import ToyParts, toy_parts
from engine.toy.procedural import ProceduralSource
from engine.toy.sampling import decode, teacher_latents
from engine.toy.teacher import TeacherTrainer


def teacher_data(cfg: RunConfig, parts: ToyParts):
    """The teacher's training data per ``toy_teacher.data``: the fixed train split's (latents, context), or a
    :class:`ProceduralSource` seeded by ``toy_teacher.seed``."""
    if cfg.toy_teacher.data == "procedural":
        return ProceduralSource(cfg.toy, parts.codec, parts.text, seed=cfg.toy_teacher.seed)
    data = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
    return data.latents, data.context


def train_teacher(cfg: RunConfig) -> dict:
    """Train (or continue training) the toy teacher and export its EMA weights."""
    parts = toy_parts(cfg)
    t0 = time.time()
    data = teacher_data(cfg, parts)
    prep = time.time() - t0
    trainer = TeacherTrainer(cfg.toy_teacher, cfg.model, parts.schedule, data, parts.uncond)
    summary = trainer.run()
    summary["export"] = str(trainer.export())
    summary["data_seconds"] = prep
    return summary


def load_teacher(path: str | Path) -> WanModel:
    model = WanModel(read_model_config(path, gradient_checkpointing=False)).eval()
    load_weights(model, path)
    return model


def evaluate_teacher(cfg: RunConfig, n: int, steps: int | None = None) -> str:
    """Metrics table: real val clips vs the teacher's 50-step CFG samples on the same prompts."""
    parts = toy_parts(cfg)
    val = toy_tensors(cfg.toy, parts.codec, parts.text, split="val")
    n = min(n, val.latents.shape[0])
    model = load_teacher(cfg.model.checkpoint or cfg.toy_teacher.export_dir)
    d = cfg.diffusion
    t0 = time.time()
    latents = teacher_latents(
        model,
        val.context[:n],
        parts.uncond,
        tuple(val.latents.shape[1:]),
        parts.schedule,
        steps=steps or d.teacher_steps,
        scale=d.guidance_scale,
        form=d.guidance_form,
    )
    seconds = time.time() - t0
    row = compute_metrics(decode(parts.codec, latents), val.params[:n], reference_for(cfg.toy))
    real = real_rows(cfg.toy, parts.codec)
    table = format_table({**real, "teacher": row})
    return f"{table}\nteacher sampling: {seconds:.1f} s for {n} clips ({steps or d.teacher_steps} steps, CFG)"
