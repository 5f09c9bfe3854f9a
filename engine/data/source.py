"""What the trainer iterates: batches of latents and text embeddings, from the caches or encoded online.

Both sources yield the same dict and share the reader's sharding and resume semantics (``ShardedOrder``)::

    {"latents": (B, C, F, h, w) float32,          # only when "latents" is requested
     "text_emb": (B, max_length, dim) float32,    # zero rows past text_len
     "text_len": (B,) int64, "caption": list[str], "index": (B,) int64}

``data.source=cache`` reads ``launcher/precompute.py``'s shards (:class:`CacheDataset`); ``online`` decodes with the
video reader and encodes with the VAE and text encoder in the loop (:class:`OnlineSource`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.data.cache import CacheError, read_index
from engine.data.sampler import Position, ShardedOrder

_MAX_OPEN = 64  # shard files kept open: a large cache has thousands, more than a process may open


class CacheDataset:
    """Batches from precomputed caches: the manifest rows present in every requested kind (``text``, ``latents``)."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        kinds: Sequence[str] = ("latents", "text"),
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: Optional[int] = None,
        max_length: Optional[int] = None,
    ):
        self.cache_dir, self.kinds, self.batch_size, self.num_epochs = (
            Path(cache_dir),
            tuple(kinds),
            batch_size,
            num_epochs,
        )
        self._where: dict[str, dict[int, tuple[str, int]]] = {k: self._locate(k) for k in self.kinds}
        common = set.intersection(*(set(w) for w in self._where.values()))
        self.indices = sorted(common)
        if not self.indices:
            raise CacheError(f"{self.cache_dir}: no manifest row is present in every cache of {self.kinds}")
        self.max_length = max_length or (read_index(self.cache_dir, "text") or {}).get("max_length")
        self.order = ShardedOrder(len(self.indices), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        self._pos = Position()
        self._files: dict[str, Any] = {}
        self._caption_cache: dict[str, list[str]] = {}

    def _locate(self, kind: str) -> dict[int, tuple[str, int]]:
        index = read_index(self.cache_dir, kind)
        if index is None:
            raise CacheError(f"{self.cache_dir / kind}/index.json not found: run launcher/precompute.py first")
        where = {}
        for shard in index["shards"]:
            for row, i in enumerate(shard["index"]):
                where[int(i)] = (str(self.cache_dir / kind / shard["file"]), row)
        return where

    def _file(self, path: str):
        """An open shard (memory-mapped; rows are read lazily), at most ``_MAX_OPEN`` kept open."""
        handle = self._files.pop(path, None) or safe_open(path, "pt")
        self._files[path] = handle  # most recently used last
        if len(self._files) > _MAX_OPEN:
            del self._files[next(iter(self._files))]
        return handle

    def _row(self, kind: str, name: str, index: int) -> torch.Tensor:
        path, row = self._where[kind][index]
        return self._file(path).get_slice(name)[row : row + 1][0]

    def _sample(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if "latents" in self.kinds:
            out["latents"] = self._row("latents", "latents", index).float()
        if "text" in self.kinds:
            emb = self._row("text", "emb", index).float()  # (L_shard, dim), trimmed at write time
            length = int(self._row("text", "lengths", index))
            pad = (self.max_length or emb.shape[0]) - emb.shape[0]
            out["text_emb"], out["text_len"] = F.pad(emb, (0, 0, 0, pad)), length
            path, row = self._where["text"][index]
            out["caption"] = self._captions(path)[row]
        return out

    def _captions(self, path: str) -> list[str]:
        if path not in self._caption_cache:
            self._caption_cache[path] = json.loads(self._file(path).metadata()["captions"])
        return self._caption_cache[path]

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}
        if "latents" in self.kinds:
            batch["latents"] = torch.stack([s["latents"] for s in samples])  # (B, C, F, h, w)
        if "text" in self.kinds:
            batch["text_emb"] = torch.stack([s["text_emb"] for s in samples])  # (B, L, dim)
            batch["text_len"] = torch.tensor([s["text_len"] for s in samples], dtype=torch.int64)
            batch["caption"] = [s["caption"] for s in samples]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buf: list[dict[str, Any]] = []
        for item in self.order.items(self._pos, self.num_epochs):
            buf.append(self._sample(self.indices[item.index]))
            if len(buf) == self.batch_size or (item.last_of_epoch and item.epoch + 1 == self.num_epochs):
                self._pos = item.after
                yield self._collate(buf)
                buf = []

    def state_dict(self) -> dict[str, Any]:
        return self.order.state(self._pos)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pos = self.order.position_from(state)


class OnlineSource:
    """Video reader batches encoded in the loop: VAE latents and text embeddings, same dict as :class:`CacheDataset`."""

    def __init__(self, reader: Any, codec: Any, text_encoder: Any, *, device: str | torch.device = "cpu"):
        self.reader, self.codec, self.text_encoder, self.device = reader, codec, text_encoder, device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.reader:
            emb, lengths = self.text_encoder.encode(batch["caption"])
            yield {
                "latents": self.codec.encode(batch["video"].to(self.device, non_blocking=True)),
                "text_emb": emb,
                "text_len": lengths,
                "caption": batch["caption"],
                "index": batch["index"],
            }

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state)


def build_source(
    data_cfg: Any,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    codec: Any = None,
    text_encoder: Any = None,
    device: str | torch.device = "cpu",
    kinds: Sequence[str] = ("latents", "text"),
) -> CacheDataset | OnlineSource:
    """The trainer's data source from a ``DataConfig``: ``source=cache`` or ``online`` (needs codec and encoder)."""
    if data_cfg.source == "cache":
        return CacheDataset(
            data_cfg.cache_dir,
            kinds=kinds,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=data_cfg.shuffle,
        )
    from engine.data.manifest import load_manifest
    from engine.data.reader import build_reader

    if codec is None or text_encoder is None:
        raise ValueError("data.source=online needs a codec (VAE) and a text encoder")
    manifest = load_manifest(data_cfg.manifest, data_cfg.root)
    reader = build_reader(
        manifest.entries, data_cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed
    )
    return OnlineSource(reader, codec, text_encoder, device=device)
