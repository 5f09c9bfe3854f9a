"""A distillation job end to end: process group, config checks, roles, the world (data + sampling), the loop, export.

The world (engine/worlds: toy or Wan) gives the data, the unconditional context and the sample prompts, so the job
never branches on where its data comes from; tests pass a factory of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from engine.config import ConfigError, RunConfig, check_sequence_parallel, resolve_dtype, save_config
from engine.deploy import export_interpolator, interpolator_dir
from engine.distill.export import export_adapters, export_diffusers
from engine.distill.method import DMDMethod
from engine.distill.roles import build_roles, resolve_model_config
from engine.distill.samples import world_sampler
from engine.models.checkpoint import weights_fingerprint
from engine.models.interp_unet import InterpolatorError, check_channels, read_interpolator_config
from engine.models.lora import LAYOUTS as LORA_LAYOUTS
from engine.train import checkpoint as ckpt
from engine.train import dist, runlock
from engine.train.accum import MicroBatches
from engine.train.guards import NonFiniteWeightsError, weights_finite
from engine.train.loop import Loop, LoopSettings
from engine.train.optim import check_offload
from engine.worlds import World, build_world, kind_of

WorldFactory = Callable[[RunConfig, torch.device], World]


def training_world(cfg: RunConfig, device: torch.device) -> World:
    return build_world(cfg, device, training=True)


def check_world_size(cfg: RunConfig, world_size: int) -> None:
    """The layout must close: the sequence-parallel degree divides the world, and global = micro x accumulation x
    data-parallel ranks (world size / sequence-parallel degree: a group's ranks share their samples)."""
    check_sequence_parallel(cfg, world_size)
    o, sp = cfg.optim, cfg.parallel.sequence_parallel
    data = world_size // sp
    per_step = o.micro_batch_size * o.grad_accum_steps * data
    if o.global_batch_size is not None and o.global_batch_size != per_step:
        ranks = f"world size {world_size}"
        if sp > 1:
            ranks = f"{data} data-parallel ranks ({ranks} / parallel.sequence_parallel {sp})"
        raise ConfigError(
            f"config key `optim.global_batch_size`: {o.global_batch_size} != micro_batch_size {o.micro_batch_size}"
            f" x grad_accum_steps {o.grad_accum_steps} x {ranks} = {per_step}"
        )


def configured_interpolator(cfg: RunConfig, in_dim: int) -> Path | None:
    """``interp.checkpoint``, checked (present, same latent channels as the student) before anything is built: the
    export puts it next to the student, so a deployment directory serves the VIF sampler as it is."""
    if not cfg.interp.checkpoint:
        return None
    path = interpolator_dir(cfg.interp.checkpoint)
    try:
        check_channels(read_interpolator_config(path)["in_channels"], in_dim)
    except InterpolatorError as exc:
        raise ConfigError(f"config key `interp.checkpoint`: {exc}") from exc
    return path


def export_dir(cfg: RunConfig) -> Path:
    return Path(cfg.logging.run_dir) / "export" / "transformer"


def raw_export_dir(cfg: RunConfig) -> Path:
    """Where the trained (not averaged) generator goes when the EMA is the exported student."""
    return Path(cfg.logging.run_dir) / "export" / "transformer_raw"


def lora_export_files(cfg: RunConfig) -> dict[str, Path]:
    """layout -> the LoRA file a LoRA-trained run exports its generator's adapters to (none for full weights)."""
    if not cfg.model.lora.enabled:
        return {}
    return {layout: Path(cfg.logging.run_dir) / "export" / f"lora_{layout}.safetensors" for layout in LORA_LAYOUTS}


def _exported(cfg: RunConfig) -> bool:
    dirs = [export_dir(cfg)] + ([raw_export_dir(cfg)] if cfg.method.ema.enabled else [])
    files = [d / "config.json" for d in dirs] + list(lora_export_files(cfg).values())
    return all(f.is_file() for f in files)


def lora_spec(cfg: RunConfig) -> dict | None:
    """What a checkpoint records of ``model.lora`` (None: full weights); a resume must match it."""
    lora = cfg.model.lora
    return {"rank": lora.rank, "alpha": lora.rank * lora.scale, "targets": list(lora.targets)} if lora.enabled else None


def finished_summary(cfg: RunConfig) -> dict | None:
    """The summary of a job that already reached ``train.max_steps`` and has its export (when asked for), read from
    its newest checkpoint; None when there is training (or an export) left to do."""
    done = ckpt.finished(Path(cfg.logging.run_dir) / "checkpoints", cfg.checkpoint.resume, cfg.train.max_steps)
    if done is None or (cfg.checkpoint.export and not _exported(cfg)):
        return None
    step, rank = int(done["step"]), int(os.environ.get("RANK", "0"))
    return {"step": step, "start": step, "skipped": dict(done["skipped"]), "rank": rank, "finished": True}


def run_distillation(cfg: RunConfig, make_world: WorldFactory = training_world, on_step=None) -> dict:
    """Run (or resume) a distillation job. Returns the loop's summary on every rank; a finished job returns its
    summary without building anything."""
    kind_of(cfg)  # a pairing of codec and text encoder that is no world fails before anything starts
    check_offload(cfg)  # offload without ZeRO or without DeepSpeed's CPU Adam op: refused before anything is built
    model_cfg = resolve_model_config(cfg)  # fails on a bad checkpoint path or architecture before anything is built
    interp = configured_interpolator(cfg, model_cfg.in_dim)
    teacher_id = weights_fingerprint(cfg.model.checkpoint) if cfg.model.checkpoint else None
    ckpts = Path(cfg.logging.run_dir) / "checkpoints"
    ckpt.check_teacher(ckpts, cfg.checkpoint.resume, teacher_id, cfg.model.checkpoint)
    ckpt.check_sequence_degree(ckpts, cfg.checkpoint.resume, cfg.parallel.sequence_parallel)
    ckpt.check_meta(
        ckpts, cfg.checkpoint.resume, "lora", lora_spec(cfg), "model.lora"
    )  # adapters and full weights (or adapters of another shape) do not resume into each other
    if (done := finished_summary(cfg)) is not None:
        return done
    dist.init()
    check_world_size(cfg, dist.world_size())
    dist.init_sequence_parallel(cfg.parallel.sequence_parallel)  # collective: the groups, before any data or model
    with runlock.hold(cfg.logging.run_dir):  # one job per run directory; refused before anything is written
        return _run(cfg, make_world, on_step, model_cfg, interp, teacher_id)


def _run(cfg: RunConfig, make_world: WorldFactory, on_step, model_cfg, interp: Path | None, teacher_id) -> dict:
    device = dist.device()
    if dist.is_main():
        save_config(cfg, Path(cfg.logging.run_dir) / "config.yaml")
    world = make_world(cfg, device)  # data problems surface here, still before any model is built
    roles = build_roles(cfg, model_cfg, resolve_dtype(cfg))
    method = DMDMethod(cfg, roles, world.unconditional(), world.latent_shape, device)
    gen, export = roles.generator.module, export_dir(cfg)
    write = world_sampler(cfg, world, device, roles.teacher, teacher_id)
    averaged = method.ema.swapped_in if method.ema is not None else nullcontext  # samples and export use the EMA

    def sample(step: int) -> dict | None:
        with averaged():
            return write(gen, step)

    def exporter() -> None:  # collective: every rank takes part in gathering the generator
        with averaged():
            if method.ema is not None and not weights_finite([gen]):
                raise NonFiniteWeightsError(f"non-finite generator EMA weights: export to {export} refused")
            export_diffusers(gen, model_cfg, export)
            for layout, path in lora_export_files(cfg).items():  # the adapters themselves, as trained (no SVD)
                export_adapters(gen, model_cfg, path, layout)
        if method.ema is not None:
            export_diffusers(gen, model_cfg, raw_export_dir(cfg))
        if interp is not None and dist.is_main():
            export_interpolator(interp, export.parent)
        dist.barrier()

    source = world.source if cfg.optim.grad_accum_steps == 1 else MicroBatches(world.source, cfg.optim.grad_accum_steps)
    loop = Loop(
        LoopSettings.of(cfg), method, source, cfg=cfg, on_step=on_step,
        sampler=sample if write else None, sample_every=cfg.logging.sample_every,
        exporter=exporter if cfg.checkpoint.export else None, export_done=lambda: _exported(cfg),
        meta={"teacher": teacher_id, "sequence_parallel": cfg.parallel.sequence_parallel, "lora": lora_spec(cfg)},
    )  # fmt: skip
    return loop.run()
