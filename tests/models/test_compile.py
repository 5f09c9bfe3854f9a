"""``model.compile``: each block's forward as one compiled graph (fullgraph) computes what the eager block does, in
forward and backward, with gradient checkpointing, with LoRA adapters, and under ZeRO-3 on 2 ranks (blocks as
DeepSpeed leaf modules)."""

import dataclasses

import pytest
import torch

from engine.config import model_preset
from engine.models.adapters import add_adapters
from engine.models.wan import WanModel
from tests.distill.test_trainer_distributed import launch, report, teacher  # noqa: F401 (a fixture)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 6, 16, generator=g)
    return x, torch.tensor([900.0, 300.0]), ctx


def _pair(**overrides):
    cfg = model_preset("tiny", **overrides)
    torch.manual_seed(0)
    eager = WanModel(dataclasses.replace(cfg, compile=False))
    compiled = WanModel(dataclasses.replace(cfg, compile=True))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _run(model):
    model.zero_grad(set_to_none=True)
    out = model(*_inputs())
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_compute_what_eager_blocks_do(checkpointing):
    eager, compiled = _pair(gradient_checkpointing=checkpointing)
    (want, want_grads), (got, got_grads) = _run(eager), _run(compiled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_blocks_with_lora_adapters():
    eager, compiled = _pair()
    lora = dataclasses.replace(eager.cfg.lora, rank=2, alpha=4.0)
    for model in (eager, compiled):
        add_adapters(model, dataclasses.replace(model.cfg, lora=lora), seed=7, dtype=torch.float32)
        with torch.no_grad():  # B starts at zero: make the adapters change the output
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))
    (want, want_grads), (got, got_grads) = _run(eager), _run(compiled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and all("lora_" in n for n in got_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_blocks_of_one_shape_share_one_compiled_graph():
    _, compiled = _pair()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled(*_inputs())
        compiled(*_inputs())
    assert len(compiled.blocks) > 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # every block, both calls: one graph


@pytest.mark.distributed
def test_a_compiled_run_under_zero3_matches_the_eager_run(tmp_path, teacher):  # noqa: F811
    """2 gloo ranks, ZeRO-3, gradient checkpointing: the first cycle's losses of model.compile=true are the eager
    run's."""
    eager, eager_dir = launch(tmp_path, teacher, "eager", steps=2, every=100)
    assert eager.returncode == 0, eager.stderr[-3000:]
    comp, comp_dir = launch(tmp_path, teacher, "compiled", steps=2, every=100, overrides=["model.compile=true"])
    assert comp.returncode == 0, comp.stderr[-3000:]
    want, got = report(eager_dir)["rows"], report(comp_dir)["rows"]
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert a["losses"].keys() == b["losses"].keys()
        for k in a["losses"]:
            assert a["losses"][k] == pytest.approx(b["losses"][k], rel=1e-4, abs=1e-6), (a["step"], k)


def test_past_the_recompile_limit_the_block_fails_instead_of_running_eagerly(monkeypatch):
    import engine.models.wan as wan

    _, compiled = _pair()
    torch._dynamo.reset()
    monkeypatch.setattr(wan, "_RECOMPILE_LIMIT", 1)
    x, t, ctx = _inputs()
    with torch.no_grad():
        compiled(x, t, ctx)  # the one graph allowed
        with pytest.raises(Exception, match="(?i)recompile"):
            compiled(x[:1], t[:1], ctx[:1])  # another batch size needs a second graph
    torch._dynamo.reset()
