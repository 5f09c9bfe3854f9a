"""The toy world's recipes: its components from the run config, training and scoring the teacher.

Everything here is glue over engine/toy (data, codec, text, metrics) and the engine's own model and samplers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ConfigError, RunConfig
from engine.diffusion.flow import FlowSchedule
from engine.models.checkpoint import load_weights, read_model_config
from engine.models.wan import WanModel
from engine.toy.codec import ASSET, ToyCodec
from engine.toy.data import ToyTensors, toy_tensors
from engine.toy.evaluate import real_rows, reference_for
from engine.toy.metrics import compute_metrics, format_table
from engine.toy.procedural import ProceduralSource
from engine.toy.sampling import decode, teacher_latents
from engine.toy.teacher import TeacherTrainer
from engine.toy.text import ToyTextEncoder


@dataclass
class ToyParts:
    codec: ToyCodec
    text: ToyTextEncoder
    uncond: torch.Tensor  # (1, L, D) empty-prompt embedding
    schedule: FlowSchedule


def toy_parts(cfg: RunConfig) -> ToyParts:
    """Codec and text encoder of the toy world, checked against the run config before anything heavy runs."""
    if cfg.vae.kind != "toy" or cfg.text_encoder.kind != "toy":
        raise ConfigError("config key `vae.kind`: the toy world needs vae.kind=toy and text_encoder.kind=toy")
    codec = ToyCodec.load(cfg.vae.path or ASSET)
    if (codec.temporal_stride, codec.spatial_stride) != (cfg.vae.temporal_stride, cfg.vae.spatial_stride):
        raise ConfigError(
            f"config key `vae.spatial_stride`: the toy codec has strides (temporal {codec.temporal_stride}, spatial "
            f"{codec.spatial_stride}), the config says ({cfg.vae.temporal_stride}, {cfg.vae.spatial_stride})"
        )
    if codec.z_dim != cfg.model.in_dim:
        raise ConfigError(f"config key `model.in_dim`: {cfg.model.in_dim} != the toy codec's {codec.z_dim} channels")
    text = ToyTextEncoder(dim=cfg.model.text_dim, max_length=cfg.text_encoder.max_length)
    uncond, _ = text.encode([cfg.text_encoder.negative_prompt])
    d = cfg.diffusion
    return ToyParts(codec, text, uncond, FlowSchedule(d.num_train_timesteps, d.shift))


def latent_shape(cfg: RunConfig, tensors: ToyTensors) -> tuple[int, int, int, int]:
    return tuple(tensors.latents.shape[1:])


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
