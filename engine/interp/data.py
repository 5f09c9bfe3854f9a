"""Latent sources for interpolator training: endless, resumable streams of this rank's (B, C, F, H, W) batches.

The protocol is the one of ``engine.data.source``: ``__iter__`` yields float32 batches, ``state_dict()`` is the
position after the last yielded batch and ``load_state_dict`` restores it before the next ``iter``. Samples follow
``engine.data.sampler.ShardedOrder`` (seeded per-epoch shuffle, rank ``r`` takes ``perm[r::world]``), so on ``W`` ranks
with ``B / W`` samples each the union of one step's batches is the global batch a single process with ``B`` would see.

- :class:`DirectoryLatents`: every ``*.safetensors`` under a directory holding ``latents`` (C, F, H, W) or
  (N, C, F, H, W) (the project's latent cache shards qualify; a cache dir with ``latents/index.json`` is read with
  ``engine.data.source.CacheDataset`` instead, see :func:`open_latents`). Unusable files are skipped, logged, counted.
- :class:`EncodedLatents`: online, video-reader batches encoded by a codec (the VAE).
- :class:`SyntheticLatents`: smooth moving patterns (travelling waves), for tests and smoke runs.
"""

from __future__ import annotations

import abc
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import safe_open

from engine.data.sampler import Position, ShardedOrder

logger = logging.getLogger("engine.interp")


@runtime_checkable
class LatentSource(Protocol):
    def __iter__(self) -> Iterator[torch.Tensor]: ...  # (B, C, F, H, W) float32

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Ordered(abc.ABC):
    """Shared part of the indexed sources: ShardedOrder over ``num_samples`` and batching of ``sample(i)``."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.order = ShardedOrder(num_samples, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        self._pos = Position()

    @abc.abstractmethod
    def sample(self, index: int) -> torch.Tensor | None:
        """Sample ``index`` as (C, F, H, W), or None to skip it."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        buf: list[torch.Tensor] = []
        for item in self.order.items(self._pos):
            x = self.sample(item.index)
            if x is None:
                continue
            buf.append(x)
            if len(buf) == self.batch_size:
                self._pos = item.after
                yield torch.stack(buf)  # (B, C, F, H, W)
                buf = []

    def state_dict(self) -> dict[str, Any]:
        return self.order.state(self._pos)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pos = self.order.position_from(state)


class TensorLatents(_Ordered):
    """Latents held in memory, (N, C, F, H, W): the toy world's whole dataset fits in a few tens of MB."""

    def __init__(
        self,
        latents: torch.Tensor,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__(latents.shape[0], batch_size, rank, world_size, seed, shuffle)
        self.latents = latents

    def sample(self, index: int) -> torch.Tensor:
        return self.latents[index]


class SyntheticLatents(_Ordered):
    """Smooth moving patterns: per sample, K travelling plane waves with one shared velocity, mixed to C channels.

    ``x[c, f, h, w] = sum_k M[c, k] sin(2 pi (fy_k (h - vy f) + fx_k (w - vx f)) + phi_k)``, ``M ~ N(0, 2 / K)``, with
    wavelengths of 8-32 latent cells (|f| in [1/32, 1/8] cycles per cell) and |v| up to ``max_speed`` cells per frame.
    A linear blend of frames f - 1 and f + 1 is off by the motion, a motion-aware interpolator is not; with
    ``max_speed <= 1`` the kept frames are at most a quarter wavelength apart, so the middle frame is not ambiguous
    (no temporal aliasing). Sample ``i`` is a pure function of ``(seed, i)``; ~unit variance, like normalized latents.
    """

    def __init__(
        self,
        channels: int,
        frames: int,
        height: int,
        width: int,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_samples: int = 1 << 20,
        waves: int = 4,
        max_speed: float = 1.0,
    ):
        super().__init__(num_samples, batch_size, rank, world_size, seed, shuffle=False)
        self.shape, self.seed, self.waves, self.max_speed = (channels, frames, height, width), seed, waves, max_speed

    def sample(self, index: int) -> torch.Tensor:
        c, f, h, w = self.shape
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
        k = self.waves
        freq = torch.rand(k, 2, generator=g) * (1 / 8 - 1 / 32) + 1 / 32  # cycles per cell, (K, 2) = (fy, fx)
        freq = freq * torch.sign(torch.rand(k, 2, generator=g) - 0.5)
        vel = (torch.rand(2, generator=g) * 2 - 1) * self.max_speed  # (vy, vx) cells per frame
        phase = torch.rand(k, generator=g) * 2 * torch.pi
        mix = torch.randn(c, k, generator=g) * (2.0 / k) ** 0.5
        t = torch.arange(f, dtype=torch.float32)[:, None, None]  # (F, 1, 1)
        yy = torch.arange(h, dtype=torch.float32)[None, :, None] - vel[0] * t  # (F, H, 1)
        xx = torch.arange(w, dtype=torch.float32)[None, None, :] - vel[1] * t  # (F, 1, W)
        arg = freq[:, 0, None, None, None] * yy + freq[:, 1, None, None, None] * xx  # (K, F, H, W)
        waves = torch.sin(2 * torch.pi * arg + phase[:, None, None, None])  # (K, F, H, W)
        return torch.einsum("ck,kfhw->cfhw", mix, waves)  # (C, F, H, W)


class DirectoryLatents(_Ordered):
    """Samples from every ``*.safetensors`` under ``root`` (recursive, sorted) with a ``key`` tensor of shape
    (C, F, H, W) or (N, C, F, H, W). Headers are read up front; a file that cannot be opened, lacks the key, has another
    rank or a shape differing from the first usable file is skipped with a logged, counted reason (``skips``)."""

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        key: str = "latents",
    ):
        self.root, self.key, self.skips = Path(root), key, Counter()
        if not self.root.is_dir():
            raise FileNotFoundError(f"latent directory not found: {self.root}")
        self.rows: list[tuple[Path, int | None]] = []
        self.sample_shape: tuple[int, ...] | None = None
        for path in sorted(self.root.rglob("*.safetensors")):
            self._index(path)
        if not self.rows:
            raise ValueError(f"{self.root}: no usable latents (skipped: {dict(self.skips) or 'no *.safetensors'})")
        super().__init__(len(self.rows), batch_size, rank, world_size, seed, shuffle)

    def _skip(self, path: Path, reason: str, detail: str) -> None:
        self.skips[reason] += 1
        logger.warning("skipped latent file %s: %s: %s", path, reason, detail)

    def _index(self, path: Path) -> None:
        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
                if self.key not in keys:
                    return self._skip(path, "missing_key", f"no tensor {self.key!r} (has {sorted(keys)[:5]})")
                shape = tuple(f.get_slice(self.key).get_shape())
        except Exception as exc:  # safetensors raises several types for a damaged header
            return self._skip(path, "unreadable", str(exc))
        if len(shape) not in (4, 5):
            return self._skip(
                path, "bad_shape", f"{self.key} has shape {shape}, expected (C, F, H, W) or (N, C, F, H, W)"
            )
        one = shape[-4:]
        if self.sample_shape is not None and one != self.sample_shape:
            return self._skip(path, "shape_mismatch", f"sample shape {one} != {self.sample_shape} of earlier files")
        self.sample_shape = one
        self.rows += [(path, None)] if len(shape) == 4 else [(path, i) for i in range(shape[0])]

    def sample(self, index: int) -> torch.Tensor | None:
        path, row = self.rows[index]
        try:
            with safe_open(str(path), "pt") as f:
                x = f.get_tensor(self.key) if row is None else f.get_slice(self.key)[row : row + 1][0]
        except Exception as exc:  # a file damaged after indexing: skip the sample, keep training
            self._skip(path, "unreadable", str(exc))
            return None
        return x.float()


class DictLatents:
    """The ``latents`` of an ``engine.data.source`` batch stream (CacheDataset or OnlineSource)."""

    def __init__(self, source: Any):
        self.source = source

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.source:
            yield batch["latents"].float()

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


class EncodedLatents:
    """Online: video batches ``{"video": (B, 3, T, H, W)}`` from a reader, encoded by a codec (``VideoCodec``)."""

    def __init__(self, reader: Any, codec: Any, device: str | torch.device = "cpu"):
        self.reader, self.codec, self.device = reader, codec, device

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.reader:
            with torch.no_grad():
                yield self.codec.encode(batch["video"].to(self.device)).float()  # (B, C, F, h, w)

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state)


def open_latents(
    path: str | Path, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
) -> LatentSource:
    """A precompute cache (``<path>/latents/index.json``) via CacheDataset, else a directory of safetensors files."""
    path = Path(path)
    if (path / "latents" / "index.json").is_file():
        from engine.data.source import CacheDataset

        cache = CacheDataset(
            path,
            kinds=("latents",),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=shuffle,
        )
        return DictLatents(cache)
    return DirectoryLatents(path, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)


def online_latents(
    cfg: Any, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, device: str | torch.device = "cpu"
) -> EncodedLatents:
    """Decode ``cfg.data.manifest`` with the configured reader and encode with the world's codec (engine.worlds)."""
    from engine.data.manifest import load_manifest
    from engine.data.reader import build_reader
    from engine.worlds import build_world

    if cfg.data.manifest is None:
        raise ValueError("config key `data.manifest` is required for online latents")
    entries = load_manifest(cfg.data.manifest, cfg.data.root).entries
    reader = build_reader(entries, cfg.data, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    return EncodedLatents(reader, build_world(cfg, device).codec, device)
