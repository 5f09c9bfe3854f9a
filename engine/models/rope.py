"""3D rotary position embedding of Wan2.1 (docs/wan.md#3d-rope).

head_dim Dh is split into complex pairs for (frame, height, width): Dh/2 pairs = (Dh/2 - 2(Dh//6)) + (Dh//6) + (Dh//6)
(22 + 21 + 21 for Dh = 128). Along an axis with d real dims, pair j rotates by pos * theta^(-2j/d). Angles are built
in float64 (as the official code does) and returned as fp32 cos/sin tables, one row per token in (f, h, w) order.
"""

from __future__ import annotations

import functools

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to (frame, height, width): (Dh - 4(Dh//6), 2(Dh//6), 2(Dh//6))."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """(P,) positions -> (P, dim // 2) float64 angles pos * theta^(-2j/dim)."""
    j = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2]
    freqs = theta ** (-j / dim)
    return positions.to(torch.float64)[:, None] * freqs[None, :]


def rope_tables(
    grid: tuple[int, int, int],
    head_dim: int,
    *,
    max_seq_len: int = 1024,
    theta: float = 10000.0,
    frame_positions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (F * H * W, head_dim // 2), fp32, for a token grid (F, H, W). Cached per shape.

    frame_positions: optional (F,) integer positions along time (default 0..F-1); the half-frame-rate sampler can pass
    the stride-2 positions of the kept frames.
    """
    positions = None if frame_positions is None else tuple(int(p) for p in frame_positions)
    return _cached_tables(tuple(grid), head_dim, max_seq_len, theta, positions, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _cached_tables(grid, head_dim, max_seq_len, theta, positions, device):
    pos = None if positions is None else torch.tensor(positions, dtype=torch.long)
    return _build_tables(grid, head_dim, max_seq_len, theta, pos, device)


def _build_tables(grid, head_dim, max_seq_len, theta, frame_positions, device):
    f, h, w = grid
    if frame_positions is None:
        frame_positions = torch.arange(f, device=device)
    if frame_positions.shape != (f,):
        raise ValueError(f"frame_positions must have shape ({f},), got {tuple(frame_positions.shape)}")
    top = max(int(frame_positions.max()) + 1 if f else 0, h, w)
    if top > max_seq_len:
        raise ValueError(f"token grid {grid} (frame positions up to {top - 1}) exceeds rope_max_seq_len={max_seq_len}")
    dt, dh, dw = axis_dims(head_dim)
    at = _axis_angles(frame_positions.to(device), dt, theta)  # (F, dt/2)
    ah = _axis_angles(torch.arange(h, device=device), dh, theta)  # (H, dh/2)
    aw = _axis_angles(torch.arange(w, device=device), dw, theta)  # (W, dw/2)
    angles = torch.cat(
        [
            at[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)  # (N, Dh/2), token order (f, h, w) row-major
    return angles.cos().float(), angles.sin().float()


def shard_tables(cos: torch.Tensor, sin: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of tokens ``start .. stop - 1`` of (N, Dh/2) cos, sin tables: the RoPE positions of one
    sequence-parallel shard, which keep their place in the whole grid. Rows past N (padding tokens of the last
    shards) get the identity rotation (cos 1, sin 0); those tokens are never attended to."""
    n = cos.shape[0]
    pad = max(0, stop - max(start, n))
    c, s = cos[min(start, n) : min(stop, n)], sin[min(start, n) : min(stop, n)]
    if pad:
        c = torch.cat([c, c.new_ones(pad, c.shape[1])])
        s = torch.cat([s, s.new_zeros(pad, s.shape[1])])
    return c.contiguous(), s.contiguous()
