"""Toy-world evaluation glue: the real-clip reference of a world, and the real rows of a comparison table.

``reference_for(cfg)`` calibrates the metrics on the world's train split once and caches the result as
``reference.json`` next to the manifest (keyed by ``REFERENCE_VERSION``). To score a model::

    ref = reference_for(cfg)
    params = [ClipParams.from_dict(e["params"]) for e in val_entries]   # what the prompts asked for
    row = compute_metrics(generated_videos, params, ref)                # videos: (N, 3, T, H, W) in [-1, 1]
    print(format_table({"real": real_rows(cfg)["real (val)"], "student": row}))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.config import ToyWorldConfig
from engine.fsutil import atomic_write_text
from engine.toy.codec import ToyCodec
from engine.toy.metrics import Reference, calibrate, compute_metrics, format_table
from engine.toy.videos import to_tensor
from engine.toy.world import ensure_dataset, load_clips

REFERENCE_VERSION = 1
"""Bump when a metric's definition changes: cached references are then recomputed."""


def reference_for(cfg: ToyWorldConfig) -> Reference:
    """The metrics' calibration on the world's train split (cached in the dataset directory)."""
    manifest = ensure_dataset(cfg, progress=False)
    path = Path(manifest).parent / "reference.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("version") == REFERENCE_VERSION:
            return Reference.from_dict(cached["reference"])
    videos, params, _ = load_clips(manifest, split="train")
    ref = calibrate(videos, params)
    # every rank may calibrate at once: each writes its own temporary file
    atomic_write_text(path, json.dumps({"version": REFERENCE_VERSION, "reference": ref.to_dict()}))
    return ref


def real_rows(cfg: ToyWorldConfig, codec: ToyCodec | None = None) -> dict[str, dict[str, float]]:
    """Metrics of the real val clips, as decoded from their files and after a codec round trip."""
    manifest = ensure_dataset(cfg, progress=False)
    ref = reference_for(cfg)
    videos, params, _ = load_clips(manifest, split="val")
    codec = codec or ToyCodec.load()
    with torch.no_grad():
        through = codec.decode(codec.encode(to_tensor(videos)))  # (N, 3, T, H, W)
    return {
        "real (val)": compute_metrics(videos, params, ref),
        "real via codec": compute_metrics(through, params, ref),
    }


def real_metrics_table(cfg: ToyWorldConfig) -> str:
    return format_table(real_rows(cfg))
