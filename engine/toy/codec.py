"""The toy codec (the VAE role): 4x4 space-to-depth, then PCA to ``z_dim`` channels scaled to unit variance.

Each 4x4 RGB cell of a frame (48 numbers) is projected on the top ``z_dim`` principal directions of such cells in real
toy clips; frames are coded independently (temporal stride 1), so a 9-frame clip has F = 9 latent frames (odd: the
half-frame-rate scheme runs 9 -> 5 -> 9). 32x32 pixels -> 8x8 latents: 144 DiT tokens after the (1, 2, 2) patch.
Held-out PSNR on the default world's val split (102 clips): 8 channels 31.3 dB, 12: 34.2, 16: 36.0, 24: 39.6; 16
matches Wan's z_dim and the toy DiT preset. Decoding is the transpose projection (the PCA basis is orthonormal), so
encode -> decode is the best rank-``z_dim`` linear reconstruction of each cell.

The fitted basis is shipped as ``engine/assets/toy_codec.safetensors`` (~4 KB) so the toy teacher's weights stay valid
across machines; ``launcher/toy_data.py fit-codec`` reproduces it from the default dataset (deterministic: fixed data,
float64 eigendecomposition, sign convention below).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.config import ToyWorldConfig
from engine.fsutil import atomic_write
from engine.toy.videos import psnr, to_tensor
from engine.toy.world import dataset_dir, ensure_dataset, load_clips

ASSET = Path(__file__).resolve().parent.parent / "assets" / "toy_codec.safetensors"


class ToyCodec(torch.nn.Module):
    """Linear codec (satisfies ``engine.data.interfaces.VideoCodec``).

    Buffers: ``mean`` ``(P,)``, ``basis`` ``(z_dim, P)`` orthonormal rows, ``scale`` ``(z_dim,)`` (the standard
    deviation of each channel on the fitting data), with ``P = 3 * spatial_stride ** 2``.
    """

    temporal_stride = 1

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, spatial_stride: int):
        super().__init__()
        z_dim, p = basis.shape
        if p != 3 * spatial_stride**2 or mean.shape != (p,) or scale.shape != (z_dim,):
            shapes = f"basis {tuple(basis.shape)}, mean {tuple(mean.shape)}, scale {tuple(scale.shape)}"
            raise ValueError(f"inconsistent codec: {shapes}, stride {spatial_stride}")
        self.spatial_stride = spatial_stride
        self.z_dim = z_dim
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", basis.float())
        self.register_buffer("scale", scale.float())

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, z_dim, T, H / s, W / s)``, ~unit variance per channel."""
        b, c, t, h, w = video.shape
        s = self.spatial_stride
        if c != 3 or h % s or w % s:
            raise ValueError(f"video must be (B, 3, T, H, W) with H, W divisible by {s}, got {tuple(video.shape)}")
        x = video.float().transpose(1, 2).reshape(b * t, 3, h, w)  # (B*T, 3, H, W)
        x = F.pixel_unshuffle(x, s) - self.mean[:, None, None]  # (B*T, P, h, w)
        z = torch.einsum("kp,nphw->nkhw", self.basis, x) / self.scale[:, None, None]  # (B*T, z, h, w)
        return z.reshape(b, t, self.z_dim, h // s, w // s).transpose(1, 2).contiguous()  # (B, z, T, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, z_dim, F, h, w)`` -> ``(B, 3, F, h * s, w * s)`` clamped to [-1, 1]."""
        b, k, f, h, w = latents.shape
        if k != self.z_dim:
            raise ValueError(f"latents must have {self.z_dim} channels, got {tuple(latents.shape)}")
        z = latents.float().transpose(1, 2).reshape(b * f, k, h, w) * self.scale[:, None, None]  # (B*F, z, h, w)
        x = torch.einsum("kp,nkhw->nphw", self.basis, z) + self.mean[:, None, None]  # (B*F, P, h, w)
        x = F.pixel_shuffle(x, self.spatial_stride)  # (B*F, 3, H, W)
        return x.reshape(b, f, 3, x.shape[-2], x.shape[-1]).transpose(1, 2).clamp(-1, 1).contiguous()  # (B, 3, F, H, W)

    def save(self, path: str | Path, note: str = "") -> None:
        tensors = {"mean": self.mean, "basis": self.basis, "scale": self.scale}
        meta = {"spatial_stride": str(self.spatial_stride), "note": note}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # mode from the umask

    @staticmethod
    def load(path: str | Path = ASSET) -> ToyCodec:
        """The shipped codec by default; a clear error (with the command that makes one) when the file is missing."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"toy codec {path} not found; fit one with `python -m launcher.toy_data fit-codec`")
        with safe_open(str(path), framework="pt") as handle:
            stride = int(handle.metadata()["spatial_stride"])
        t = load_file(str(path))
        return ToyCodec(t["mean"], t["basis"], t["scale"], stride)


def _cells(video: torch.Tensor, stride: int) -> torch.Tensor:
    """``(B, 3, T, H, W)`` -> every s x s cell as a row: ``(B * T * h * w, P)`` float64."""
    b, c, t, h, w = video.shape
    x = F.pixel_unshuffle(video.transpose(1, 2).reshape(b * t, c, h, w), stride)  # (B*T, P, h, w)
    return x.permute(0, 2, 3, 1).reshape(-1, c * stride * stride).double()


def fit_codec(videos: torch.Tensor, z_dim: int = 16, spatial_stride: int = 4, chunk: int = 64) -> ToyCodec:
    """PCA of the s x s cells of ``videos`` ``(N, 3, T, H, W)`` in [-1, 1] (float64 moments, accumulated in chunks).

    Sign convention: each basis row's largest-magnitude entry is positive, so the fit is reproducible.
    """
    p = 3 * spatial_stride**2
    if not 1 <= z_dim <= p:
        raise ValueError(f"z_dim must lie in [1, {p}], got {z_dim}")
    total, outer, count = torch.zeros(p, dtype=torch.float64), torch.zeros(p, p, dtype=torch.float64), 0
    for start in range(0, videos.shape[0], chunk):
        cells = _cells(videos[start : start + chunk], spatial_stride)  # (M, P)
        total += cells.sum(0)
        outer += cells.T @ cells
        count += cells.shape[0]
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)  # (P, P)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    basis = evecs[:, -z_dim:].flip(-1).T.contiguous()  # (z, P), largest variance first
    pivot = basis.abs().argmax(dim=1)
    basis = basis * torch.sign(basis.gather(1, pivot[:, None]))
    scale = evals[-z_dim:].flip(-1).clamp_min(1e-12).sqrt()
    return ToyCodec(mean, basis, scale, spatial_stride)


def fit_codec_on_dataset(manifest: str | Path, z_dim: int = 16, spatial_stride: int = 4) -> ToyCodec:
    """Fit on the train split of a toy dataset (decoded from its VP9 files, as training will see them)."""
    videos, _, _ = load_clips(manifest, split="train")  # (N, T, H, W, 3) uint8
    return fit_codec(to_tensor(videos), z_dim, spatial_stride)


def fit_toy_codec(cfg: ToyWorldConfig, out: str | Path, z_dim: int = 16) -> dict:
    """Fit on the world's train split, save to ``out``, and report the held-out (val) PSNR."""
    manifest = ensure_dataset(cfg)
    codec = fit_codec_on_dataset(manifest, z_dim=z_dim)
    val, _, _ = load_clips(manifest, split="val")
    x = to_tensor(val)  # (N, 3, T, H, W)
    with torch.no_grad():
        val_psnr = psnr(x, codec.decode(codec.encode(x)), peak=2.0)
    data = f"train split of {dataset_dir(cfg).name} ({cfg.num_clips} clips)"
    note = f"PCA of {codec.spatial_stride}x{codec.spatial_stride} cells, {data}; val PSNR {val_psnr:.2f} dB"
    codec.save(out, note=note)
    return {"path": str(out), "z_dim": z_dim, "val_psnr_db": round(val_psnr, 2), "val_clips": len(val), "note": note}
