"""Latent frame-interpolation U-Net (paper Sec. 3.4 and appendix 8; docs/method.md#interpolator).

Input: two adjacent latent frames concatenated on channels, (N, 2C, H, W). Output: the C-channel middle frame.
Three encoder ConvBlocks, each followed by a 2x2 max-pool; per decoder level a 2x2 stride-2 transposed conv, a skip
concatenation and a ConvBlock; a final 1x1 conv. ``interpolate`` turns F frames into 2F - 1 (11 -> 21) with all
F - 1 pairs in one batched call.

Choices the paper leaves open (ours, with the reason):
- Normalization: LayerNorm over channels at each pixel (no running statistics, no batch or spatial dependence) + SiLU.
  A fused "3x3 conv + norm + activation" implicit-GEMM kernel computes a tile of pixels x all output channels, so the
  norm is a row reduction in the epilogue. GroupNorm would need a spatial reduction across tiles; BatchNorm keeps
  running statistics that differ between data-parallel ranks.
- Sizes pooling does not divide (60x104 -> 30x52 -> 15x26 -> 8x13; odd sizes; 1x1): ceil-mode pooling (a partial
  window takes the max of its valid cells) and each upsampled map is cropped to its skip's size. No padding, so no
  border artifacts and no wasted work.
- Residual: the network predicts a correction to the average of the two frames, and the final conv starts at zero,
  so an untrained interpolator is exactly the linear blend (the baseline it has to beat); static regions, where the
  blend is already right, need no learned output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from engine.fsutil import fix_mode
from kernels._dispatch import use_triton
from kernels.interp_unet import conv_norm_act, interp_head, pair_conv_norm_act

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "interp_unet"


class InterpolatorError(ValueError):
    """An interpolator that cannot be used here (missing files, missing keys, wrong channel count)."""


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every pixel of (N, C, H, W), with a per-channel affine."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)  # (N, H, W, C)
        return y.permute(0, 3, 1, 2)  # (N, C, H, W)


class ConvNormAct(nn.Module):
    """3x3 conv -> per-pixel channel LayerNorm -> SiLU: the unit one fused implicit-GEMM kernel computes at inference
    (``fused_interpolate``)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.norm = ChannelLayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class ConvBlock(nn.Sequential):
    """Two ConvNormAct layers (c_in -> c_out -> c_out)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(ConvNormAct(c_in, c_out), ConvNormAct(c_out, c_out))


class UpLevel(nn.Module):
    """Transposed-conv 2x upsampling, crop to the skip's size, concatenate the skip, ConvBlock."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.block = ConvBlock(c_out + c_skip, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h, w = skip.shape[-2:]
        up = self.up(x)[..., :h, :w]  # ceil-mode pooling made the coarse map cover the skip; drop the overhang
        return self.block(torch.cat([up, skip], dim=1))


class InterpUNet(nn.Module):
    """Middle latent frame from a pair: ``forward((N, 2C, H, W)) -> (N, C, H, W)``; any H, W >= 1."""

    def __init__(
        self,
        in_channels: int = 16,
        channels: tuple[int, int, int] | list[int] = (64, 128, 256),
        *,
        residual: bool = True,
    ):
        super().__init__()
        if in_channels < 1 or len(channels) != 3 or min(channels) < 1:
            raise InterpolatorError(f"need in_channels >= 1 and three positive widths, got {in_channels}, {channels}")
        c1, c2, c3 = (int(c) for c in channels)
        self.in_channels, self.channels, self.residual = in_channels, (c1, c2, c3), residual
        self.enc = nn.ModuleList([ConvBlock(2 * in_channels, c1), ConvBlock(c1, c2), ConvBlock(c2, c3)])
        self.dec = nn.ModuleList([UpLevel(c3, c3, c3), UpLevel(c3, c2, c2), UpLevel(c2, c1, c1)])
        self.out = nn.Conv2d(c1, in_channels, kernel_size=1)
        if residual:  # start exactly at the linear blend (see the module docstring)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "in_channels": self.in_channels,
            "channels": list(self.channels),
            "residual": self.residual,
        }

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """pairs: (N, 2C, H, W) = [frame a; frame b] on channels -> middle frame (N, C, H, W)."""
        if pairs.ndim != 4 or pairs.shape[1] != 2 * self.in_channels:
            raise InterpolatorError(
                f"pairs must be (N, {2 * self.in_channels}, H, W) (two {self.in_channels}-channel frames), "
                f"got {tuple(pairs.shape)}"
            )
        x, skips = pairs, []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, kernel_size=2, ceil_mode=True)  # (N, c, ceil(H/2), ceil(W/2))
        for level, skip in zip(self.dec, reversed(skips)):
            x = level(x, skip)
        delta = self.out(x).to(pairs.dtype)  # (N, C, H, W)
        if not self.residual:
            return delta
        a, b = pairs.chunk(2, dim=1)  # (N, C, H, W) each
        return 0.5 * (a + b) + delta

    def interpolate(self, latents: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, C, 2F - 1, H, W): originals at even indices, generated frames between them.

        fused: when no gradient is needed (no_grad, or nothing requires grad), run ``fused_interpolate`` (the fused
        inference ops: Triton on CUDA or with VIDISTILL_KERNELS=triton, this torch path otherwise).
        """
        check_latents(latents, self.in_channels)
        b, c, f, h, w = latents.shape
        if f == 1:
            return latents.clone()
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (latents, *self.parameters()))
        if fused and not needs_grad:  # the kernels are forward only; training keeps the torch path
            return fused_interpolate(self, latents)
        mid = self(frame_pairs(latents))  # (B * (F - 1), C, H, W)
        mid = mid.view(b, f - 1, c, h, w).transpose(1, 2)  # (B, C, F - 1, H, W)
        out = latents.new_empty(b, c, 2 * f - 1, h, w)
        out[:, :, 0::2] = latents
        out[:, :, 1::2] = mid
        return out


def _unit_args(unit: ConvNormAct) -> tuple:
    """(weight, bias, ln_weight, ln_bias, eps) of a ConvNormAct: what the fused ops take for it."""
    return unit.conv.weight, unit.conv.bias, unit.norm.weight, unit.norm.bias, unit.norm.eps


def fused_interpolate(model: InterpUNet, latents: torch.Tensor) -> torch.Tensor:
    """``model.interpolate(latents)`` with the fused inference ops: (B, C, F, H, W) -> (B, C, 2F - 1, H, W).

    Forward only (raises if a gradient would be needed). Triton on CUDA tensors (or when forced by
    VIDISTILL_KERNELS=triton), the model's torch path otherwise. latents must have the parameters' dtype.
    The 12 ConvNormAct units are 12 launches (kernels/interp_unet.py): the first reads the frame pairs straight from
    the latent (pair_conv_norm_act), the first unit of encoder levels 2 and 3 max-pools on load and each decoder
    level's first unit concatenates [cropped upsampled map; skip] on load (conv_norm_act), and the last unit also
    runs the 1x1 conv, the residual and the interleaving (interp_head). The max-pool at the bottom and the
    transposed convs run in torch.
    """
    params = list(model.parameters())
    if not use_triton(latents, *params):
        return model.interpolate(latents, fused=False)
    if latents.ndim != 5 or latents.shape[2] < 1:
        raise InterpolatorError(f"latents must be (B, C, F, H, W) with F >= 1, got {tuple(latents.shape)}")
    if latents.shape[1] != model.in_channels or latents.dtype != params[0].dtype:
        raise InterpolatorError(
            f"latents {tuple(latents.shape)} {latents.dtype} do not fit the interpolator "
            f"({model.in_channels} channels, {params[0].dtype})"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (latents, *params)):
        raise InterpolatorError(
            "the fused interpolation U-Net kernels are forward only: call them under torch.no_grad() (training "
            "uses the model's torch path)"
        )
    if latents.shape[2] == 1:
        return latents.clone()
    x = pair_conv_norm_act(latents, *_unit_args(model.enc[0][0]))  # (N, c1, H, W), N = B (F - 1)
    skips = [conv_norm_act(x, *_unit_args(model.enc[0][1]))]
    for block in model.enc[1:]:
        x = conv_norm_act(skips[-1], *_unit_args(block[0]), pool=True)  # (N, c, ceil(h / 2), ceil(w / 2))
        skips.append(conv_norm_act(x, *_unit_args(block[1])))
    x = F.max_pool2d(skips[-1], kernel_size=2, ceil_mode=True)  # the bottom: read by a transposed conv
    for level, skip in zip(model.dec, reversed(skips)):
        h, w = skip.shape[-2:]
        up = F.conv_transpose2d(x, level.up.weight, level.up.bias, stride=2)[..., :h, :w]  # crop: a view
        x = conv_norm_act(up, *_unit_args(level.block[0]), skip=skip)  # (N, c, h, w): concatenated on load
        if level is not model.dec[-1]:
            x = conv_norm_act(x, *_unit_args(level.block[1]))
    return interp_head(
        x, *_unit_args(model.dec[-1].block[1]), model.out.weight, model.out.bias, latents, model.residual
    )


def frame_pairs(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B * (F - 1), 2C, H, W): every adjacent pair [frame i; frame i + 1], batch-major."""
    a, b = latents[:, :, :-1], latents[:, :, 1:]  # (B, C, F - 1, H, W) each
    pairs = torch.cat([a, b], dim=1).transpose(1, 2)  # (B, F - 1, 2C, H, W)
    return pairs.reshape(-1, pairs.shape[2], *latents.shape[-2:])


def check_latents(latents: torch.Tensor, channels: int) -> None:
    if latents.ndim != 5:
        raise InterpolatorError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
    if latents.shape[1] != channels:
        raise InterpolatorError(f"latents have {latents.shape[1]} channels, the interpolator expects {channels}")


def check_halvable(num_frames: int) -> int:
    """Frames at half rate for a latent of ``num_frames`` (F -> (F + 1) / 2 -> 2 (F + 1) / 2 - 1 = F); F must be odd."""
    if num_frames < 1 or num_frames % 2 == 0:
        raise InterpolatorError(
            f"{num_frames} latent frames cannot be halved and interpolated back: keeping every other frame and "
            f"interpolating gives 2 * ceil(F / 2) - 1 frames, which equals F only for odd F (e.g. 21 -> 11 -> 21)"
        )
    return (num_frames + 1) // 2


def drop_frames(latents: torch.Tensor) -> torch.Tensor:
    """Keep every other frame: (B, C, F, H, W) -> (B, C, (F + 1) / 2, H, W); F must be odd."""
    if latents.ndim != 5:
        raise InterpolatorError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
    check_halvable(latents.shape[2])
    return latents[:, :, ::2]


def check_channels(interp_channels: int, model_in_dim: int) -> None:
    """The interpolator works in the student's latent space: its channel count must be the student's in_dim."""
    if interp_channels != model_in_dim:
        raise InterpolatorError(
            f"interpolator has {interp_channels} latent channels but the student's model.in_dim is {model_in_dim}: "
            f"they must work in the same latent space"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Save / load: model.safetensors + config.json
# ---------------------------------------------------------------------------------------------------------------------


def save_interpolator(model: InterpUNet, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json``; temporary names first, so a crash leaves no half export."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_c = out_dir / f".{WEIGHTS_NAME}.tmp", out_dir / f".{CONFIG_NAME}.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    fix_mode(tmp_w)  # safetensors writes 0600 whatever the umask
    tmp_c.write_text(json.dumps(model.config(), indent=2))
    tmp_w.replace(out_dir / WEIGHTS_NAME)
    tmp_c.replace(out_dir / CONFIG_NAME)
    return out_dir


def read_interpolator_config(path: str | Path) -> dict:
    """The config.json of an exported interpolator (cheap: no weights are read)."""
    path = Path(path)
    if not path.is_dir():
        raise InterpolatorError(f"interpolator directory not found: {path}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise InterpolatorError(
                f"{path}: missing {name} (an interpolator export holds {CONFIG_NAME} + {WEIGHTS_NAME})"
            )
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise InterpolatorError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from exc
    missing = [k for k in ("in_channels", "channels") if k not in cfg]
    if cfg.get("format") != FORMAT or missing:
        raise InterpolatorError(
            f"{path / CONFIG_NAME} is not an {FORMAT} config (format={cfg.get('format')!r}, missing {missing})"
        )
    return cfg


def load_interpolator(
    path: str | Path, in_channels: int | None = None, device: torch.device | str = "cpu"
) -> InterpUNet:
    """Load an export. ``in_channels``: the student's ``model.in_dim``, checked before any weight is read."""
    cfg = read_interpolator_config(path)
    if in_channels is not None:
        check_channels(cfg["in_channels"], in_channels)
    model = InterpUNet(cfg["in_channels"], cfg["channels"], residual=cfg.get("residual", True))
    expected = model.state_dict()
    with safe_open(str(Path(path) / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or unexpected:
            raise InterpolatorError(
                f"{path}: weights do not match config.json: missing keys {missing[:10]} "
                f"({len(missing)}), unexpected keys {unexpected[:10]} ({len(unexpected)})"
            )
        state = {k: f.get_tensor(k) for k in expected}
    bad = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape
    ]
    if bad:
        raise InterpolatorError(f"{path}: weight shapes do not match config.json: {bad[:5]}")
    model.load_state_dict(state)
    return model.to(device).eval()
