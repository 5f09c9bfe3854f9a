"""Toy codec: the VideoCodec contract, held-out PSNR of the shipped basis, PCA against numpy's SVD, and metrics
that do not move when real clips pass through the codec."""

import numpy as np
import pytest
import torch

from engine.config import ToyWorldConfig
from engine.data.interfaces import VideoCodec
from engine.toy.codec import ASSET, ToyCodec, fit_codec, fit_codec_on_dataset
from engine.toy.metrics import compute_metrics
from engine.toy.videos import psnr, to_tensor
from engine.toy.world import ensure_dataset
from engine.worlds import latent_shape


@pytest.fixture(scope="module")
def codec() -> ToyCodec:
    return ToyCodec.load()


def test_shipped_codec_fits_the_interface(codec):
    assert isinstance(codec, VideoCodec)
    assert (codec.z_dim, codec.temporal_stride, codec.spatial_stride) == (16, 1, 4)
    strides = dict(temporal_stride=codec.temporal_stride, spatial_stride=codec.spatial_stride)
    assert latent_shape(9, 32, 32, channels=codec.z_dim, **strides) == (
        16,
        9,
        8,
        8,
    )  # 8x8x9 latents: 144 tokens after a (1, 2, 2) patch
    assert ASSET.stat().st_size < 100_000
    torch.testing.assert_close(codec.basis @ codec.basis.T, torch.eye(16), atol=1e-5, rtol=0)  # orthonormal rows


def test_half_frame_rate_scheme_frame_counts(codec, small_clips):
    x = to_tensor(small_clips[0][:2])  # (2, 3, 9, 32, 32)
    z = codec.encode(x)
    assert z.shape == (2, 16, 9, 8, 8)
    half = z[:, :, ::2]  # VIF: steps 1-2 on every other latent frame
    assert half.shape[2] == 5 and 2 * half.shape[2] - 1 == z.shape[2]  # 9 -> 5 -> 9
    assert codec.decode(half).shape == (2, 3, 5, 32, 32)  # any frame count decodes (temporal stride 1)


def test_held_out_psnr_and_latent_scale(codec, small_clips):
    """Real clips (decoded VP9 files) of a world the codec was not fitted on (seed 1 vs 0)."""
    x = to_tensor(small_clips[0])  # (48, 3, 9, 32, 32)
    z = codec.encode(x)
    value = psnr(x, codec.decode(z), peak=2.0)
    print(f"toy codec held-out PSNR: {value:.2f} dB")
    assert value >= 25.0
    std = z.std(dim=(0, 2, 3, 4))  # per channel
    assert torch.all(std > 0.5) and torch.all(std < 2.0)  # ~unit variance for the DiT
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 0.5


def test_encode_of_decode_is_identity_on_the_latent_space(codec):
    z = 0.3 * torch.randn(1, 16, 3, 8, 8)  # small: decoding stays inside [-1, 1], no clamping
    x = codec.decode(z)
    assert x.abs().max() < 1
    torch.testing.assert_close(codec.encode(x), z, atol=1e-4, rtol=0)


def test_fit_matches_numpy_svd():
    """PCA of 2x2 cells of random low-rank videos: same mean, same principal subspace, same variances as numpy."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randn(3, 12, generator=gen)  # 3 directions in the 12-dim cell space
    coeffs = torch.randn(4 * 5 * 4 * 4, 3, generator=gen) * torch.tensor([3.0, 2.0, 1.0])
    cells = (coeffs @ patterns + 0.01 * torch.randn(coeffs.shape[0], 12, generator=gen)) * 0.1  # (M, 12)
    # Cells back to videos (N=4, T=5, 8x8 pixels, stride 2): pixel_shuffle is the inverse of the codec's unshuffle.
    grid = cells.reshape(4 * 5, 4, 4, 12).permute(0, 3, 1, 2)  # (N*T, P, h, w)
    video = torch.nn.functional.pixel_shuffle(grid, 2).reshape(4, 5, 3, 8, 8).transpose(1, 2)  # (N, 3, T, 8, 8)
    fitted = fit_codec(video, z_dim=3, spatial_stride=2, chunk=3)
    data = cells.double().numpy()
    mean = data.mean(axis=0)
    _, sing, vt = np.linalg.svd(data - mean, full_matrices=False)
    np.testing.assert_allclose(fitted.mean.numpy(), mean, atol=1e-6)
    proj_ours = fitted.basis.double().T @ fitted.basis.double()
    np.testing.assert_allclose(proj_ours.numpy(), vt[:3].T @ vt[:3], atol=1e-5)
    np.testing.assert_allclose(fitted.scale.numpy(), sing[:3] / np.sqrt(len(data)), rtol=1e-5)
    again = fit_codec(video, z_dim=3, spatial_stride=2, chunk=7)  # chunking and signs do not change the result
    assert torch.allclose(again.basis, fitted.basis, atol=1e-6)


def test_save_load_round_trip(tmp_path, codec):
    codec.save(tmp_path / "c.safetensors", note="test")
    back = ToyCodec.load(tmp_path / "c.safetensors")
    assert back.spatial_stride == 4 and torch.equal(back.basis, codec.basis)
    with pytest.raises(FileNotFoundError, match="fit-codec"):
        ToyCodec.load(tmp_path / "missing.safetensors")


def test_bad_shapes_raise(codec):
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(1, 3, 9, 30, 32))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(1, 8, 9, 8, 8))


def test_codec_barely_moves_the_metrics(codec, small_clips, reference):
    videos, params, _ = small_clips
    with torch.no_grad():
        through = codec.decode(codec.encode(to_tensor(videos)))
    real = compute_metrics(videos, params, reference)
    coded = compute_metrics(through, params, reference)
    for key in ("dynamic_degree", "instance_preservation", "colour_accuracy", "shape_accuracy", "direction_accuracy"):
        assert abs(real[key] - coded[key]) <= 0.05, key
    assert abs(coded["saturation_ratio"] / real["saturation_ratio"] - 1) <= 0.03
    assert abs(coded["travel"] - real["travel"]) <= 0.5  # pixels


@pytest.mark.slow
def test_refit_on_the_default_world_reproduces_the_shipped_codec(codec):
    """Regenerates the default dataset (~30 s on 2 cores) and refits: same subspace and scales as the asset."""
    fitted = fit_codec_on_dataset(ensure_dataset(ToyWorldConfig(), progress=False))
    torch.testing.assert_close(fitted.mean, codec.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(fitted.basis, codec.basis, atol=1e-4, rtol=0)
    torch.testing.assert_close(fitted.scale, codec.scale, rtol=1e-4, atol=0)
