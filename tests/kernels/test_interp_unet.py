"""Fused interpolation U-Net inference kernels (kernels/interp_unet.py) vs the model's own torch ops.

Each kernel (the ConvNormAct unit with its skip / crop / pool-on-load inputs, the first layer reading frame pairs
from the latent, the head that writes the interleaved 2F - 1 result) and the whole fused `interpolate` are compared
with the fp32 reference on the same inputs, in fp32 and in fp16/bf16 (error <= 2 x torch's own error in that dtype).
Shapes are odd on purpose: 15 x 26 latents (pooling to 8 x 13 and 4 x 7), C = 16, widths that are not powers of two
(masked channels), F = 11 and 21.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels.interp_unet as ki
from engine.models.interp_unet import ChannelLayerNorm, InterpUNet, frame_pairs, fused_interpolate
from kernels._dispatch import ENV_VAR

pytestmark = pytest.mark.interpreter
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
C, HW, EPS = 16, (15, 26), 1e-5  # C: Wan2.1's latent channels; 15 x 26: a 60 x 104 latent after two poolings
WIDTHS = (8, 12, 24)  # (64, 128, 256) by default, (128, 256, 512) in configs/interp-wan.yaml


def _params(c_in, c_out, dtype, k=3):
    """conv weight (c_out, c_in, k, k), conv bias, norm weight, norm bias; all in dtype, the affine off identity."""
    w = torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    return [t.to(dtype) for t in (w, 0.1 * torch.randn(c_out), 1 + 0.2 * torch.randn(c_out), 0.2 * torch.randn(c_out))]


def _compare(check_close, fn_fused, fn_ref, tensors, dtype, **kwargs):
    """fused(tensors) vs ref(fp32 copies); in low precision also ref(tensors) for torch's own error."""
    with torch.no_grad():
        out = fn_fused(*tensors, **kwargs)
        ref32 = fn_ref(*(t.float() for t in tensors), **kwargs)
        lowp = fn_ref(*tensors, **kwargs) if dtype != torch.float32 else None
    assert out.dtype == dtype
    check_close(fn_fused.__name__, out, ref32, lowp)
    return out


def _unit_args(x, params, skip=None, pool=False):
    return (x, *params, EPS), {"skip": skip, "pool": pool}


# ------------------------------------------------------------------------------------------------ conv_norm_act ---
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "pool", "skip_cropped"])
def test_conv_norm_act_matches_reference(check_close, case, dtype):
    """plain: 16 -> 24 channels; pool: a 15 x 26 map read as its 8 x 13 ceil-mode max-pool; skip_cropped: the
    decoder's input, a (16 x 26 -> 15 x 26) cropped transposed-conv output and a skip, concatenated on load."""
    n, (h, w) = 2, HW
    skip = None
    if case == "plain":
        x, params = torch.randn(n, 16, h, w), _params(16, 24, dtype)
    elif case == "pool":
        x, params = torch.randn(n, 12, h, w), _params(12, 20, dtype)
    else:
        x, skip, params = torch.randn(n, 12, h + 1, w)[..., :h, :], torch.randn(n, 12, h, w), _params(24, 12, dtype)
    x, skip = x.to(dtype), skip.to(dtype) if skip is not None else None
    tensors = (x, *params) + ((skip,) if skip is not None else ())

    def fused(x, w, b, g, beta, skip=None):
        return ki.conv_norm_act(x, w, b, g, beta, EPS, skip=skip, pool=case == "pool")

    def ref(x, w, b, g, beta, skip=None):
        return ki.conv_norm_act_reference(x, w, b, g, beta, EPS, skip=skip, pool=case == "pool")

    out = _compare(check_close, fused, ref, tensors, dtype)
    assert out.shape == (n, params[0].shape[0], *((8, 13) if case == "pool" else HW))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c_out", [256, 300, 512])
def test_conv_norm_act_wide(check_close, c_out, dtype):
    """The widest tiles: 256 and 512 output channels in one tile (300: 212 masked columns of a 512 tile)."""
    x, params = torch.randn(1, 16, 7, 9).to(dtype), _params(16, c_out, dtype)
    _compare(check_close, ki.conv_norm_act, ki.conv_norm_act_reference, (x, *params), dtype, eps=EPS)


@pytest.mark.parametrize("c_out", [20, 300])
def test_conv_norm_act_gpu_tiles(check_close, monkeypatch, c_out):
    """The GPU's tile sizes run under the interpreter too, pooled on load: BLOCK_M 64 (20 channels: 7 tiles of a
    15 x 26 image) and 32 (300 channels in a 512 tile: 13 tiles)."""
    monkeypatch.setattr(ki, "_INTERPRETER_BLOCK_M", None)
    assert ki._blocks(16, c_out, torch.bfloat16, pool=True)["BLOCK_M"] == (64 if c_out == 20 else 32)
    x, params = torch.randn(1, 16, 29, 52), _params(16, c_out, torch.float32)
    _compare(check_close, ki.conv_norm_act, ki.conv_norm_act_reference, (x, *params), torch.float32, eps=EPS, pool=True)


def test_reference_is_the_models_unit():
    """The reference is bit for bit what InterpUNet computes: its first encoder unit, a pooled encoder unit, and a
    decoder unit on cat([cropped transposed conv, skip])."""
    net = _random_net(C, WIDTHS, torch.float32)
    x = torch.randn(2, 2 * C, *HW)
    unit = net.enc[0][0]
    p = (unit.conv.weight, unit.conv.bias, unit.norm.weight, unit.norm.bias, unit.norm.eps)
    with torch.no_grad():
        assert torch.equal(ki.conv_norm_act_reference(x, *p), unit(x))
        y = torch.randn(2, WIDTHS[0], *HW)
        unit = net.enc[1][0]
        p = (unit.conv.weight, unit.conv.bias, unit.norm.weight, unit.norm.bias, unit.norm.eps)
        assert torch.equal(ki.conv_norm_act_reference(y, *p, pool=True), unit(F.max_pool2d(y, 2, ceil_mode=True)))
        level, coarse = net.dec[2], torch.randn(2, WIDTHS[1], 8, 13)
        up = level.up(coarse)[..., :15, :26]
        unit = level.block[0]
        p = (unit.conv.weight, unit.conv.bias, unit.norm.weight, unit.norm.bias, unit.norm.eps)
        assert torch.equal(ki.conv_norm_act_reference(up, *p, skip=y), unit(torch.cat([up, y], 1)))
        assert torch.equal(ki.frame_pairs_reference(x.view(2, C, 2, *HW)), frame_pairs(x.view(2, C, 2, *HW)))


# --------------------------------------------------------------------------------------------- pairs and head ---
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frames", [11, "21 -> 11 strided"])
def test_pair_conv_norm_act_matches_reference(check_close, frames, dtype):
    """Pairs read from (1, 16, 11, 15, 26), contiguous or as latents[:, :, ::2] of 21 frames (what VIF passes)."""
    if frames == 11:
        lat = torch.randn(1, C, 11, *HW).to(dtype)
    else:
        lat = torch.randn(1, C, 21, *HW).to(dtype)[:, :, ::2]
    params = _params(2 * C, WIDTHS[0], dtype)
    out = _compare(check_close, ki.pair_conv_norm_act, ki.pair_conv_norm_act_reference, (lat, *params), dtype, eps=EPS)
    assert out.shape == (10, WIDTHS[0], *HW)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False])
def test_interp_head_matches_reference(check_close, residual, dtype):
    """Last unit + 1x1 conv + pair average, interleaved into (2, 16, 5, 15, 26); the originals are copied exactly
    (the last pair also writes frame 2F - 2)."""
    b, f = 2, 3
    lat = torch.randn(b, C, f, *HW).to(dtype)
    x = torch.randn(b * (f - 1), WIDTHS[0], *HW).to(dtype)
    params = _params(WIDTHS[0], WIDTHS[0], dtype)
    out_w, out_b = (t.to(dtype) for t in (0.3 * torch.randn(C, WIDTHS[0], 1, 1), 0.1 * torch.randn(C)))

    def fused(x, w, bias, g, beta, out_w, out_b, lat):
        return ki.interp_head(x, w, bias, g, beta, EPS, out_w, out_b, lat, residual)

    def ref(x, w, bias, g, beta, out_w, out_b, lat):
        return ki.interp_head_reference(x, w, bias, g, beta, EPS, out_w, out_b, lat, residual)

    out = _compare(check_close, fused, ref, (x, *params, out_w, out_b, lat), dtype)
    assert out.shape == (b, C, 2 * f - 1, *HW)
    assert torch.equal(out[:, :, 0::2], lat)


# ------------------------------------------------------------------------------------------- whole interpolate ---
def _random_net(c, widths, dtype, residual=True):
    """Every weight random, including the zero-initialized output conv (else the output is just the blend)."""
    net = InterpUNet(c, widths, residual=residual)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    torch.nn.init.normal_(net.out.bias, std=0.1)
    for norm in net.modules():
        if isinstance(norm, ChannelLayerNorm):
            torch.nn.init.normal_(norm.weight, 1.0, 0.2)
            torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    return net.eval().to(dtype)


def _check_interpolate(check_close, c, frames, hw, dtype, residual=True, strided=False):
    net = _random_net(c, WIDTHS, torch.float32, residual)
    lat = torch.randn(1, c, 2 * frames - 1 if strided else frames, *hw).to(dtype)
    lat = lat[:, :, ::2] if strided else lat  # the half-rate latents VIF interpolates back to full rate
    with torch.no_grad():
        ref32 = net.interpolate(lat.float(), fused=False)
        lowp = net.to(dtype).interpolate(lat, fused=False) if dtype != torch.float32 else None
        out = fused_interpolate(net.to(dtype), lat)
    assert out.dtype == dtype and out.shape == (1, c, 2 * frames - 1, *hw)
    check_close("interpolate", out, ref32, lowp)
    assert torch.equal(out[:, :, 0::2], lat)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_interpolate_matches_model(check_close, dtype):
    """(1, 16, 11, 15, 26) taken as latents[:, :, ::2] of 21 frames -> 21 frames; widths 8/12/24."""
    frames = 11 if dtype == torch.float32 else 3  # low precision at 11 frames: test_fused_interpolate_long
    _check_interpolate(check_close, C, frames, HW, dtype, strided=True)


@pytest.mark.parametrize("hw", [(1, 1), (2, 3)])
@pytest.mark.parametrize("residual", [True, False])
def test_fused_interpolate_tiny_maps(check_close, hw, residual):
    """Maps that pool down to 1 x 1 (every tap but the centre is padding; partial pooling windows)."""
    _check_interpolate(check_close, 4, 2, hw, torch.float32, residual)


@pytest.mark.slow
@pytest.mark.parametrize(
    "frames, c, hw, dtype",
    [(11, C, HW, torch.float16), (11, C, HW, torch.bfloat16)] + [(21, 4, (9, 7), dtype) for dtype in DTYPES],
)
def test_fused_interpolate_long(check_close, frames, c, hw, dtype):
    """11 frames of the 16-channel 15 x 26 latent in low precision (fp32: the default test), 21 frames of a small
    latent in every dtype."""
    _check_interpolate(check_close, c, frames, hw, dtype)


# ------------------------------------------------------------------------------------------------ model wiring ---
def _count_launches(monkeypatch) -> list:
    calls = []
    for name in ("_conv_forward", "_head_forward"):
        fn = getattr(ki, name)
        monkeypatch.setattr(ki, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    return calls


def test_model_interpolate_takes_the_fused_path_without_grad(check_close, monkeypatch):
    """InterpUNet.interpolate: fused kernels under no_grad (11 conv launches + the head, same result as the torch
    path); the torch path when a gradient is needed, with fused=False, and in auto mode on CPU tensors."""
    net, lat = _random_net(4, WIDTHS, torch.float32), torch.randn(1, 4, 3, 9, 7)
    calls = _count_launches(monkeypatch)
    with torch.no_grad():
        torch_path = net.interpolate(lat, fused=False)
        assert calls == []
        fused = net.interpolate(lat)
    assert calls == ["_conv_forward"] * 11 + ["_head_forward"]
    check_close("interpolate", fused, torch_path)
    calls.clear()
    trained = net.interpolate(lat)  # grad enabled and the parameters require grad: the torch path
    assert calls == [] and trained.grad_fn is not None and torch.equal(trained, torch_path)
    monkeypatch.setenv(ENV_VAR, "auto")  # CPU tensors: the reference, i.e. the model's torch path, bit for bit
    with torch.no_grad():
        assert torch.equal(net.interpolate(lat), torch_path) and calls == []


# ---------------------------------------------------------------------------------------------- ops and errors ---
def test_custom_ops_pass_opcheck():
    x, params = torch.randn(1, 8, 3, 5), _params(8, 16, torch.float32)
    skip = torch.randn(1, 4, 2, 3)
    torch.library.opcheck(torch.ops.vidistill.conv_norm_act, (x, *params, EPS, None, False))
    pooled = (x, _params(12, 16, torch.float32)[0], *params[1:], EPS, skip, True)
    torch.library.opcheck(torch.ops.vidistill.conv_norm_act, pooled)
    lat = torch.randn(1, 4, 3, 3, 5)
    torch.library.opcheck(torch.ops.vidistill.pair_conv_norm_act, (lat, *_params(8, 16, torch.float32), EPS))
    x = torch.randn(2, 16, 3, 5)
    head = (x, *_params(16, 16, torch.float32), EPS, torch.randn(4, 16, 1, 1), torch.randn(4), lat, True)
    torch.library.opcheck(torch.ops.vidistill.interp_head, head)


def test_forward_only_and_bad_inputs_are_clear_errors():
    x, params = torch.randn(1, 8, 3, 5), _params(8, 16, torch.float32)
    with pytest.raises(ValueError, match="forward only"):
        ki.conv_norm_act(x.requires_grad_(), *params, EPS)
    x = x.detach()
    with pytest.raises(ValueError, match=r"\(Cout, 12, 3, 3\)"):
        ki.conv_norm_act(x, *params, EPS, skip=torch.randn(1, 4, 3, 5))
    with pytest.raises(ValueError, match="at most 512"):
        ki.conv_norm_act(x, *_params(8, 520, torch.float32), EPS)
    with pytest.raises(ValueError, match="skip must be"):
        ki.conv_norm_act(x, *_params(12, 16, torch.float32), EPS, skip=torch.randn(1, 4, 3, 5), pool=True)
    with pytest.raises(ValueError, match="F >= 2"):
        ki.pair_conv_norm_act(torch.randn(1, 4, 1, 3, 5), *params, EPS)
    net = _random_net(4, WIDTHS, torch.float32)
    with pytest.raises(ValueError, match="do not fit"), torch.no_grad():
        fused_interpolate(net, torch.randn(1, 4, 3, 3, 5, dtype=torch.float64))
