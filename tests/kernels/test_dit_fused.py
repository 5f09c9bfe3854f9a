"""The tiny Wan DiT with fused kernels on (Triton, interpreted) equals the DiT with them off: outputs and every
parameter gradient. The switch is ModelConfig.fused_kernels; on CPU tensors True still dispatches to the references
unless VIDISTILL_KERNELS=triton (set for every test here by tests/kernels/conftest.py)."""

import pytest
import torch

import kernels.adaln
import kernels.gated_residual
import kernels.qk_norm_rope
from engine.config import model_preset
from engine.models.wan import WanModel

pytestmark = pytest.mark.interpreter
# Measured max |fused - unfused| / max |unfused| per tensor: <= 1e-6 for the output and nearly every gradient
# (summation order inside the kernels, carried through 2 blocks and the head); 2.8e-6 for cross_attn.k.bias, a
# gradient made of cancelling terms. 2e-5 keeps a 7x margin over the worst.
RELATIVE = 2e-5


def _count_launches(monkeypatch) -> dict:
    """Wrap each kernel's forward/backward launcher so the test can prove the Triton path really ran."""
    calls = {}
    for module in (kernels.adaln, kernels.gated_residual, kernels.qk_norm_rope):
        for name in ("_forward", "_backward", "_forward_one", "_backward_one"):
            if hasattr(module, name):
                key = f"{module.__name__.split('.')[-1]}.{name}"
                calls[key] = 0
                monkeypatch.setattr(module, name, _counted(getattr(module, name), calls, key))
    return calls


def _counted(fn, calls, key):
    def wrapper(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)

    return wrapper


def _forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_fused_dit_matches_unfused(monkeypatch, checkpointing):
    torch.manual_seed(0)
    unfused = WanModel(model_preset("tiny", fused_kernels=False, gradient_checkpointing=checkpointing))
    fused = WanModel(model_preset("tiny", fused_kernels=True, gradient_checkpointing=checkpointing))
    for model in (unfused, fused):  # make the modulation and head non-trivial: zero init would hide their gradients
        model.init_weights()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unfused.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused.load_state_dict(unfused.state_dict())
    g = torch.Generator().manual_seed(2)
    # latent (B, C, F, H, W) = (2, 4, 3, 6, 10) -> 3 x 3 x 5 = 45 tokens per sample; 7 context rows of text_dim 16
    inputs = (
        torch.randn(2, 4, 3, 6, 10, generator=g),
        torch.tensor([999.0, 321.0]),
        torch.randn(2, 7, 16, generator=g),
    )
    out_ref, grads_ref = _forward_backward(unfused, inputs)
    calls = _count_launches(monkeypatch)
    out, grads = _forward_backward(fused, inputs)
    assert all(n > 0 for n in calls.values()), calls
    _assert_close("output", out, out_ref)
    for name, ref in grads_ref.items():
        assert ref is not None and grads[name] is not None, name
        _assert_close(name, grads[name], ref)


def _assert_close(name, got, ref):
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert scale > 0, f"{name}: zero reference gradient tests nothing"
    assert err <= RELATIVE * scale, f"{name}: max error {err:.3e} > {RELATIVE:g} x {scale:.3e}"


@pytest.mark.parametrize("checkpointing", [True, False])
def test_fused_dit_with_lora_adapters_matches_unfused(monkeypatch, checkpointing):
    """model.lora: peft's adapters on every block linear of a frozen base; the fused kernels (with and without the
    checkpointed recompute) give the unfused output and adapter gradients, and no base parameter gets a gradient."""
    from engine.config import LoraConfig
    from engine.models.adapters import UP, add_adapters

    models = []
    for fused in (False, True):
        cfg = model_preset("tiny", fused_kernels=fused, gradient_checkpointing=checkpointing, lora=LoraConfig(rank=4))
        torch.manual_seed(0)
        model = WanModel(cfg)
        model.init_weights()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        add_adapters(model, cfg, seed=3)
        with torch.no_grad():  # B non-zero, so the adapters shape the output and A gets a gradient
            for name, p in model.named_parameters():
                if name.endswith(UP):
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        models.append(model)
    unfused, fused = models
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 3, 6, 10, generator=g), torch.randn(2, 7, 16, generator=g)
    inputs = (x, torch.tensor([999.0, 321.0]), ctx)
    out_ref, grads_ref = _forward_backward(unfused, inputs)
    calls = _count_launches(monkeypatch)
    out, grads = _forward_backward(fused, inputs)
    assert all(n > 0 for n in calls.values()), calls
    _assert_close("output", out, out_ref)
    trained = {n for n, p in fused.named_parameters() if p.requires_grad}
    assert len(trained) == 40 and all(grads[n] is None for n in grads if n not in trained)
    for name in trained:
        _assert_close(name, grads[name], grads_ref[name])
