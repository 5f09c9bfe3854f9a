"""Structure, sizes, gradient checkpointing, variable frame counts and input errors of our Wan DiT."""

import pytest
import torch

from engine.config import model_preset
from engine.models.rope import axis_dims, rope_tables
from engine.models.wan import WanModel, build_model


def _tiny(**kw):
    return model_preset("tiny", **kw)


def _inputs(cfg, b=2, f=3, h=4, w=6, ctx_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, cfg.in_dim, f, h, w, generator=g),
        torch.rand(b, generator=g) * 1000,
        torch.randn(b, ctx_len, cfg.text_dim, generator=g),
    )


@pytest.mark.parametrize(
    "preset, params, tensors",
    [("wan2.1-1.3b", 1.419e9, 825), ("wan2.1-14b", 14.289e9, 1095)],
)
def test_real_sizes_build_on_meta(preset, params, tensors):
    """A 14B model is constructible without allocating; sizes and tensor counts match docs/wan.md#sizes."""
    model = build_model(model_preset(preset), device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert abs(n_params - params) / params < 5e-4
    assert len(model.state_dict()) == tensors


def test_gradient_checkpointing_matches_plain():
    cfg_ckpt, cfg_plain = _tiny(gradient_checkpointing=True), _tiny(gradient_checkpointing=False)
    torch.manual_seed(0)
    a = WanModel(cfg_ckpt)
    b = WanModel(cfg_plain)
    b.load_state_dict(a.state_dict())
    x, t, ctx = _inputs(cfg_ckpt)
    (a(x, t, ctx) ** 2).mean().backward()
    (b(x, t, ctx) ** 2).mean().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frames", [11, 21])
def test_any_frame_count_without_padding(frames):
    """11 or 21 latent frames run at their true length: output shape equals input shape."""
    cfg = _tiny(rope_max_seq_len=32, num_layers=1)
    model = WanModel(cfg).eval()
    x, t, ctx = _inputs(cfg, b=1, f=frames, h=2, w=4)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == x.shape
    assert model.num_tokens((frames, 2, 4)) == frames * 1 * 2


def test_frame_positions_change_output_only_when_different():
    cfg = _tiny()
    model = WanModel(cfg).eval()
    x, t, ctx = _inputs(cfg, f=3)
    with torch.no_grad():
        default = model(x, t, ctx)
        same = model(x, t, ctx, frame_positions=torch.arange(3))
        strided = model(x, t, ctx, frame_positions=torch.arange(3) * 2)
    assert torch.equal(default, same)
    assert (default - strided).abs().max() > 1e-4


def test_rope_tables_match_complex_formula():
    """Against the official formulation written out independently: polar(1, pos * theta^(-2j/d)) per axis."""
    head_dim, grid = 12, (3, 2, 4)
    cos, sin = rope_tables(grid, head_dim, max_seq_len=32)
    dt, dh, dw = axis_dims(head_dim)
    assert (dt, dh, dw) == (4, 4, 4)
    n = 0
    for f in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                expected = []
                for pos, d in ((f, dt), (h, dh), (w, dw)):
                    for j in range(d // 2):
                        expected.append(
                            complex(
                                torch.polar(
                                    torch.tensor(1.0, dtype=torch.float64),
                                    torch.tensor(pos * 10000.0 ** (-2 * j / d), dtype=torch.float64),
                                )
                            )
                        )
                exp = torch.tensor(expected, dtype=torch.complex128)
                torch.testing.assert_close(cos[n].double(), exp.real, atol=1e-7, rtol=0)
                torch.testing.assert_close(sin[n].double(), exp.imag, atol=1e-7, rtol=0)
                n += 1
    assert axis_dims(128) == (44, 42, 42)


@pytest.mark.parametrize(
    "shape_kw, t_shape, ctx_shape, match",
    [
        (dict(c=3), None, None, "channels"),
        (dict(h=5), None, None, "height 5 is not divisible"),
        (dict(w=7), None, None, "width 7 is not divisible"),
        (dict(), (3,), None, "timestep must have shape"),
        (dict(), None, (2, 5, 99), "context must be"),
    ],
)
def test_bad_inputs_fail_with_one_clear_message(shape_kw, t_shape, ctx_shape, match):
    cfg = _tiny()
    model = WanModel(cfg)
    c = shape_kw.get("c", cfg.in_dim)
    x = torch.randn(2, c, 3, shape_kw.get("h", 4), shape_kw.get("w", 6))
    t = torch.rand(t_shape or (2,))
    ctx = torch.randn(*(ctx_shape or (2, 5, cfg.text_dim)))
    with pytest.raises(ValueError, match=match):
        model(x, t, ctx)


def test_grid_beyond_rope_table_is_an_error():
    cfg = _tiny(rope_max_seq_len=4)
    model = WanModel(cfg)
    x, t, ctx = _inputs(cfg, f=5)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model(x, t, ctx)


def test_bf16_parameters_keep_fp32_modulation():
    """bf16 weights run (as on GPU); output dtype follows the input, and stays close to the fp32 model."""
    cfg = _tiny(gradient_checkpointing=False)
    model = WanModel(cfg).eval()
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, ctx)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_flops_match_wan_spec_table():
    """docs/wan.md#flops: ~283 TFLOPs (71% attention) for 1.3B and ~1.68 PFLOPs (53%) for 14B at 832x480x81."""
    from engine.models.flops import dit_forward_flops

    small = dit_forward_flops(model_preset("wan2.1-1.3b"), (21, 60, 104), 512)
    big = dit_forward_flops(model_preset("wan2.1-14b"), (21, 60, 104), 512)
    assert small["tokens"] == 32760
    assert small["total"] / 1e12 == pytest.approx(283, rel=0.01)
    assert small["attention"] / small["total"] == pytest.approx(0.71, abs=0.01)
    assert big["total"] / 1e15 == pytest.approx(1.68, rel=0.01)
    assert big["attention"] / big["total"] == pytest.approx(0.53, abs=0.01)
