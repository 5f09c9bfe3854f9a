"""The Wan2.1 VAE as a :class:`~engine.data.interfaces.VideoCodec`: diffusers' ``AutoencoderKLWan`` plus normalization.

``encode``: pixels ``(B, 3, T, H, W)`` in [-1, 1] -> the posterior mean (the official ``WanVAE.encode`` returns the
mean, not a sample), normalized per channel ``(z - mean) / std`` with the 16 values of docs/wan.md#vae, so the
DiT sees ~unit variance. ``decode`` inverts the normalization and clamps to [-1, 1]. Memory: diffusers already runs
time in chunks with a causal feature cache (encode: 1 then 4 frames, decode: one latent frame at a time), so the
clip length does not multiply activations; spatial tiling (``enable_tiling``) bounds them at 832x480, and slicing
runs the batch one video at a time.

Weights load from a local diffusers directory (``config.json`` + safetensors, or a pipeline root with ``vae/``) or
from the official ``Wan2.1_VAE.pth``, whose keys are renamed here (docs/wan.md#vae-key-names).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import AutoencoderKLWan

# docs/wan.md#vae (identical in the official WanVAE and in AutoencoderKLWan's defaults).
WAN_LATENT_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN_LATENT_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)

# ---------------------------------------------------------------------------------------------------------------------
# Official -> diffusers key names
# ---------------------------------------------------------------------------------------------------------------------

# Inside a residual block: official nn.Sequential positions -> diffusers attribute names.
_RESIDUAL = (
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.", "conv1."),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_FIXED = {
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "encoder.conv1.": "encoder.conv_in.",
    "decoder.conv1.": "decoder.conv_in.",
    "encoder.head.0.": "encoder.norm_out.",
    "encoder.head.2.": "encoder.conv_out.",
    "decoder.head.0.": "decoder.norm_out.",
    "decoder.head.2.": "decoder.conv_out.",
}


def _residual(rest: str) -> str:
    for old, new in _RESIDUAL:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest  # resample.1.* and time_conv.* keep their names


def _rename(key: str, num_res_blocks: int) -> str:
    for old, new in _FIXED.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)", key):
        part, pos, rest = m.groups()
        if pos == "1":
            return f"{part}.mid_block.attentions.0.{rest}"
        return f"{part}.mid_block.resnets.{int(pos) // 2}.{_residual(rest)}"
    if m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key):
        # The encoder keeps the official flat list: same index, renamed residual parts.
        return f"encoder.down_blocks.{m.group(1)}.{_residual(m.group(2))}"
    if m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key):
        # Official: a flat list of (num_res_blocks + 1) residual blocks then one Resample per level (none after the
        # last); diffusers groups them as up_blocks[level].resnets[j] and up_blocks[level].upsamplers[0].
        k, rest = int(m.group(1)), m.group(2)
        level, j = divmod(k, num_res_blocks + 2)
        if j <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{j}.{_residual(rest)}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
    raise KeyError(f"unexpected key in an official Wan2.1 VAE checkpoint: {key}")


def official_to_diffusers(state_dict: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename an official ``Wan2.1_VAE.pth`` state dict to ``AutoencoderKLWan`` names (Wan2.1: 2 res blocks)."""
    return {_rename(k, num_res_blocks): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _read_official(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_official_vae(path: str, config: Optional[dict[str, Any]] = None) -> AutoencoderKLWan:
    """``AutoencoderKLWan`` (default: the Wan2.1 architecture, or ``config``) with an official checkpoint's weights."""
    config = dict(config or {})
    if config.get("attn_scales"):
        raise ValueError("the official-key rename supports attn_scales=[] only (every Wan2.1 VAE)")
    with torch.device("meta"):
        model = AutoencoderKLWan(**config)
    state = official_to_diffusers(_read_official(path), model.config.num_res_blocks)
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match AutoencoderKLWan: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_autoencoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """From a diffusers directory (``config.json``), a pipeline root (``vae/``) or an official ``.pth``/safetensors."""
    p = Path(path)
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (sub / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json (diffusers layout) and no vae/ subdirectory")
        return AutoencoderKLWan.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True).eval()
    if p.is_file():
        return load_official_vae(str(p)).to(dtype)
    raise FileNotFoundError(f"VAE weights not found: {p}")


# ---------------------------------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------------------------------


class WanVAE:
    """Normalized Wan2.1 VAE. Shapes: video (B, 3, T, H, W) <-> latents (B, 16, 1 + (T - 1) / 4, H / 8, W / 8)."""

    temporal_stride = 4
    spatial_stride = 8

    def __init__(self, vae: AutoencoderKLWan, *, tiling: bool = True, tile_size: int = 256, tile_stride: int = 192):
        self.vae = vae.eval().requires_grad_(False)
        self.z_dim = vae.config.z_dim
        mean = vae.config.latents_mean or WAN_LATENT_MEAN
        std = vae.config.latents_std or WAN_LATENT_STD
        if len(mean) != self.z_dim or len(std) != self.z_dim:
            raise ValueError(f"latent mean/std have {len(mean)}/{len(std)} values for z_dim={self.z_dim}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.temporal_stride = vae.config.scale_factor_temporal or 4
        self.spatial_stride = vae.config.scale_factor_spatial or 8
        vae.enable_slicing()
        if tiling:
            vae.enable_tiling(tile_size, tile_size, tile_stride, tile_stride)

    @classmethod
    def from_config(cls, cfg: Any, device: str | torch.device = "cpu") -> WanVAE:
        """From a ``VAEConfig`` (kind ``wan``)."""
        if cfg.kind != "wan" or not cfg.path:
            raise ValueError(f"vae.kind={cfg.kind!r}, vae.path={cfg.path!r}: WanVAE needs kind=wan and a local path")
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        vae = load_autoencoder(cfg.path, dtype).to(device)
        return cls(vae, tiling=cfg.tiling, tile_size=cfg.tile_size, tile_stride=cfg.tile_stride)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents -> model latents: ``(z - mean) / std`` per channel."""
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model latents -> raw latents: ``x * std + mean``."""
        return x * self.std.to(x.device) + self.mean.to(x.device)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, z_dim, F, H/8, W/8) float32, normalized."""
        if (video.shape[2] - 1) % self.temporal_stride:
            raise ValueError(f"T={video.shape[2]} frames is not of the form {self.temporal_stride}k+1")
        posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        return self.normalize(posterior.mode().float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, F, h, w) normalized -> (B, 3, 1 + 4 (F - 1), 8h, 8w) float32 in [-1, 1]."""
        z = self.denormalize(latents.float()).to(self.device, self.dtype)
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)
