"""Export the generator from its (ZeRO-3 partitioned) engine into the diffusers layout, streaming one parameter at a
time: every rank joins each gather, rank 0 writes shards of bounded size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch

from engine.config import ModelConfig
from engine.models.checkpoint import diffusers_config, official_to_diffusers, write_safetensors
from engine.train import dist


def _gathered(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            full = p.detach().cpu().clone() if dist.is_main() else None
        yield official_to_diffusers(name), full


def export_diffusers(module: torch.nn.Module, model_cfg: ModelConfig, out_dir: Path, max_shard_bytes: int = 5 << 30):
    """Collective. Writes <out_dir>/diffusion_pytorch_model*.safetensors + config.json (WanTransformer3DModel)."""
    stream = _gathered(module)
    if dist.is_main():
        write_safetensors(stream, out_dir, diffusers_config(model_cfg), max_shard_bytes)
    else:
        for _ in stream:  # same sequence of gathers as rank 0
            pass
    dist.barrier()
