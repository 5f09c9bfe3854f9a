"""The toy world as tensors: latents of every clip through the toy codec, caption embeddings through the toy text
encoder. Both are cheap but not free (decoding 1,024 VP9 files takes ~15 s), so the result is cached next to the
manifest as safetensors, keyed by the codec and encoder settings. The file carries a SHA-256 of its tensors in its
metadata; one that is unreadable (truncated) or whose tensors no longer match it (garbled bytes) is rebuilt, with one
warning, instead of crashing the run or feeding it NaN batches."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.config import ToyWorldConfig
from engine.fsutil import atomic_write
from engine.toy.captions import ClipParams
from engine.toy.codec import ToyCodec
from engine.toy.text import ToyTextEncoder
from engine.toy.videos import to_tensor
from engine.toy.world import ensure_dataset, load_clips, read_manifest

log = logging.getLogger(__name__)

CACHE_KEYS = ("latents", "context")


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
    stored = _load_verified(cache, len(entries))
    if stored is not None:
        return ToyTensors(stored["latents"], stored["context"], captions, params)
    videos, _, _ = load_clips(manifest, split=split)
    with torch.no_grad():
        latents = torch.cat([codec.encode(to_tensor(videos[i : i + 64])) for i in range(0, len(videos), 64)])
    context, _ = text.encode(captions)
    tensors = {"latents": latents.contiguous(), "context": context.contiguous()}
    meta = {"sha256": tensors_digest(tensors)}
    atomic_write(cache, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # unique temp names: ranks race
    return ToyTensors(latents, context, captions, params)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}/{t.dtype}/{tuple(t.shape)}/".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _load_verified(cache: Path, num_entries: int) -> dict[str, torch.Tensor] | None:
    """The cached tensors when the file reads back whole and matches its checksum; None (with one warning when a
    file was there) when it must be built."""
    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        why = f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    else:
        if sorted(stored) != sorted(CACHE_KEYS):
            why = f"missing tensors (has {sorted(stored)})"
        elif meta.get("sha256") != tensors_digest(stored):
            why = "corrupt (its tensors do not match the stored checksum)" if "sha256" in meta else "without checksum"
        elif stored["latents"].shape[0] != num_entries or stored["context"].shape[0] != num_entries:
            why = f"stale ({stored['latents'].shape[0]} clips, the manifest has {num_entries})"
        else:
            return stored
    log.warning("toy tensor cache %s is %s: rebuilding it", cache, why)
    return None
