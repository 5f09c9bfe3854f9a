"""Export the generator from its (ZeRO-3 partitioned) engine into the diffusers layout, streaming one parameter at a
time: every rank joins each gather, rank 0 writes shards of bounded size. A LoRA-trained generator (``model.lora``)
is exported merged (W + alpha / r B A per adapted layer, engine/models/adapters.py), and its adapters alone as LoRA
files in the layouts of engine/models/lora.py."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

from engine.config import ModelConfig
from engine.models.adapters import adapter_layers, merged_source
from engine.models.checkpoint import diffusers_config, official_to_diffusers, write_safetensors
from engine.models.lora import save_lora
from engine.train import dist


def _gatherer(module: torch.nn.Module):
    """(parameter names, name -> the full tensor on rank 0 / None elsewhere). Collective per call."""
    params = dict(module.named_parameters())

    def get(name: str) -> torch.Tensor | None:
        p = params[name]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().cpu().clone() if dist.is_main() else None

    return list(params), get


def export_diffusers(module: torch.nn.Module, model_cfg: ModelConfig, out_dir: Path, max_shard_bytes: int = 5 << 30):
    """Collective. Writes <out_dir>/diffusion_pytorch_model*.safetensors + config.json (WanTransformer3DModel)."""
    names, get = _gatherer(module)
    if model_cfg.lora.enabled:
        names, get = merged_source(names, get, model_cfg.lora.scale)
    stream = ((official_to_diffusers(n), get(n)) for n in names)
    if dist.is_main():
        write_safetensors(stream, out_dir, diffusers_config(model_cfg), max_shard_bytes)
    else:
        for _ in stream:  # same sequence of gathers as rank 0
            pass
    dist.barrier()


def export_adapters(
    module: torch.nn.Module, model_cfg: ModelConfig, path: Path, layout: str, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Collective. The generator's trained adapters as a LoRA file (``layout``: comfy or diffusers), no SVD."""
    names, get = _gatherer(module)
    layers = adapter_layers(names, get, model_cfg.lora.scale)
    if dist.is_main():
        save_lora(layers, path, layout, dtype)
    dist.barrier()
