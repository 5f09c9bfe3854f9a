"""LoRA extraction from a fully distilled student, LoRA files in the two layouts users load, and merging one back.

Extraction: for every linear layer of the transformer blocks (self- and cross-attention q/k/v/o, the two FFN
linears) the weight difference dW = W_student - W_teacher is factored by SVD and cut at ``rank``:
dW ~ B A with B = U_r sqrt(S_r) (out, r) and A = sqrt(S_r) V_r^T (r, in). The report gives, per layer, the relative
reconstruction error ||dW - B A||_F / ||dW||_F and the share of dW's energy kept. The block linears' bias changes
travel exactly (``diff_b``); every other tensor that differs from the teacher (norms, modulations, embeddings, head)
is listed in the report as not carried by the LoRA.

Layouts (docs/deploy.md#lora):

- ``comfy``: ``diffusion_model.<official layer>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha`` (= rank:
  scale 1) and ``.diff_b`` (the bias change). ComfyUI's LoRA loader maps ``diffusion_model.<key>`` to the model key
  ``diffusion_model.<key>.weight`` and reads lora_up/lora_down/alpha/diff_b (comfy/lora.py); diffusers'
  ``WanLoraLoaderMixin.lora_state_dict`` converts this layout too (``_convert_non_diffusers_wan_lora_to_diffusers``).
- ``diffusers``: peft's names on the diffusers modules, ``transformer.<diffusers layer>.lora_A.weight``,
  ``.lora_B.weight`` and ``.lora_B.bias``, what ``WanPipeline.load_lora_weights`` reads as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import CheckpointError
from engine.fsutil import fix_mode
from engine.models.checkpoint import diffusers_to_official, is_block_linear, official_to_diffusers

LAYOUTS = ("comfy", "diffusers")
COMFY = "diffusion_model."
DIFFUSERS = "transformer."


@dataclass
class LoraLayer:
    """One layer's adapter: dW ~ scale * up @ down; ``bias`` is the bias change (or None)."""

    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (out, r)
    scale: float = 1.0
    bias: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class Extraction:
    layers: dict[str, LoraLayer] = field(default_factory=dict)  # official layer name (no .weight) -> adapter
    report: dict = field(default_factory=dict)


def _factor(delta: torch.Tensor, rank: int, key: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    out_dim, in_dim = delta.shape
    if rank > min(out_dim, in_dim):
        raise CheckpointError(
            f"--rank {rank}: layer {key} is {out_dim} x {in_dim}; the rank must be at most {min(out_dim, in_dim)}"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = delta.to(device, torch.float64 if device == "cpu" else torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    norm = torch.linalg.matrix_norm(d).item()
    err = torch.linalg.matrix_norm(d - up @ down).item()
    energy = (s[:rank].square().sum() / s.square().sum()).item() if norm > 0 else 1.0
    stats = {"shape": [out_dim, in_dim], "delta_norm": norm, "rel_error": err / norm if norm > 0 else 0.0,
             "energy_kept": energy}  # fmt: skip
    return down.float().cpu(), up.float().cpu(), stats


def extract_lora(
    student: Iterable[tuple[str, torch.Tensor]], teacher: Callable[[str], torch.Tensor], rank: int
) -> Extraction:
    """A rank-``rank`` LoRA of ``student`` (official-named pairs) over ``teacher`` (name -> tensor). Both have been
    checked against one architecture; a name or shape that still differs is a CheckpointError naming the key."""
    if rank < 1:
        raise CheckpointError(f"--rank must be >= 1, got {rank}")
    out = Extraction()
    layers, others, biases = {}, {}, {}
    for name, w in student:
        base = teacher(name)
        if tuple(base.shape) != tuple(w.shape):
            raise CheckpointError(f"{name}: the student has shape {tuple(w.shape)}, the teacher {tuple(base.shape)}")
        delta = w.float() - base.float()
        layer, kind = name.rsplit(".", 1)
        if is_block_linear(layer) and kind == "weight":
            down, up, stats = _factor(delta, rank, name)
            out.layers[layer] = LoraLayer(down, up)
            layers[layer] = stats
        elif is_block_linear(layer) and kind == "bias":
            biases[layer] = delta
        elif delta.abs().max() > 0:
            others[name] = (delta.norm() / base.float().norm().clamp_min(1e-30)).item()
    for layer, b in biases.items():
        if layer in out.layers and b.abs().max() > 0:
            out.layers[layer].bias = b
    errors = [s["rel_error"] for s in layers.values()]
    out.report = {
        "rank": rank,
        "layers": layers,
        "mean_rel_error": sum(errors) / max(len(errors), 1),
        "max_rel_error": max(errors, default=0.0),
        "bias_changes": sorted(k for k, v in out.layers.items() if v.bias is not None),
        "not_in_lora": others,  # name -> ||student - teacher|| / ||teacher||
    }
    return out


def lora_state(layers: dict[str, LoraLayer], layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in ``layout`` (comfy or diffusers), scale folded in as alpha = rank (comfy) or
    into up (diffusers, whose loader assumes scale 1 without metadata)."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"--lora-format {layout!r}: expected one of {LAYOUTS}")
    state = {}
    for layer, a in layers.items():
        rank = a.down.shape[0]
        if layout == "comfy":
            p = COMFY + layer
            state[f"{p}.lora_down.weight"] = a.down.to(dtype).contiguous()
            state[f"{p}.lora_up.weight"] = (a.up * a.scale).to(dtype).contiguous()
            state[f"{p}.alpha"] = torch.tensor(float(rank))
            if a.bias is not None:
                state[f"{p}.diff_b"] = a.bias.to(dtype).contiguous()
        else:
            p = DIFFUSERS + official_to_diffusers(layer + ".weight")[: -len(".weight")]
            state[f"{p}.lora_A.weight"] = a.down.to(dtype).contiguous()
            state[f"{p}.lora_B.weight"] = (a.up * a.scale).to(dtype).contiguous()
            if a.bias is not None:
                state[f"{p}.lora_B.bias"] = a.bias.to(dtype).contiguous()
    return state


def save_lora(
    layers: dict[str, LoraLayer], path: str | Path, layout: str = "comfy", dtype: torch.dtype = torch.bfloat16,
    report: dict | None = None,
) -> Path:  # fmt: skip
    """Write the LoRA (atomically) and, with ``report``, ``<path>.report.json`` beside it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"--lora: {path} must end in .safetensors")
    state = lora_state(layers, layout, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "lora_layout": layout})
    fix_mode(tmp)
    tmp.replace(path)
    if report is not None:
        path.with_suffix(".report.json").write_text(json.dumps(report, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Reading a LoRA file back and merging it into a model
# ---------------------------------------------------------------------------------------------------------------------

_COMFY_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "diff_b": "bias"}
_DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "bias"}


def _split(key: str) -> tuple[str, str] | None:
    """(official layer, part) of a LoRA key in either layout, or None when the key is neither."""
    for prefix, parts, to_official in (
        (COMFY, _COMFY_PARTS, lambda layer: layer),
        (DIFFUSERS, _DIFFUSERS_PARTS, lambda layer: (diffusers_to_official(layer + ".weight") or "")[:-7] or None),
    ):
        if not key.startswith(prefix):
            continue
        for suffix, part in parts.items():
            if key.endswith("." + suffix):
                layer = to_official(key[len(prefix) : -len(suffix) - 1])
                return (layer, part) if layer else None
    return None


def read_lora(path: str | Path) -> dict[str, LoraLayer]:
    """A LoRA file in either layout as official layer -> adapter. Keys of any other form are an error naming them."""
    raw: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            split = _split(key)
            if split is None:
                raise CheckpointError(
                    f"{path}: LoRA key {key} is not a Wan2.1 DiT LoRA key (expected diffusion_model.<layer>."
                    "lora_down/lora_up/alpha/diff_b or transformer.<layer>.lora_A/lora_B)"
                )
            raw.setdefault(split[0], {})[split[1]] = f.get_tensor(key)
    layers = {}
    for layer, parts in raw.items():
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"{path}: LoRA layer {layer} has {sorted(parts)}, expected both down and up")
        rank = parts["down"].shape[0]
        scale = parts["alpha"].item() / rank if "alpha" in parts else 1.0
        layers[layer] = LoraLayer(parts["down"], parts["up"], scale, parts.get("bias"))
    return layers


def merge_lora(
    named: Iterable[tuple[str, torch.Tensor]], layers: dict[str, LoraLayer], where: str | Path = "LoRA"
) -> Iterator[tuple[str, torch.Tensor]]:
    """The (official name, tensor) pairs of a model with the LoRA merged: W + scale up @ down, b + diff_b (in the
    weight's dtype). A LoRA layer the model lacks or whose shapes do not fit is an error naming the key."""
    seen = set()
    for name, w in named:
        layer = name.rsplit(".", 1)[0]
        a = layers.get(layer)
        if a is None:
            yield name, w
            continue
        if name.endswith(".weight"):
            if w.ndim != 2 or a.up.shape[0] != w.shape[0] or a.down.shape[1] != w.shape[1]:
                raise CheckpointError(
                    f"{where}: LoRA layer {layer} has up {tuple(a.up.shape)} and down {tuple(a.down.shape)}; the "
                    f"model's {name} is {tuple(w.shape)}, expected up ({w.shape[0]}, r) and down (r, "
                    f"{w.shape[1] if w.ndim == 2 else '?'}): a LoRA of another architecture"
                )
            seen.add(layer)
            yield name, (w.float() + a.delta()).to(w.dtype)
        elif name.endswith(".bias") and a.bias is not None:
            if a.bias.shape != w.shape:
                raise CheckpointError(
                    f"{where}: LoRA bias of {layer} has shape {tuple(a.bias.shape)}, the model's {name} "
                    f"{tuple(w.shape)}: a LoRA of another architecture"
                )
            yield name, (w.float() + a.bias.float()).to(w.dtype)
        else:
            yield name, w
    missing = sorted(set(layers) - seen)
    if missing:
        raise CheckpointError(
            f"{where}: LoRA layers the model does not have ({len(missing)}): {missing[:5]} (a LoRA of another "
            "architecture, e.g. more blocks)"
        )
