"""LoRA adapters for distillation (``model.lora``, engine/models/adapters.py) on one process: peft's layers on our DiT
compute W x + b + alpha / r B A x (checked by hand), start as the base model, train alone (the base bit for bit
unchanged, the optimizer and the EMA holding adapter shapes only); the merged model (W + alpha / r B A by hand)
computes what the adapted one does; bad targets and ranks fail with one line naming the key."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from engine.config import ConfigError, LoraConfig, load_config, model_preset
from engine.distill.ema import PartitionedEMA
from engine.models.adapters import DOWN, UP, adapter_params, add_adapters, merged_source, parameter_shapes
from engine.models.wan import WanModel
from tests.data.tiny_models import dit_inputs, random_dit

pytest.importorskip("peft")

BASE = model_preset("tiny", gradient_checkpointing=False, fused_kernels=False)  # dim 24, ffn 32, 2 blocks
CFG = dataclasses.replace(BASE, lora=LoraConfig(rank=4, alpha=6.0))  # scale 1.5


def adapted(seed: int = 3, cfg=CFG) -> tuple[WanModel, WanModel]:
    """(the base model, a copy of it with adapters whose B is made non-zero)."""
    base = random_dit(BASE, 0)
    model = random_dit(BASE, 0)
    add_adapters(model, cfg, seed=seed)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(UP):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return base, model


def test_the_adapted_layers_and_their_names_and_shapes():
    base, model = adapted()
    shapes, trained = parameter_shapes(CFG)  # what checkpoints and exports expect, without peft
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained == set(adapter_params(CFG))
    assert len(trained) == 2 * 10 * BASE.num_layers  # A and B of all ten linears of each block
    q = model.blocks[0].self_attn.q
    x = torch.randn(5, BASE.dim)
    a, b, w, bias = q.lora_A["default"].weight, q.lora_B["default"].weight, q.base_layer.weight, q.base_layer.bias
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ w.T + bias + 1.5 * (x @ a.T) @ b.T, rtol=0, atol=1e-6)


def test_adapters_start_as_the_base_model_and_draw_a_from_the_seed():
    base = random_dit(BASE, 0)
    one, two, other = (random_dit(BASE, 0) for _ in range(3))
    for model, seed in ((one, 1), (two, 1), (other, 2)):
        add_adapters(model, CFG, seed=seed)
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        assert torch.equal(one(x, t, ctx), base(x, t, ctx))  # B = 0: exactly the base model
    a = {n: p for n, p in one.named_parameters() if n.endswith(DOWN)}
    assert all(torch.equal(p, dict(two.named_parameters())[n]) for n, p in a.items())  # same seed, same A
    assert not torch.equal(a["blocks.0.ffn.0" + DOWN], dict(other.named_parameters())["blocks.0.ffn.0" + DOWN])
    assert all(p.abs().max() <= 1 / p.shape[1] ** 0.5 for p in a.values())  # nn.Linear's bound 1/sqrt(in)
    assert all(p.abs().max() == 0 for n, p in one.named_parameters() if n.endswith(UP))


def test_only_the_adapters_train_and_the_optimizer_and_ema_hold_them_alone():
    _, model = adapted()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ema = PartitionedEMA(SimpleNamespace(module=model), 0.5, 0)
    x, t, ctx = dit_inputs()
    for step in range(3):
        opt.zero_grad()
        model(x, t, ctx).square().mean().backward()
        opt.step()
        ema.update(step)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # the base: bit for bit the teacher's
    assert all(not torch.equal(params[n], v) for n, v in before.items())  # every adapter moved
    shapes = sorted(tuple(s["exp_avg"].shape) for s in opt.state.values())
    assert shapes == sorted(adapter_params(CFG).values())  # Adam's moments: the adapters' shapes, nothing else
    assert set(ema.shadow) == set(adapter_params(CFG))


def test_the_merged_model_is_w_plus_scaled_ba_and_computes_the_adapted_one():
    base, model = adapted()
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, get = merged_source(list(params), params.__getitem__, CFG.lora.scale)
    merged = {n: get(n) for n in names}
    assert set(merged) == set(base.state_dict())
    for name, w in base.state_dict().items():
        layer, kind = name.rsplit(".", 1)
        want = w
        if kind == "weight" and layer + DOWN in params:  # by hand: W + alpha / r B A
            want = w + 1.5 * torch.einsum("or,ri->oi", params[layer + UP], params[layer + DOWN])
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
    plain = WanModel(BASE).eval()
    plain.load_state_dict(merged)
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        out, ref = plain(x, t, ctx), model(x, t, ctx)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (out - base(x, t, ctx)).abs().max() > 1e-2  # the adapters do change the model


def test_targets_select_layers():
    only = dataclasses.replace(CFG, lora=LoraConfig(rank=2, targets=["q", "blocks.1.ffn.2"]))
    assert sorted(adapter_params(only)) == sorted(
        f"{layer}{part}" for layer in ("blocks.0.self_attn.q", "blocks.0.cross_attn.q", "blocks.1.self_attn.q",
                                       "blocks.1.cross_attn.q", "blocks.1.ffn.2") for part in (DOWN, UP)
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.lora.rank=4", "model.lora.targets=[self_attn.qkv]"],
         "config key `model.lora.targets`: 'self_attn.qkv' matches no linear layer of the transformer blocks; "
         "expected one of ['self_attn.q'"),
        (["model.lora.rank=4", "model.lora.targets=[blocks.2.ffn.0]"], "with i < 2"),
        (["model.lora.rank=25"],
         "config key `model.lora.rank`: 25 is larger than layer blocks.0.self_attn.q (24 x 24) allows; expected at "
         "most 24"),
        (["model.lora.rank=-1"], "config key `model.lora.rank`: must be >= 0"),
        (["model.lora.rank=4", "model.lora.alpha=-2"], "config key `model.lora.alpha`: must be positive"),
        (["model.lora.rank=4", "model.lora.targets=[]"], "config key `model.lora.targets`: needs at least one"),
    ],
)  # fmt: skip
def test_bad_lora_settings_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.preset=tiny", *overrides])
    assert needle in str(exc.value) and len(str(exc.value).splitlines()) == 1
    assert load_config(None, ["model.preset=tiny", "model.lora.rank=24"]).model.lora.scale == 1.0  # the largest
