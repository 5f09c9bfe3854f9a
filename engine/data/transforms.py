"""Decoded frames -> model input: resize to cover the target, centre crop, scale to [-1, 1], channels first.

One implementation for both readers (and on the GPU for DALI's decoded frames), so the readers differ only in the
decoder; the geometry is bit-identical by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Frames resized per call: bounds the float32 working set (81 frames of 1280x720 in fp32 would be ~0.9 GB at once).
_CHUNK = 16


def cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """Smallest (h, w) with the source aspect ratio that covers ``height x width``."""
    scale = max(height / src_h, width / src_w)
    return max(height, round(src_h * scale)), max(width, round(src_w * scale))


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``frames`` (T, H, W, 3) uint8 -> (3, T, height, width) float32 in [-1, 1].

    Bilinear with antialiasing (downscales from 720p and above alias otherwise), keeping the aspect ratio so the
    target is covered, then the centre ``height x width`` window.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
    t, src_h, src_w, _ = frames.shape
    rh, rw = cover_size(src_h, src_w, height, width)
    top, left = (rh - height) // 2, (rw - width) // 2
    out = torch.empty(3, t, height, width, dtype=torch.float32, device=frames.device)
    for s in range(0, t, _CHUNK):
        x = frames[s : s + _CHUNK].permute(0, 3, 1, 2).float()  # (t, 3, H, W)
        if (rh, rw) != (src_h, src_w):
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        x = x[:, :, top : top + height, left : left + width]
        out[:, s : s + _CHUNK] = x.permute(1, 0, 2, 3)  # (3, t, h, w)
    return out.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)
