"""Cache building for ``launcher/precompute.py``: text embeddings and/or latents of a manifest, rank-parallel.

Each rank writes its own shards (``cache.rank_shards``) and skips those already on disk, so the same command resumes
a killed run, and runs on any number of ranks (``RANK``/``WORLD_SIZE`` from torchrun, or given). The rank that
finishes last finds every shard present and writes ``index.json``; earlier ranks log that they wait for the others.
Rank 0 also stores the negative prompt's embedding (``text/negative.safetensors``), which training from the cache uses
for classifier-free guidance without loading the text encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from engine.config import ConfigError
from engine.data.cache import (
    precompute_latents,
    precompute_text,
    rank_shards,
    shard_path,
    write_index,
    write_negative,
)
from engine.data.manifest import ManifestEntry, load_manifest
from engine.worlds import build_world, kind_of
from engine.worlds.prompts import read_prompt_file
from engine.worlds.wan import _need_path

logger = logging.getLogger("engine.data")


def _fingerprints(cfg: Any, manifest_path: str, num_entries: int, shard_size: dict[str, int]) -> dict[str, dict]:
    d, te, vae = cfg.data, cfg.text_encoder, cfg.vae
    common = {"manifest": os.path.abspath(manifest_path), "num_entries": num_entries}
    return {
        "text": {
            **common,
            "model": os.path.abspath(te.path or ""),
            "max_length": te.max_length,
            "shard_size": shard_size["text"],
        },
        "latents": {
            **common,
            "model": os.path.abspath(vae.path or ""),
            "num_frames": d.num_frames,
            "fps": d.fps,
            "height": d.height,
            "width": d.width,
            "shard_size": shard_size["latents"],
        },
    }


def _try_index(cache_dir: str, kind: str, num_entries: int, shard_size: int) -> bool:
    """Write the index once every shard exists; while other ranks still write theirs, say so (nothing to re-run)."""
    num_shards = -(-num_entries // shard_size)
    missing = [k for k in range(num_shards) if not shard_path(cache_dir, kind, k).exists()]
    if missing:
        logger.info(
            "%s cache: %d of %d shards still being written by other ranks; the last rank to finish writes the index",
            kind, len(missing), num_shards,
        )  # fmt: skip
        return False
    write_index(cache_dir, kind, num_entries, shard_size)  # a CacheError here names data.cache_dir (launcher)
    return True


def _say_if_idle(kind: str, num_entries: int, shard_size: int, rank: int, world_size: int) -> None:
    if not rank_shards(num_entries, shard_size, rank, world_size):
        num_shards = -(-num_entries // shard_size)
        logger.info(
            "%s cache: rank %d has no shard to write (%d shards for %d ranks)", kind, rank, num_shards, world_size
        )


def _check_models(cfg: Any, kinds: Sequence[str]) -> None:
    """The encoders precompute loads exist (errors name the key), before any model is loaded."""
    if kind_of(cfg) != "wan":
        return  # the toy world's encoders are built, not loaded
    if "text" in kinds:
        _need_path(cfg.text_encoder.path, "text_encoder.path", "precompute encodes the captions with umT5")
    if "latents" in kinds:
        _need_path(cfg.vae.path, "vae.path", "precompute encodes the clips with the Wan VAE")


def _read_manifest(d: Any):
    """The manifest precompute reads, with errors that name the config key."""
    for key, value in (("data.manifest", d.manifest), ("data.cache_dir", d.cache_dir)):
        if not value:
            raise ConfigError(f"config key `{key}`: required (precompute reads data.manifest into data.cache_dir)")
    if not Path(d.manifest).is_file():
        raise ConfigError(f"config key `data.manifest`: {d.manifest} is not a file (set it to the clips' manifest)")
    manifest = load_manifest(d.manifest, d.root)
    if not manifest.entries:
        raise ConfigError(f"config key `data.manifest`: {d.manifest} has no usable row ({manifest.skipped.summary()})")
    return manifest


def select_device(requested: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> torch.device:
    """The device of this precompute rank: ``requested`` (``--device``; a bare ``cuda`` takes the rank's GPU), else
    ``cuda:<LOCAL_RANK>`` when CUDA is present, else the CPU. Under torchrun every rank thus gets its own GPU."""
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_RANK", 0))
    if requested:
        dev = torch.device(requested)
        dev = torch.device("cuda", local) if dev.type == "cuda" and dev.index is None else dev
    else:
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda" and not dev.index < torch.cuda.device_count():
        raise ConfigError(
            f"--device/LOCAL_RANK: {dev} asked (LOCAL_RANK={local}), but {torch.cuda.device_count()} GPUs are visible"
        )
    return dev


def bind_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device, so every library that defaults to it (DALI, CUDA streams, kernels)
    works there rather than on GPU 0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def run_precompute(
    cfg: Any,
    *,
    kinds: Sequence[str] = ("text", "latents"),
    rank: int = 0,
    world_size: int = 1,
    text_shard_size: int = 256,
    latent_shard_size: int = 64,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, bool]:
    """Build the requested caches of ``cfg.data.manifest`` into ``cfg.data.cache_dir``; returns {kind: index done}."""
    from engine.data.reader import build_reader

    d = cfg.data
    dev = torch.device(device)
    bind_device(dev)
    manifest = _read_manifest(d)
    _check_models(cfg, kinds)
    sizes = {"text": text_shard_size, "latents": latent_shard_size}
    prints = _fingerprints(cfg, d.manifest, len(manifest), sizes)
    done = {}
    world = build_world(cfg, device)  # nothing is loaded until a kind asks for its encoder
    for kind in kinds:
        _say_if_idle(kind, len(manifest), sizes[kind], rank, world_size)
    if "text" in kinds:
        encoder = world.load_text()
        precompute_text(
            manifest.entries,
            encoder,
            d.cache_dir,
            fingerprint=prints["text"],
            shard_size=sizes["text"],
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            progress=progress,
        )
        if rank == 0 and write_negative(d.cache_dir, encoder, fingerprint=prints["text"]):
            logger.info("text cache: negative prompt %r encoded", encoder.negative_prompt)
        done["text"] = _try_index(d.cache_dir, "text", len(manifest), sizes["text"])
        del encoder
    if "latents" in kinds:
        codec = world.load_codec()
        reader = build_reader(  # DALI decodes on this rank's GPU
            manifest.entries, d, batch_size=batch_size, rank=rank, world_size=world_size, device=dev
        )
        precompute_latents(
            reader,
            codec,
            d.cache_dir,
            fingerprint=prints["latents"],
            shard_size=sizes["latents"],
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            progress=progress,
        )
        done["latents"] = _try_index(d.cache_dir, "latents", len(manifest), sizes["latents"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return done


def run_prompt_precompute(
    cfg: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    shard_size: int = 256,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, bool]:
    """The text cache of the DMD prompts (``data.dmd_prompts.path`` into ``data.dmd_prompts.cache_dir``), in the
    layout of a manifest's text cache, for ``data.dmd_prompts.source=cache``; returns {"text": index done}."""
    p = cfg.data.dmd_prompts
    for key in ("path", "cache_dir"):
        if not getattr(p, key):
            raise ConfigError(
                f"config key `data.dmd_prompts.{key}`: required (--dmd-prompts encodes data.dmd_prompts.path into "
                "data.dmd_prompts.cache_dir)"
            )
    entries = [ManifestEntry(i, "", prompt) for i, prompt in enumerate(read_prompt_file(p.path))]
    te = cfg.text_encoder
    fingerprint = {
        "manifest": os.path.abspath(p.path),
        "num_entries": len(entries),
        "model": os.path.abspath(te.path or ""),
        "max_length": te.max_length,
        "shard_size": shard_size,
    }
    encoder = build_world(cfg, device).load_text()
    sharding = dict(shard_size=shard_size, batch_size=batch_size, rank=rank, world_size=world_size)
    precompute_text(entries, encoder, p.cache_dir, fingerprint=fingerprint, progress=progress, **sharding)
    return {"text": _try_index(p.cache_dir, "text", len(entries), shard_size)}
