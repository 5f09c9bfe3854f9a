"""The toy world as tensors: latents of every clip through the toy codec, caption embeddings through the toy text
encoder. Both are cheap but not free (decoding 1,024 VP9 files takes ~15 s), so the result is cached next to the
manifest as safetensors, keyed by the codec and encoder settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config import ToyWorldConfig
from engine.fsutil import atomic_write
from engine.toy.captions import ClipParams
from engine.toy.codec import ToyCodec
from engine.toy.text import ToyTextEncoder
from engine.toy.videos import to_tensor
from engine.toy.world import ensure_dataset, load_clips, read_manifest


@dataclass
class ToyTensors:
    latents: torch.Tensor
    """(N, C, F, h, w) normalized latents."""
    context: torch.Tensor
    """(N, L, D) caption embeddings (zero rows past each caption)."""
    captions: list[str]
    params: list[ClipParams]


def _key(codec: ToyCodec, text: ToyTextEncoder, split: str) -> str:
    h = hashlib.sha256()
    for buf in (codec.mean, codec.basis, codec.scale):
        h.update(buf.numpy().tobytes())
    h.update(f"{text.dim}/{text.max_length}/{split}".encode())
    return h.hexdigest()[:16]


def toy_tensors(cfg: ToyWorldConfig, codec: ToyCodec, text: ToyTextEncoder, split: str = "train") -> ToyTensors:
    """Latents and caption embeddings of one split of the toy dataset (generated on first use)."""
    manifest = Path(ensure_dataset(cfg, progress=False))
    entries = [e for e in read_manifest(manifest) if e["split"] == split]
    if not entries:
        raise ValueError(f"{manifest}: no clips in split {split!r}")
    captions = [e["caption"] for e in entries]
    params = [ClipParams.from_dict(e["params"]) for e in entries]
    cache = manifest.parent / f"tensors-{_key(codec, text, split)}.safetensors"
    if cache.is_file():
        stored = load_file(str(cache))
        if stored["latents"].shape[0] == len(entries):
            return ToyTensors(stored["latents"], stored["context"], captions, params)
    videos, _, _ = load_clips(manifest, split=split)
    with torch.no_grad():
        latents = torch.cat([codec.encode(to_tensor(videos[i : i + 64])) for i in range(0, len(videos), 64)])
    context, _ = text.encode(captions)
    tensors = {"latents": latents.contiguous(), "context": context.contiguous()}
    atomic_write(cache, lambda tmp: save_file(tensors, str(tmp)))  # unique temp names: several ranks may build it
    return ToyTensors(latents, context, captions, params)
