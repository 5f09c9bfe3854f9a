"""Precomputed caches: text embeddings (prompt-only training) and VAE latents (regression branch).

Layout of ``<cache_dir>/<kind>/`` (kind ``text`` or ``latents``)::

    shard-00000.safetensors   rows of manifest entries [0, S), S = shard_size
    shard-00001.safetensors   ...
    index.json                written once every shard exists: shards, their rows, what was skipped and why

Shard ``k`` always holds manifest rows ``[k S, (k + 1) S)`` whatever the number of ranks; rank ``r`` of ``w`` writes
the shards ``k = r mod w``. A shard is written to a temporary name and renamed, so a file that exists is complete:
a re-run skips it (resume). Every shard carries a fingerprint of what produced it (model path, sizes, ...), and a
re-run with a different fingerprint stops instead of mixing incompatible shards.

Text shards hold ``emb`` (n, L, dim) trimmed to the shard's longest prompt (re-padded with zeros on read: 512 x 4096
bf16 per prompt would waste most of the disk), ``lengths`` (n,), ``index`` (n,); captions are in the metadata.
Latent shards hold ``latents`` (n, C, F, h, w) and ``index`` (n,) of the rows whose video decoded; the others are
listed with their skip reason.

``text/negative.safetensors`` holds the negative prompt's embedding (``emb`` (1, len, dim) trimmed, ``lengths`` (1,)),
with the prompt string, ``max_length`` and the text fingerprint in its metadata: training from the cache needs it for
classifier-free guidance, and loading umT5-XXL (11 GB) for one prompt would defeat the cache. It is not a shard (the
index ignores it); a cache made before it existed gets it from a re-run of ``launcher/precompute.py --kinds text``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import console
from engine.data.manifest import ManifestEntry
from engine.data.skips import AllSamplesBadError, BadSample
from engine.fsutil import atomic_write, atomic_write_text
from engine.safe_load import inside

KINDS = ("text", "latents")


class CacheError(RuntimeError):
    """A cache directory that is incomplete or was made with a different configuration."""


def shard_path(cache_dir: str | os.PathLike, kind: str, k: int) -> Path:
    return Path(cache_dir) / kind / f"shard-{k:05d}.safetensors"


def rank_shards(num_entries: int, shard_size: int, rank: int, world_size: int) -> list[int]:
    """The shard numbers rank ``rank`` writes."""
    num_shards = -(-num_entries // shard_size)
    return list(range(rank, num_shards, world_size))


def _fingerprint_of(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("fingerprint", "{}"))


def _todo(cache_dir, kind, entries, shard_size, rank, world_size, fingerprint) -> list[int]:
    """Shards of this rank still to write; finished ones must carry the same fingerprint."""
    todo = []
    for k in rank_shards(len(entries), shard_size, rank, world_size):
        path = shard_path(cache_dir, kind, k)
        if not path.exists():
            todo.append(k)
        elif _fingerprint_of(path) != fingerprint:
            raise CacheError(
                f"{path} was made with {_fingerprint_of(path)}, this run has {fingerprint}: use a new cache_dir"
            )
    return todo


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    # a unique temporary name per writer, renamed when complete, with the umask's mode (safetensors writes 0600)
    atomic_write(
        path,
        lambda tmp: save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={k: json.dumps(v, ensure_ascii=False) for k, v in meta.items()},
        ),
    )


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for s in range(0, len(seq), n):
        yield seq[s : s + n]


def precompute_text(
    entries: Sequence[ManifestEntry],
    encoder: Any,
    cache_dir: str | os.PathLike,
    *,
    fingerprint: dict[str, Any],
    shard_size: int = 256,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> list[int]:
    """Write this rank's missing text shards; returns the shard numbers written."""
    todo = _todo(cache_dir, "text", entries, shard_size, rank, world_size, fingerprint)
    bar = console.progress(
        total=sum(len(entries[k * shard_size : (k + 1) * shard_size]) for k in todo),
        disable=not progress,
        desc=f"text cache r{rank}",
        unit="prompt",
        position=rank,
    )
    for k in todo:
        rows = entries[k * shard_size : (k + 1) * shard_size]
        embs, lens = [], []
        for chunk in _chunks(rows, batch_size):
            emb, length = encoder.encode([e.caption for e in chunk])  # (b, L, dim), (b,)
            embs.append(emb.cpu())
            lens.append(length.cpu())
            bar.update(len(chunk))
        emb, length = torch.cat(embs), torch.cat(lens)
        trim = int(length.max())
        tensors = {"emb": emb[:, :trim].to(dtype), "lengths": length, "index": torch.tensor([e.index for e in rows])}
        _save(
            shard_path(cache_dir, "text", k),
            tensors,
            {
                "fingerprint": fingerprint,
                "captions": [e.caption for e in rows],
                "max_length": encoder.max_length,
                "skipped": [],
            },
        )
    bar.close()
    return todo


def _encode_shard(rows, reader, codec, batch_size, bar) -> tuple[list, list, list]:
    latents, kept, skipped = [], [], []
    clips: list = []

    def flush():
        if clips:
            latents.append(codec.encode(torch.stack([c for _, c in clips])).cpu())  # (b, C, F, h, w)
            kept.extend(i for i, _ in clips)
            bar.update(len(clips))
            clips.clear()

    for index, clip in reader.iter_clips([e.index for e in rows]):
        if isinstance(clip, BadSample):
            reader.skipped.skip(reader.entries[index].path, clip)
            skipped.append({"index": index, "reason": clip.reason, "detail": clip.detail})
            bar.update(1)
            continue
        clips.append((index, clip))
        if len(clips) == batch_size:
            flush()
    flush()
    return latents, kept, skipped


def precompute_latents(
    reader: Any,
    codec: Any,
    cache_dir: str | os.PathLike,
    *,
    fingerprint: dict[str, Any],
    shard_size: int = 64,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> list[int]:
    """Decode (``reader.iter_clips``, clip from the first frame) and encode this rank's missing latent shards."""
    entries = reader.entries
    todo = _todo(cache_dir, "latents", entries, shard_size, rank, world_size, fingerprint)
    total = sum(len(entries[k * shard_size : (k + 1) * shard_size]) for k in todo)
    bar = console.progress(total=total, disable=not progress, desc=f"latent cache r{rank}", unit="clip", position=rank)
    for k in todo:
        rows = entries[k * shard_size : (k + 1) * shard_size]
        latents, kept, skipped = _encode_shard(rows, reader, codec, batch_size, bar)
        shape = tuple(latents[0].shape[1:]) if latents else (0,)
        tensors = {
            "latents": torch.cat(latents).to(dtype) if latents else torch.zeros(0, *shape, dtype=dtype),
            "index": torch.tensor(kept, dtype=torch.int64),
        }
        _save(shard_path(cache_dir, "latents", k), tensors, {"fingerprint": fingerprint, "skipped": skipped})
    bar.close()
    return todo


def write_index(cache_dir: str | os.PathLike, kind: str, num_entries: int, shard_size: int) -> dict[str, Any]:
    """Check every shard exists and write ``<kind>/index.json`` (run once, after all ranks finished)."""
    shards, fingerprints, max_length = [], set(), None
    for k in range(-(-num_entries // shard_size)):
        path = shard_path(cache_dir, kind, k)
        if not path.exists():
            raise CacheError(f"{path} is missing: some rank has not finished (re-run precompute to resume)")
        with safe_open(str(path), "pt") as f:
            meta = {key: json.loads(v) for key, v in (f.metadata() or {}).items()}
            index = f.get_tensor("index").tolist()
        fingerprints.add(json.dumps(meta["fingerprint"], sort_keys=True))
        max_length = meta.get("max_length", max_length)
        shards.append({"file": path.name, "index": index, "skipped": meta.get("skipped", [])})
    if len(fingerprints) > 1:
        raise CacheError(f"{Path(cache_dir) / kind}: shards were made with different configurations")
    if not any(s["index"] for s in shards):
        raise AllSamplesBadError(f"{Path(cache_dir) / kind}: no entry could be cached; see the skip reasons in the log")
    index = {
        "kind": kind,
        "num_entries": num_entries,
        "shard_size": shard_size,
        "fingerprint": json.loads(fingerprints.pop()),
        "max_length": max_length,
        "shards": shards,
    }
    out = Path(cache_dir) / kind / "index.json"
    atomic_write_text(out, json.dumps(index, ensure_ascii=False))  # every rank may write it: each its own temp file
    return index


NEGATIVE_FILE = "negative.safetensors"


def negative_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "text" / NEGATIVE_FILE


def _metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return {key: json.loads(v) for key, v in (f.metadata() or {}).items()}


def write_negative(
    cache_dir: str | os.PathLike, encoder: Any, *, fingerprint: dict[str, Any], dtype: torch.dtype = torch.bfloat16
) -> bool:
    """Encode ``encoder.negative_prompt`` into ``text/negative.safetensors``. Returns False when the file already
    holds this prompt with this fingerprint (resume); a changed prompt is re-encoded (one prompt: cheap)."""
    path = negative_path(cache_dir)
    if path.exists():
        meta = _metadata(path)
        if meta.get("fingerprint") != fingerprint:
            made = meta.get("fingerprint")
            raise CacheError(f"{path} was made with {made}, this run has {fingerprint}: use a new cache_dir")
        if meta.get("prompt") == encoder.negative_prompt:
            return False
    emb, length = encoder.negative()  # (1, max_length, dim), (1,)
    tensors = {"emb": emb[:, : int(length[0])].cpu().to(dtype), "lengths": length.cpu()}
    meta = {"fingerprint": fingerprint, "prompt": encoder.negative_prompt, "max_length": encoder.max_length}
    _save(path, tensors, meta)
    return True


def read_negative(cache_dir: str | os.PathLike) -> tuple[torch.Tensor, str, int]:
    """(emb (1, max_length, dim) float32 zero-padded, prompt, max_length) of the cached negative prompt."""
    path = negative_path(cache_dir)
    if not path.exists():
        raise CacheError(
            f"{path} not found: the text cache has no negative-prompt embedding (made before it was cached, or with "
            "--kinds latents only). Re-run `python -m launcher.precompute --config <this config> --kinds text`: "
            "finished shards are skipped and only the negative prompt is encoded"
        )
    meta = _metadata(path)
    with safe_open(str(path), "pt") as f:
        emb = f.get_tensor("emb").float()  # (1, len, dim)
    max_length = int(meta["max_length"])
    return torch.nn.functional.pad(emb, (0, 0, 0, max_length - emb.shape[1])), meta["prompt"], max_length


SHARD_TENSORS = {"text": ("emb", "lengths", "index"), "latents": ("latents", "index")}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file without reading any tensor: the header parses, every
    tensor's byte range fits its dtype and shape, and the file ends where the last tensor does (a truncated or
    padded file fails). Raises CacheError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise CacheError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CacheError(f"{path} is missing") from None
    except OSError as exc:
        raise CacheError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError):
        raise CacheError(f"{path}: its safetensors header does not parse (a damaged file)") from None
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = t["data_offsets"]
            want = _DTYPE_BYTES.get(t["dtype"], 0) * math.prod(int(d) for d in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{path}: tensor {name!r} has a damaged header entry") from None
        if stop - start != want and t["dtype"] in _DTYPE_BYTES:
            raise CacheError(f"{path}: tensor {name!r} spans {stop - start} bytes, its shape needs {want}")
        end = max(end, stop)
    if size != 8 + n + end:
        raise CacheError(f"{path}: {size} bytes, its header describes {8 + n + end} (truncated or damaged)")
    return header


def verify_shards(cache_dir: str | os.PathLike, kind: str, index: dict[str, Any]) -> None:
    """Every shard ``index`` lists is present, its header readable and consistent with the file size, holding the
    tensors of its kind with one row per listed entry. Reads headers only; raises CacheError naming the file."""
    for shard in index.get("shards", []):
        try:  # shard names read from the index stay inside its directory
            path = inside(Path(cache_dir) / kind, shard["file"], str(Path(cache_dir) / kind / "index.json"))
        except ValueError as exc:
            raise CacheError(str(exc)) from None
        header = safetensors_header(path)
        for name in SHARD_TENSORS[kind]:
            if name not in header:
                raise CacheError(f"{path}: no {name!r} tensor (has {sorted(k for k in header if k != '__metadata__')})")
            rows = header[name]["shape"][0] if header[name]["shape"] else None
            if rows != len(shard["index"]):
                raise CacheError(f"{path}: {name!r} has {rows} rows, the index lists {len(shard['index'])}")


def read_index(cache_dir: str | os.PathLike, kind: str) -> Optional[dict[str, Any]]:
    path = Path(cache_dir) / kind / "index.json"
    return json.loads(path.read_text()) if path.exists() else None
