"""VAE wrapper: parity with diffusers' AutoencoderKLWan, latent normalization, official-checkpoint key rename."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from engine.config import VAEConfig
from engine.data.interfaces import VideoCodec
from engine.data.vae import WanVAE, load_autoencoder, official_to_diffusers
from engine.worlds import latent_shape

# docs/wan.md#vae, typed out again here: the test's own copy of the reference values.
MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
       3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip

TINY = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**TINY).eval()


def video(b=2, t=9, h=16, w=24, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def test_satisfies_the_codec_protocol():
    codec = WanVAE(tiny_vae())
    assert isinstance(codec, VideoCodec)
    assert (codec.z_dim, codec.temporal_stride, codec.spatial_stride) == (16, 4, 8)
    strides = dict(temporal_stride=codec.temporal_stride, spatial_stride=codec.spatial_stride)
    assert latent_shape(81, 480, 832, channels=codec.z_dim, **strides) == (16, 21, 60, 104)


def test_encode_matches_diffusers_plus_the_normalization_formula():
    vae = tiny_vae()
    x = video()
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean  # diffusers, called directly
    mean, std = torch.tensor(MEAN).view(1, 16, 1, 1, 1), torch.tensor(STD).view(1, 16, 1, 1, 1)
    expected = (mu - mean) / std
    got = WanVAE(vae, tiling=False).encode(x)
    assert got.shape == (2, 16, 3, 2, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_matches_diffusers_after_denormalizing():
    vae = tiny_vae()
    z = torch.randn(1, 16, 3, 2, 3)
    with torch.no_grad():
        expected = vae.decode(z * torch.tensor(STD).view(1, 16, 1, 1, 1) + torch.tensor(MEAN).view(1, 16, 1, 1, 1))
    got = WanVAE(vae, tiling=False).decode(z)
    assert got.shape == (1, 3, 9, 16, 24)
    torch.testing.assert_close(got, expected.sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    assert got.abs().max() <= 1.0


def test_normalization_round_trips():
    codec = WanVAE(tiny_vae())
    z = torch.randn(2, 16, 3, 4, 5) * 3 + 1
    torch.testing.assert_close(codec.denormalize(codec.normalize(z)), z, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(codec.normalize(torch.tensor(MEAN).view(1, 16, 1, 1, 1)), torch.zeros(1, 16, 1, 1, 1))


def test_tiling_matches_diffusers_tiled_path():
    vae = tiny_vae()
    x = video(b=1, t=5, h=48, w=64)
    codec = WanVAE(vae, tiling=True, tile_size=32, tile_stride=24)  # tiles smaller than the frame: tiling runs
    reference = tiny_vae()
    reference.enable_tiling(32, 32, 24, 24)
    with torch.no_grad():
        ref = reference.encode(x).latent_dist.mean
    mean, std = torch.tensor(MEAN).view(1, 16, 1, 1, 1), torch.tensor(STD).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(codec.encode(x), (ref - mean) / std, rtol=1e-5, atol=1e-5)
    untiled = WanVAE(tiny_vae(), tiling=False).encode(x)
    assert not torch.allclose(codec.encode(x), untiled)  # the tiled path really was taken


def test_rejects_frame_counts_that_are_not_4k_plus_1():
    with pytest.raises(ValueError, match="4k\\+1"):
        WanVAE(tiny_vae()).encode(video(t=8))


# ---- official checkpoint names ------------------------------------------------------------------------------------

_RES_BACK = [("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
             ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")]  # fmt: skip


def to_official(key: str, num_res_blocks: int) -> str:
    """diffusers -> official names, written independently of the library (inverse of docs/wan.md#vae-key-names)."""
    simple = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
              "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
              "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
              "decoder.conv_out.": "decoder.head.2."}  # fmt: skip
    for new, old in simple.items():
        if key.startswith(new):
            return old + key[len(new) :]

    def res(rest):
        for new, old in _RES_BACK:
            if rest.startswith(new):
                return old + rest[len(new) :]
        return rest

    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{res(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
        return f"encoder.downsamples.{m[1]}.{res(m[2])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}.{res(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{m[2]}"
    raise KeyError(key)


def test_test_renamer_agrees_with_diffusers_converter_on_the_real_architecture():
    # Full-size Wan2.1 VAE on the meta device: names only, no memory. diffusers' own converter is the reference.
    with torch.device("meta"):
        real = AutoencoderKLWan()
    keys = list(real.state_dict())
    official = {to_official(k, 2): k for k in keys}
    assert len(official) == len(keys) == 194
    converted = convert_wan_vae_to_diffusers({o: o for o in official})  # {diffusers name: official name}
    assert converted == {k: o for o, k in official.items()}
    # And the library's renamer agrees on the same real-size names.
    assert set(official_to_diffusers({o: 0 for o in official}, num_res_blocks=2)) == set(keys)


def test_official_checkpoint_loads_back(tmp_path):
    vae = tiny_vae(seed=5)
    official = {to_official(k, 1): v.clone() for k, v in vae.state_dict().items()}
    # num_res_blocks=1: level 0 is upsamples 0-1 (res blocks) and 2 (upsampler); level 1 starts at 3.
    assert "decoder.upsamples.2.resample.1.weight" in official
    assert "decoder.upsamples.3.shortcut.weight" in official
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(official, path)
    from engine.data.vae import load_official_vae

    loaded = load_official_vae(str(path), config=TINY)
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    x = video(b=1)
    torch.testing.assert_close(WanVAE(loaded).encode(x), WanVAE(vae).encode(x), rtol=0, atol=0)


def test_load_from_diffusers_directory_and_pipeline_root(tmp_path):
    vae = tiny_vae(seed=2)
    vae.save_pretrained(tmp_path / "root" / "vae")
    for path in (tmp_path / "root", tmp_path / "root" / "vae"):
        loaded = load_autoencoder(path)
        torch.testing.assert_close(
            loaded.state_dict()["encoder.conv_in.weight"], vae.state_dict()["encoder.conv_in.weight"]
        )
    codec = WanVAE.from_config(VAEConfig(kind="wan", path=str(tmp_path / "root"), tiling=False))
    torch.testing.assert_close(codec.encode(video(b=1)), WanVAE(vae, tiling=False).encode(video(b=1)))
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "nowhere")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    vae = tiny_vae()
    x = video(b=1)
    cpu = WanVAE(vae, tiling=False).encode(x)
    gpu = WanVAE(tiny_vae().cuda(), tiling=False).encode(x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
