"""Checkpoint I/O for the Wan2.1 DiT: official Wan2.1 and diffusers layouts, single or sharded safetensors.

Our parameter names are the official keys, so the official layout loads directly and the diffusers layout goes
through one bidirectional rename table (docs/wan.md#dit-key-names). Reading is tensor by tensor (``safe_open``): a 14B
checkpoint never needs twice its size in RAM. Missing or unexpected keys are an error that lists them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import CheckpointError, ModelConfig, model_config_from_json
from engine.fsutil import atomic_write_text, fix_mode
from engine.safe_load import inside

Layout = Literal["official", "diffusers"]
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
COMFY_PREFIX = "model.diffusion_model."
FP8_MARKER = "scaled_fp8"  # ComfyUI's scaled-fp8 marker key (comfy/model_detection.py); its dtype is the fp8 format
SCALE_SUFFIX = ".scale_weight"  # per-layer float32 scale of a scaled-fp8 weight (comfy/ops.py scaled_fp8_ops)


# ---------------------------------------------------------------------------------------------------------------------
# Key mapping: one table, both directions. {i} is a block index, {p} weight/bias.
# ---------------------------------------------------------------------------------------------------------------------

_RENAMES = [
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("blocks.{i}.norm3.{p}", "blocks.{i}.norm2.{p}"),  # the affine cross-attention norm: names swapped in diffusers
    ("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}"),
    ("blocks.{i}.ffn.2.{p}", "blocks.{i}.ffn.net.2.{p}"),
    ("head.modulation", "scale_shift_table"),
    ("head.head.{p}", "proj_out.{p}"),
]
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for _a, _b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
        _RENAMES.append((f"blocks.{{i}}.{_ours}.{_a}.{{p}}", f"blocks.{{i}}.{_theirs}.{_b}.{{p}}"))
    for _n in ("norm_q", "norm_k"):
        _RENAMES.append((f"blocks.{{i}}.{_ours}.{_n}.weight", f"blocks.{{i}}.{_theirs}.{_n}.weight"))


_BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])\Z")


def is_block_linear(layer: str) -> bool:
    """Whether an official layer name (no .weight/.bias) is a linear layer of a transformer block: self- and
    cross-attention q, k, v, o and the two FFN linears (what LoRA and scaled fp8 target)."""
    return _BLOCK_LINEAR.match(layer) is not None


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + r"\Z")


_TO_DIFFUSERS = [(_compile(a), b) for a, b in _RENAMES]
_TO_OFFICIAL = [(_compile(b), a) for a, b in _RENAMES]


def _rename(key: str, table) -> str | None:
    for rx, template in table:
        m = rx.match(key)
        if m:
            return template.format(**m.groupdict())
    return None


def official_to_diffusers(key: str) -> str | None:
    """The diffusers name of an official key, or None if the key is not part of a T2V DiT."""
    return _rename(key, _TO_DIFFUSERS)


def diffusers_to_official(key: str) -> str | None:
    """The official name of a diffusers key, or None if the key is not part of a T2V DiT."""
    return _rename(key, _TO_OFFICIAL)


# ---------------------------------------------------------------------------------------------------------------------
# Finding and reading files
# ---------------------------------------------------------------------------------------------------------------------


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a dir with one file or a sharded index, or a pipeline root."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            try:  # shard names read from the file stay inside its directory
                return [inside(path.parent, name, str(path)) for name in sorted(set(index["weight_map"].values()))]
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a .safetensors file or a *.safetensors.index.json")
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "transformer").is_dir() and not any(path.glob("*.safetensors")):
        return weight_files(path / "transformer")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return weight_files(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file or *.safetensors.index.json found")
    return files


def weights_fingerprint(path: str | Path, sample_bytes: int = 4 << 20) -> str:
    """A cheap identity of a checkpoint's weights: per file its name, size, and the bytes of its first and last
    ``sample_bytes`` (the safetensors header names and places every tensor; the samples catch retrained values).
    Reads at most 2 x sample_bytes per file, so a 14B checkpoint costs a few hundred MB of reads, not 28 GB."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as f:
            digest.update(f.read(sample_bytes))
            if size > sample_bytes:
                f.seek(max(sample_bytes, size - sample_bytes))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _scaled_fp8(keys: list[str]) -> tuple[set[str], dict[str, str]]:
    """Of a scaled-fp8 file's keys: the keys to skip (marker, scales) and weight key -> its scale key."""
    if not any(_strip_prefix(k) == FP8_MARKER for k in keys):
        return set(), {}
    scales = {k[: -len(SCALE_SUFFIX)] + ".weight": k for k in keys if k.endswith(SCALE_SUFFIX)}
    return {k for k in keys if _strip_prefix(k) == FP8_MARKER} | set(scales.values()), scales


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs, one tensor in memory at a time. A scaled-fp8 weight (ComfyUI's convention, written by
    ``engine.models.single_file``) comes back dequantized in float32: fp8 value * its ``scale_weight``."""
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            skip, scales = _scaled_fp8(keys)
            for key in keys:
                if key in skip:
                    continue
                tensor = f.get_tensor(key)
                if key in scales:
                    tensor = tensor.to(torch.float32) * f.get_tensor(scales[key]).to(torch.float32)
                yield key, tensor


def tensor_getter(path: str | Path, layout: Layout) -> Callable[[str], torch.Tensor]:
    """Random access by official name (scaled fp8 dequantized), reading one tensor per call."""
    index = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            skip, scales = _scaled_fp8(keys)
            index.update({to_official_key(k, layout): (file, k, scales.get(k)) for k in keys if k not in skip})

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise CheckpointError(f"{path}: no tensor {name}")
        file, key, scale = index[name]
        with safe_open(str(file), framework="pt") as f:
            t = f.get_tensor(key)
            return t.to(torch.float32) * f.get_tensor(scale).to(torch.float32) if scale else t

    return get


def checkpoint_keys(path: str | Path) -> list[str]:
    keys = []
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            skip, _ = _scaled_fp8(list(f.keys()))
            keys.extend(k for k in f.keys() if k not in skip)  # noqa: SIM118
    return keys


def _strip_prefix(key: str) -> str:
    return key[len(COMFY_PREFIX) :] if key.startswith(COMFY_PREFIX) else key


def detect_layout(keys: list[str]) -> Layout:
    """official or diffusers, from the key names."""
    keys = [_strip_prefix(k) for k in keys]
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("text_embedding.", "time_embedding.")) or ".self_attn." in k for k in keys):
        return "official"
    raise CheckpointError(f"cannot tell the layout of a checkpoint with keys like {keys[:5]}: not a Wan2.1 DiT")


def to_official_key(key: str, layout: Layout) -> str | None:
    key = _strip_prefix(key)
    if layout == "official":
        return key if official_to_diffusers(key) is not None else None
    return diffusers_to_official(key)


# ---------------------------------------------------------------------------------------------------------------------
# Model configs in both layouts
# ---------------------------------------------------------------------------------------------------------------------


def diffusers_config(cfg: ModelConfig) -> dict:
    """config.json of the diffusers WanTransformer3DModel with this architecture."""
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.42.1",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


def official_config(cfg: ModelConfig) -> dict:
    """config.json of the official WanModel with this architecture."""
    return {
        "_class_name": "WanModel",
        "model_type": "t2v",
        "patch_size": list(cfg.patch_size),
        "text_len": 512,
        "in_dim": cfg.in_dim,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "text_dim": cfg.text_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": cfg.cross_attn_norm,
        "eps": cfg.eps,
    }


def read_model_config(path: str | Path, **overrides) -> ModelConfig:
    """The architecture stored next to a checkpoint (config.json in its directory)."""
    files = weight_files(path)
    candidates = [files[0].parent / "config.json", Path(path) / "config.json"]
    if Path(path).is_file() and len(files) == 1:  # a one-file export: its own metadata before a neighbour's config
        with safe_open(str(files[0]), framework="pt") as f:
            embedded = (f.metadata() or {}).get("config")
        if embedded:
            return model_config_from_json(json.loads(embedded), **overrides)
    for c in candidates:
        if c.is_file():
            return model_config_from_json(json.loads(c.read_text()), **overrides)
    raise CheckpointError(f"no config.json next to {path}; pass the architecture explicitly")


# ---------------------------------------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------------------------------------


def _report_mismatch(missing: set[str], unexpected: list[str], path) -> None:
    if not missing and not unexpected:
        return
    lines = [f"checkpoint {path} does not match the model:"]
    for label, keys in (("missing", sorted(missing)), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {label} keys ({len(keys)}): {keys[:20]}{' ...' if len(keys) > 20 else ''}")
    raise CheckpointError("\n".join(lines))


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str | Path, layout: Layout | None = None) -> Layout:
    """Copy a checkpoint into ``model`` tensor by tensor (cast to each parameter's dtype). Returns the layout read.

    A model built on the meta device is materialized on the CPU first. Missing/unexpected keys and shape
    mismatches raise CheckpointError listing them.
    """
    layout = layout or detect_layout(checkpoint_keys(path))
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
    params = dict(model.named_parameters())
    missing, unexpected = set(params), []
    for key, tensor in iter_tensors(path):
        name = to_official_key(key, layout)
        if name is None or name not in params:
            unexpected.append(key)
            continue
        target = params[name]
        if target.shape != tensor.shape:
            got, want = tuple(tensor.shape), tuple(target.shape)
            raise CheckpointError(f"{path}: {key} has shape {got}, the model expects {want}")
        target.copy_(tensor)
        missing.discard(name)
    _report_mismatch(missing, unexpected, path)
    return layout


# ---------------------------------------------------------------------------------------------------------------------
# Saving (diffusers layout by default; official for round trips)
# ---------------------------------------------------------------------------------------------------------------------


def _shard(named: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard, size = {}, 0
    for key, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor.contiguous()
        size += nbytes
    if shard:
        yield shard


def write_safetensors(
    named: Iterator[tuple[str, torch.Tensor]], out_dir: str | Path, config: dict, max_shard_bytes: int = 5 * 1024**3
) -> Path:
    """Write tensors as diffusion_pytorch_model[-0000k-of-0000n].safetensors (+ index when sharded) and config.json.

    Files are written under temporary names and renamed at the end, so an interrupted save leaves no loadable half.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_files, weight_map, total = [], {}, 0
    for k, shard in enumerate(_shard(named, max_shard_bytes)):
        tmp = out_dir / f".shard-{k:05d}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        fix_mode(tmp)  # safetensors writes 0600 whatever the umask
        tmp_files.append((tmp, list(shard)))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    n = len(tmp_files)
    if n == 1:
        tmp_files[0][0].replace(out_dir / WEIGHTS_NAME)
    else:
        for k, (tmp, keys) in enumerate(tmp_files):
            name = f"diffusion_pytorch_model-{k + 1:05d}-of-{n:05d}.safetensors"
            tmp.replace(out_dir / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out_dir / INDEX_NAME, json.dumps(index, indent=2))
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2))
    return out_dir


def save_weights(
    state: dict[str, torch.Tensor] | torch.nn.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    layout: Layout = "diffusers",
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Save a model (or an official-named state dict) for diffusers' ``from_pretrained`` or the official code."""
    if isinstance(state, torch.nn.Module):
        state = {k: v.detach() for k, v in state.named_parameters()}
    rename = official_to_diffusers if layout == "diffusers" else (lambda k: k)
    config = diffusers_config(cfg) if layout == "diffusers" else official_config(cfg)
    named = ((rename(k), v.cpu()) for k, v in state.items())
    return write_safetensors(named, out_dir, config, max_shard_bytes)


def convert_checkpoint(
    src: str | Path, dst: str | Path, to: Layout, src_layout: Layout | None = None, max_shard_bytes: int = 5 * 1024**3
) -> tuple[Layout, int]:
    """Rewrite a checkpoint in another layout, streaming tensors (dtype kept). Returns (source layout, count)."""
    keys = checkpoint_keys(src)
    src_layout = src_layout or detect_layout(keys)
    cfg = read_model_config(src)
    rename_out = official_to_diffusers if to == "diffusers" else (lambda k: k)
    unknown = [k for k in keys if to_official_key(k, src_layout) is None]
    if unknown:
        raise CheckpointError(f"{src}: keys that are not part of a Wan2.1 T2V DiT ({len(unknown)}): {unknown[:20]}")
    named = ((rename_out(to_official_key(k, src_layout)), t) for k, t in iter_tensors(src))
    config = diffusers_config(cfg) if to == "diffusers" else official_config(cfg)
    write_safetensors(named, dst, config, max_shard_bytes)
    return src_layout, len(keys)
