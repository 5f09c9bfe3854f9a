"""The interpolation U-Net: sizes pooling does not divide, the batched pair call, the residual start, the per-pixel
norm, frame dropping, and the safetensors export with its errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.interp_unet import (
    ChannelLayerNorm,
    InterpolatorError,
    InterpUNet,
    check_halvable,
    drop_frames,
    load_interpolator,
    read_interpolator_config,
    save_interpolator,
)

C = 4  # 16 in Wan2.1


def _random_net(residual: bool = True, seed: int = 0) -> InterpUNet:
    """Widths 8/16/32 (64/128/256 default); every weight random, including the zero-initialized output conv."""
    torch.manual_seed(seed)
    net = InterpUNet(C, (8, 16, 32), residual=residual)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    for norm in net.modules():
        if isinstance(norm, ChannelLayerNorm):  # move the affine off its identity start
            torch.nn.init.normal_(norm.weight, 1.0, 0.2)
            torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    return net.eval()


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (9, 7), (15, 26), (60, 104)])
def test_sizes_pooling_does_not_divide(hw):
    """60x104 pools to 30x52, 15x26, 8x13 (ceil); odd and 1x1 sizes work; originals are kept bit-exactly."""
    net = _random_net()
    x = torch.randn(2, C, 3, *hw)
    out = net.interpolate(x)
    assert out.shape == (2, C, 5, *hw)
    assert torch.equal(out[:, :, 0::2], x)
    assert torch.isfinite(out).all()
    # every input pixel influences the output: nothing is cropped away or padded in
    pairs = torch.randn(1, 2 * C, *hw, requires_grad=True)
    net(pairs).square().sum().backward()
    assert (pairs.grad.abs().sum(1) > 0).all()


def test_all_pairs_in_one_batched_call_and_interleaving():
    net = _random_net()
    x = torch.randn(2, C, 5, 9, 7)
    calls = []
    net.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape))
    out = net.interpolate(x)
    assert calls == [torch.Size([2 * 4, 2 * C, 9, 7])]  # B * (F - 1) pairs, one forward
    for b in range(2):
        for i in range(4):
            pair = torch.cat([x[b : b + 1, :, i], x[b : b + 1, :, i + 1]], dim=1)  # (1, 2C, H, W)
            torch.testing.assert_close(out[b, :, 2 * i + 1], net(pair)[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[b, :, 2 * i], x[b, :, i], rtol=0, atol=0)


def test_untrained_residual_net_is_the_linear_blend():
    torch.manual_seed(1)
    net = InterpUNet(C, (8, 16, 32))  # fresh: output conv starts at zero
    x = torch.randn(1, C, 4, 6, 5)
    out = net.interpolate(x)
    torch.testing.assert_close(out[:, :, 1::2], 0.5 * (x[:, :, :-1] + x[:, :, 1:]), rtol=0, atol=0)
    plain = InterpUNet(C, (8, 16, 32), residual=False)
    assert (plain.interpolate(x)[:, :, 1::2] - out[:, :, 1::2]).abs().max() > 1e-3


def test_channel_layer_norm_formula():
    norm = ChannelLayerNorm(6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
    torch.testing.assert_close(norm.double()(x), ref)


def test_no_batch_dependence_and_no_running_statistics():
    """Per-pixel norm: a sample's output does not depend on its batch mates, and train/eval modes agree."""
    net = _random_net()
    pairs = torch.randn(5, 2 * C, 9, 7)
    alone = net(pairs[2:3])
    torch.testing.assert_close(net(pairs)[2:3], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.train()(pairs[2:3]), alone, rtol=0, atol=0)
    assert not list(net.buffers())


def test_drop_frames_round_trip_and_even_frames_error():
    x = torch.randn(1, C, 21, 4, 4)
    kept = drop_frames(x)
    assert kept.shape[2] == 11 and torch.equal(kept, x[:, :, [2 * i for i in range(11)]])
    assert _random_net().interpolate(kept).shape == x.shape  # 21 -> 11 -> 21
    assert check_halvable(1) == 1 and check_halvable(9) == 5
    with pytest.raises(InterpolatorError, match="20 latent frames cannot be halved"):
        drop_frames(torch.randn(1, C, 20, 4, 4))


def test_wrong_channels():
    net = _random_net()
    with pytest.raises(InterpolatorError, match="latents have 3 channels, the interpolator expects 4"):
        net.interpolate(torch.randn(1, 3, 5, 4, 4))
    with pytest.raises(InterpolatorError, match=r"pairs must be \(N, 8, H, W\)"):
        net(torch.randn(1, 4, 4, 4))


def test_save_load_round_trip(tmp_path):
    net = _random_net()
    save_interpolator(net, tmp_path / "interp")
    cfg = json.loads((tmp_path / "interp" / "config.json").read_text())
    assert cfg == {"format": "interp_unet", "in_channels": C, "channels": [8, 16, 32], "residual": True}
    loaded = load_interpolator(tmp_path / "interp", in_channels=C)
    x = torch.randn(1, C, 5, 9, 7)
    torch.testing.assert_close(loaded.interpolate(x), net.interpolate(x), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "interp").iterdir()) == ["config.json", "model.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(InterpolatorError, match="interpolator directory not found"):
        load_interpolator(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterpolatorError, match="missing config.json"):
        load_interpolator(tmp_path / "empty")

    d = save_interpolator(_random_net(), tmp_path / "interp")
    state = load_file(str(d / "model.safetensors"))
    del state["out.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(InterpolatorError, match=r"missing keys \['out.weight'\]"):
        load_interpolator(d)


def test_channel_mismatch_is_reported_before_weights_are_read(tmp_path):
    d = save_interpolator(_random_net(), tmp_path / "interp")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")  # reading weights would fail differently
    assert read_interpolator_config(d)["in_channels"] == C
    with pytest.raises(
        InterpolatorError, match="interpolator has 4 latent channels but the student's model.in_dim is 16"
    ):
        load_interpolator(d, in_channels=16)
