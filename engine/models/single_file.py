"""One-file export of the DiT in the official Wan2.1 key layout, the file ComfyUI's diffusion-model loader takes.

    <file>.safetensors   every tensor under its official name (no prefix), in bf16, fp16 or fp32
                         optional scaled fp8: the transformer blocks' linear weights in float8_e4m3fn, each with a
                         float32 scalar ``<layer>.scale_weight`` (dequantized weight = fp8 value * scale), and an
                         empty ``scaled_fp8`` tensor whose dtype names the fp8 format (docs/deploy.md#scaled-fp8)

The safetensors metadata carries the architecture (key ``config``: the diffusers config.json, which keeps every
field; the official one has no RoPE length) so our own tools read the
architecture back from the file alone (ComfyUI ignores it and infers the architecture from the shapes). The reader
side (dequantizing scaled fp8 on the fly) lives in ``engine.models.checkpoint.iter_tensors``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.config import CheckpointError, ModelConfig
from engine.fsutil import fix_mode
from engine.models.checkpoint import FP8_MARKER, SCALE_SUFFIX, diffusers_config, is_block_linear

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SINGLE_FILE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fp8_target(name: str) -> bool:
    """Weights stored in fp8: the linear weights of the transformer blocks (attention q/k/v/o, FFN). The patch
    embedding, the text/time embeddings, the head, norms, modulations and biases keep the file's dtype."""
    return name.endswith(".weight") and is_block_linear(name[: -len(".weight")])


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled e4m3: scale = max|w| / 448 (float32 scalar), q = fp8(w / scale). An all-zero tensor gets
    scale 1."""
    w = weight.detach().to(torch.float32)
    amax = w.abs().max()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones((), dtype=torch.float32))
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(())


def single_file_state(
    named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype = torch.bfloat16, fp8: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of the one-file export from official-named (name, tensor) pairs."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named:
        if fp8 and fp8_target(name):
            q, scale = quantize_fp8(tensor)
            out[name] = q
            out[name[: -len(".weight")] + SCALE_SUFFIX] = scale
        else:
            out[name] = tensor.detach().to(dtype).contiguous()
    if fp8:
        out[FP8_MARKER] = torch.empty(0, dtype=FP8)
    return out


def save_single_file(
    named: Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
) -> Path:
    """Write the one-file export (official keys, architecture in the metadata) atomically: a temporary name renamed
    at the end. Holds the whole output in memory (28 GB for 14B in bf16, about half with fp8)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"--single-file: {path} must end in .safetensors")
    if dtype not in SINGLE_FILE_DTYPES.values():
        raise CheckpointError(f"single-file dtype {dtype} is not one of fp32, bf16, fp16")
    state = single_file_state(named, dtype, fp8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {"format": "pt", "config": json.dumps(diffusers_config(cfg))}
    save_file(state, str(tmp), metadata=metadata)
    fix_mode(tmp)
    tmp.replace(path)
    return path
