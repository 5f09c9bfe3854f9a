"""The three roles of DMD2 on DeepSpeed: a frozen teacher, the generator and the critic, all one WanModel class,
all initialized from the teacher checkpoint, each its own DeepSpeed engine (ZeRO-3 partitions every one of them).

Weights stream from safetensors one tensor at a time; under ZeRO-3 each tensor is written into the partitioned
parameters of all three models inside one ``GatheredParameters`` (rank 0 writes, DeepSpeed re-partitions).

With ``model.lora`` the generator and the critic get LoRA adapters on their (loaded, partitioned) teacher weights
before ``deepspeed.initialize`` (engine/models/adapters.py): their base weights are frozen, only the adapters are
trained, and each optimizer holds the adapters alone (so do ZeRO's fp32 master copies and Adam moments).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import deepspeed
import torch
from deepspeed.utils import set_z3_leaf_modules
from safetensors import safe_open

from engine.config import ARCH_FIELDS, ConfigError, ModelConfig, RunConfig, deepspeed_config
from engine.models.adapters import add_adapters
from engine.models.checkpoint import (
    CheckpointError,
    checkpoint_keys,
    detect_layout,
    read_model_config,
    to_official_key,
    weight_files,
)
from engine.models.sequence_parallel import SequenceParallel
from engine.models.wan import WanBlock, WanModel
from engine.train import dist
from engine.train.optim import adamw
from engine.train.warmup import linear_warmup
from engine.train.zero_trace import keep_grad_trace

RUNTIME_FIELDS = ("attention_backend", "gradient_checkpointing", "fused_kernels", "rope_max_seq_len", "lora", "compile")


def _arch(cfg: ModelConfig) -> dict:
    return {f: tuple(getattr(cfg, f)) if f == "patch_size" else getattr(cfg, f) for f in ARCH_FIELDS}


def resolve_model_config(cfg: RunConfig) -> ModelConfig:
    """The architecture read from the teacher checkpoint, checked against the run config, with runtime settings
    (attention backend, checkpointing, kernels) from the run config. Raises ConfigError before anything is built."""
    path = cfg.model.checkpoint
    if path is None:
        raise ConfigError("config key `model.checkpoint`: the teacher weights path is required for distillation")
    try:
        ckpt = read_model_config(path)
    except CheckpointError as exc:
        raise ConfigError(f"config key `model.checkpoint`: {exc}") from exc
    want, have = _arch(cfg.model), _arch(ckpt)
    diff = {k: (want[k], have[k]) for k in ARCH_FIELDS if want[k] != have[k]}
    if diff:
        detail = ", ".join(f"model.{k}: config {a} vs checkpoint {b}" for k, (a, b) in diff.items())
        raise ConfigError(f"config key `model`: the run config's architecture differs from {path}: {detail}")
    return dataclasses.replace(ckpt, **{f: getattr(cfg.model, f) for f in RUNTIME_FIELDS}, preset=cfg.model.preset)


@dataclass
class Roles:
    teacher: deepspeed.DeepSpeedEngine
    generator: deepspeed.DeepSpeedEngine
    critic: deepspeed.DeepSpeedEngine
    model_cfg: ModelConfig


def _zero3(ds_cfg: dict) -> bool:
    return ds_cfg["zero_optimization"]["stage"] == 3


def _construct(model_cfg: ModelConfig, ds_cfg: dict, dtype: torch.dtype) -> WanModel:
    # dtype from the DeepSpeed config, not zero.Init(dtype=...): fp32 turns bf16 on CPU (docs/architecture.md#deepspeed)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=_zero3(ds_cfg)):
        model = WanModel(model_cfg)
    # parallel.sequence_parallel: every role splits its tokens over the rank's group (None: whole sequences)
    model.set_sequence_parallel(SequenceParallel.of_layout(dist.sequence_layout()))
    if not _zero3(ds_cfg):
        return model.to(dtype)
    for module, param in model.external_parameters():  # gathered with the module that reads them, and prefetched
        deepspeed.zero.register_external_parameter(module, param)
    if model_cfg.compile:  # a compiled block's parameters are gathered before it runs, none inside its graph
        set_z3_leaf_modules(model, [WanBlock])
    return model


@torch.no_grad()
def load_into(models: list[torch.nn.Module], path: str) -> None:
    """Copy the checkpoint at ``path`` into every model (partitioned or not), one tensor at a time."""
    layout = detect_layout(checkpoint_keys(path))
    params = [dict(m.named_parameters()) for m in models]
    missing, unexpected = set(params[0]), []
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = to_official_key(key, layout)
                if name not in params[0]:
                    unexpected.append(key)
                    continue
                targets = [p[name] for p in params]
                shape, want = (
                    tuple(f.get_slice(key).get_shape()),
                    tuple(getattr(targets[0], "ds_shape", targets[0].shape)),
                )
                if shape != want:  # checked on every rank before any collective, so no rank is left waiting
                    raise CheckpointError(f"{path}: {key} has shape {shape}, the model expects {want}")
                with deepspeed.zero.GatheredParameters(targets, modifier_rank=0):
                    if dist.is_main():
                        tensor = f.get_tensor(key)
                        for t in targets:
                            t.copy_(tensor)
                missing.discard(name)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)[:20]}, unexpected keys {unexpected[:20]}")


def _adamw(model: torch.nn.Module, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw(params, cfg.optim, lr, offload=cfg.deepspeed.offload_optimizer)  # offload: DeepSpeed's CPU Adam


def build_roles(cfg: RunConfig, model_cfg: ModelConfig, dtype: torch.dtype) -> Roles:
    """Teacher (frozen, no optimizer), generator and critic (AdamW each) as DeepSpeed engines. ZeRO-3 partitions each
    over every rank of the world, sequence parallelism or not (DeepSpeed's "sequence data parallel" group: a
    sequence-parallel group's ranks hold different gradient shares, which ZeRO must reduce together); DeepSpeed is
    not told of the sequence-parallel groups (engine/models/sequence_parallel.py says why the gradients are right)."""
    ds_cfg = deepspeed_config(cfg, dist.world_size())
    teacher_cfg = dataclasses.replace(model_cfg, gradient_checkpointing=False)  # never back-propagated
    teacher = _construct(teacher_cfg, ds_cfg, dtype)
    generator = _construct(model_cfg, ds_cfg, dtype)
    critic = _construct(model_cfg, ds_cfg, dtype)
    load_into([teacher, generator, critic], cfg.model.checkpoint)
    teacher.requires_grad_(False).eval()
    if model_cfg.lora.enabled:  # adapters on the loaded weights, before deepspeed.initialize partitions them
        for i, model in enumerate((generator, critic)):
            add_adapters(model, model_cfg, seed=cfg.train.seed * 1009 + 1 + i, dtype=dtype)
    warmup = linear_warmup(cfg.optim.warmup_steps)  # each role's own updates; None: constant rate
    gen_engine, *_ = deepspeed.initialize(
        model=generator, optimizer=_adamw(generator, cfg, cfg.optim.lr), config=ds_cfg, lr_scheduler=warmup
    )
    critic_engine, *_ = deepspeed.initialize(
        model=critic, optimizer=_adamw(critic, cfg, cfg.optim.critic_lr), config=ds_cfg, lr_scheduler=warmup
    )
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=ds_cfg)
    for engine in (gen_engine, critic_engine):  # run with and without gradient: keep ZeRO-3's prefetch trace valid
        keep_grad_trace(engine)
    return Roles(teacher_engine, gen_engine, critic_engine, model_cfg)
