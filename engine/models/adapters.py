"""Trainable LoRA adapters on the DiT's block linears (``model.lora``, docs/method.md#lora-distillation), via peft.

peft's ``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` with its ``lora.Linear``, which keeps the
layer as ``base_layer`` and adds ``lora_A.default`` (r x in) and ``lora_B.default`` (out x r):
``y = base(x) + (alpha / r) B (A x)``. Only A and B require gradients; the base stays the teacher's weights. A starts
as nn.Linear's default (uniform in +-1/sqrt(in), drawn from a generator of our seed, identical on every rank) and B at
zero, so an adapted role starts as the teacher exactly.

Under ZeRO-3 the adapters go onto the model after the teacher weights were loaded into its partitions and before
``deepspeed.initialize``: peft reads the layer's ``in_features``/``out_features`` (never its partitioned weight), and
the adapter parameters it creates are plain tensors that ``deepspeed.initialize`` partitions like every other
parameter (broadcasting rank 0's values). The forward then gathers ``base_layer``, ``lora_A`` and ``lora_B`` with the
module hooks DeepSpeed puts on every submodule; nothing here runs a collective of its own.

Parameter names gain ``.base_layer`` (the frozen weight and bias) and ``.lora_A.default`` / ``.lora_B.default`` (the
adapter). :func:`merged_source` turns a (name -> tensor) source of an adapted model into the official names of the
merged model, ``W + (alpha / r) B A``; :func:`adapter_layers` into the layers of a LoRA file (engine/models/lora.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from engine.config import ModelConfig, lora_layers
from engine.models.lora import LoraLayer
from engine.models.wan import build_model

ADAPTER = "default"  # peft's adapter name
BASE = ".base_layer"
DOWN = f".lora_A.{ADAPTER}.weight"  # A (r, in)
UP = f".lora_B.{ADAPTER}.weight"  # B (out, r)
Get = Callable[[str], "torch.Tensor | None"]


def target_layers(cfg: ModelConfig, model: nn.Module | None = None) -> dict[str, tuple[int, int]]:
    """The block linears ``cfg.lora.targets`` names, as {layer: (out, in)} in the model's order
    (engine.config.lora_layers: a target that matches none, or a rank above a layer's size, is a ConfigError naming
    the key); with ``model``, each is checked to be an nn.Linear of that shape there."""
    layers = lora_layers(cfg)
    if model is not None:
        modules = dict(model.named_modules())
        for name, (out_f, in_f) in layers.items():
            m = modules.get(name)
            if not (isinstance(m, nn.Linear) and (m.out_features, m.in_features) == (out_f, in_f)):
                raise ValueError(f"model.lora: {name} of the model is {m!r}, not the block linear {out_f} x {in_f}")
    return layers


def adapter_params(cfg: ModelConfig, layers: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the adapters alone (A and B of every targeted layer: ``layers``, default
    :func:`target_layers`)."""
    r = cfg.lora.rank
    out = {}
    for layer, (out_f, in_f) in (target_layers(cfg) if layers is None else layers).items():
        out[layer + DOWN], out[layer + UP] = (r, in_f), (out_f, r)
    return out


@torch.no_grad()
def add_adapters(model: nn.Module, cfg: ModelConfig, seed: int | None, dtype: torch.dtype | None = None) -> list[str]:
    """Put ``cfg.lora``'s adapters on ``model`` (in place) and freeze everything else; returns the adapted layers.
    peft creates the adapter layers empty (``low_cpu_mem_usage``: on the meta device, no init); each is then
    allocated on its base layer's device in ``dtype`` (default: the base weight's) and initialized here: A uniform in
    +-1/sqrt(in) from ``torch.Generator().manual_seed(seed)``, layer after layer, B zero. ``seed=None`` leaves them
    on the meta device (a model built there to read its shapes)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    lora = cfg.lora
    layers = list(target_layers(cfg, model))
    peft_cfg = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.rank * lora.scale, target_modules=layers, lora_dropout=0.0, bias="none"
    )
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in layers:
        wrapped = modules[name]
        base = wrapped.base_layer.weight
        for part in (wrapped.lora_A[ADAPTER], wrapped.lora_B[ADAPTER]):
            if gen is not None:
                part.to_empty(device=base.device).to(dtype or base.dtype)
            part.weight.requires_grad_(True)
        if gen is not None:
            a, b = wrapped.lora_A[ADAPTER].weight, wrapped.lora_B[ADAPTER].weight
            bound = 1 / math.sqrt(a.shape[1])  # nn.Linear's default (kaiming uniform, a = sqrt(5)), as peft's
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=gen))
            b.zero_()
    return layers


def parameter_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """{name: shape} of the parameters of the model a run with ``cfg`` trains (under ``model.lora``: peft's names,
    the adapted layers' weight and bias under ``.base_layer``, and the adapters), and the names of those it trains."""
    model = build_model(cfg, device="meta")
    base = {k: tuple(v.shape) for k, v in model.named_parameters()}
    if not cfg.lora.enabled:
        return base, set(base)
    layers = target_layers(cfg, model)
    out = {}
    for name, shape in base.items():
        layer, kind = name.rsplit(".", 1)
        out[f"{layer}{BASE}.{kind}" if layer in layers else name] = shape
    adapters = adapter_params(cfg, layers)
    return {**out, **adapters}, set(adapters)


def is_adapter(name: str) -> bool:
    return name.endswith((DOWN, UP))


def adapted_layers(names: Iterable[str]) -> list[str]:
    """The layers that carry an adapter, from the parameter names of an adapted model."""
    return [n[: -len(DOWN)] for n in names if n.endswith(DOWN)]


def merged_source(names: Iterable[str], get: Get, scale: float) -> tuple[list[str], Get]:
    """An adapted model's parameters (``names``, ``get``: name -> tensor) as the merged model's: official names, and a
    getter giving ``W + scale B A`` (in fp32, then W's dtype) for an adapted layer's weight, its base bias, and every
    other tensor as it is. ``get`` may return None (a rank that only joins a gather): then so does the result."""
    names = list(names)
    layers = set(adapted_layers(names))
    official = [n.replace(BASE + ".", ".") for n in names if not is_adapter(n)]

    def merged(name: str) -> torch.Tensor | None:
        layer, kind = name.rsplit(".", 1)
        if layer not in layers:
            return get(name)
        w = get(f"{layer}{BASE}.{kind}")
        if kind != "weight":
            return w
        a, b = get(layer + DOWN), get(layer + UP)
        if w is None:
            return None
        return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)

    return official, merged


def adapter_layers(names: Iterable[str], get: Get, scale: float) -> dict[str, LoraLayer]:
    """The adapters of an adapted model as LoRA file layers (official layer -> down A, up B, scale), for
    engine.models.lora.save_lora; empty where ``get`` returns None (a rank that only joins the gathers)."""
    out = {}
    for layer in adapted_layers(names):
        a, b = get(layer + DOWN), get(layer + UP)
        if a is not None and b is not None:
            out[layer] = LoraLayer(down=a.float(), up=b.float(), scale=scale)
    return out
