"""The manifest: which videos to train on, with their captions.

Two formats, picked by extension:

- JSONL (``.jsonl``): one object per line, ``{"path": ..., "caption": ..., <any metadata>}``;
- CSV (``.csv``): a header row naming at least ``path`` and ``caption``; other columns are metadata.

Validation on load. A file that cannot be a manifest (missing, unknown extension, CSV without a ``path`` column) raises
:class:`ManifestError`. A bad *row* is skipped with a counted, logged reason and loading goes on: unparsable JSON or a
row without a path (``bad_row``), a missing/empty caption (``missing_caption``), a caption whose bytes are not UTF-8
(``non_utf8_caption``). Relative paths resolve against ``root`` (default: the manifest's directory). Files are read
with ``surrogateescape`` so a non-UTF-8 *path* (legal on Linux) survives unchanged while a non-UTF-8 *caption* is
detected by its surrogates.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.data.skips import BadSample, SkipCounter


class ManifestError(ValueError):
    """The file is not a usable manifest (the message names the file and the problem)."""


@dataclass
class ManifestEntry:
    """One (video, caption) pair. ``index`` is the row's position among the kept rows."""

    index: int
    path: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)
    """Where the row is in its manifest (``line N``), for error messages."""


@dataclass
class Manifest:
    entries: list[ManifestEntry]
    skipped: SkipCounter
    source: str = ""

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> ManifestEntry:
        return self.entries[i]


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="surrogateescape")


def _jsonl_rows(text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"line {lineno}", BadSample("bad_row", f"invalid JSON ({exc.msg})")


def _csv_rows(text: str, source: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise ManifestError(f"manifest {source}: CSV header must name a `path` column, got {reader.fieldnames}")
    for lineno, row in enumerate(reader, start=2):
        yield f"line {lineno}", {k: v for k, v in row.items() if k is not None}


def _entry(row: Any, root: Path, require_caption: bool) -> tuple[str, str, dict[str, Any]]:
    """(path, caption, meta) of a parsed row, or BadSample."""
    if isinstance(row, BadSample):
        raise row
    if not isinstance(row, dict):
        raise BadSample("bad_row", f"expected an object, got {type(row).__name__}")
    path = row.get("path")
    if not isinstance(path, str) or not path.strip():
        raise BadSample("bad_row", "no `path`")
    caption = row.get("caption")
    caption = caption if isinstance(caption, str) else ""
    if _has_surrogates(caption):
        raise BadSample("non_utf8_caption", f"caption of {path!r} is not valid UTF-8")
    caption = caption.strip()
    if require_caption and not caption:
        raise BadSample("missing_caption", f"caption of {path!r} is missing or empty")
    full = path if os.path.isabs(path) else str(root / path)
    meta = {k: v for k, v in row.items() if k not in ("path", "caption")}
    return full, caption, meta


def load_manifest(
    path: str | os.PathLike, root: Optional[str | os.PathLike] = None, *, require_caption: bool = True
) -> Manifest:
    """Read and validate a JSONL/CSV manifest; bad rows are skipped and counted in ``manifest.skipped``."""
    source = Path(path)
    if not source.is_file():
        raise ManifestError(f"manifest not found: {source}")
    suffix = source.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ManifestError(f"manifest {source}: unknown format {suffix!r} (use .jsonl or .csv)")
    text = _read_text(source)
    rows = _jsonl_rows(text) if suffix == ".jsonl" else _csv_rows(text, source)
    base = Path(root) if root is not None else source.parent
    skipped = SkipCounter("manifest row")
    entries: list[ManifestEntry] = []
    for where, row in rows:
        try:
            full, caption, meta = _entry(row, base, require_caption)
        except BadSample as err:
            skipped.skip(f"{source}:{where}", err)
            continue
        entries.append(ManifestEntry(len(entries), full, caption, meta, where))
    return Manifest(entries, skipped, str(source))


def write_manifest(entries: list[ManifestEntry] | list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write entries as JSONL (atomically: a crash leaves the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
        for e in entries:
            row = e if isinstance(e, dict) else {"path": e.path, "caption": e.caption, **e.meta}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
