"""A crafted ``.pt`` file for the untrusted-file tests: unpickling it with ``weights_only=False`` runs a shell command
that creates a marker file. Nothing may ever create the marker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, manifest_root: Path | None = None) -> Path:
    """Overwrite ``path`` with a pickle that runs code; with ``manifest_root`` (a checkpoint directory), rewrite the
    manifest entry too, as an attacker who replaces both would (so the checksums verify)."""
    torch.save({"module": _RunsCode(marker), "optimizer_state_dict": {}}, path)
    if manifest_root is not None:
        from engine.train import checkpoint as ckpt

        rel = path.relative_to(manifest_root).as_posix()
        for m in (manifest_root / ckpt.MANIFEST_DIR).glob("rank_*.json"):
            body = json.loads(m.read_text())
            if rel in body["files"]:
                body["files"][rel] = {"size": path.stat().st_size, "blake2b": ckpt.file_digest(path)}
                m.write_text(json.dumps(body))
    return path
