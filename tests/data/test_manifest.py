"""Manifest loading: formats, path resolution, file-level errors, round trip."""

from __future__ import annotations

import pytest

from engine.data.manifest import ManifestError, load_manifest, write_manifest
from tests.data.conftest import write_jsonl


def test_jsonl_relative_paths_and_metadata(tmp_path):
    write_jsonl(
        tmp_path / "m.jsonl",
        [{"path": "a.mp4", "caption": " a cat ", "fps": 30}, {"path": "/abs/b.mp4", "caption": "b"}],
    )
    m = load_manifest(tmp_path / "m.jsonl")
    assert [(e.index, e.path, e.caption, e.meta) for e in m.entries] == [
        (0, str(tmp_path / "a.mp4"), "a cat", {"fps": 30}),
        (1, "/abs/b.mp4", "b", {}),
    ]
    assert load_manifest(tmp_path / "m.jsonl", root="/data").entries[0].path == "/data/a.mp4"


def test_csv_with_quoted_captions(tmp_path):
    (tmp_path / "m.csv").write_text('path,caption,source\nx.webm,"a dog, running",web\ny.webm,,web\n')
    m = load_manifest(tmp_path / "m.csv")
    assert [(e.caption, e.meta) for e in m.entries] == [("a dog, running", {"source": "web"})]
    assert dict(m.skipped.counts) == {"missing_caption": 1}


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.jsonl", None, "not found"),
        ("m.txt", "path,caption\n", "unknown format"),
        ("m.csv", "file,text\na,b\n", "must name a `path` column"),
    ],
)
def test_file_level_errors(tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ManifestError, match=match):
        load_manifest(tmp_path / name)


def test_caption_optional_for_curation_inputs(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"path": "a.mp4"}])
    assert load_manifest(tmp_path / "m.jsonl", require_caption=False).entries[0].caption == ""


def test_write_then_load_round_trip(tmp_path):
    rows = [{"path": "/v/a.mp4", "caption": "über straße 東京", "width": 1280}]
    write_manifest(rows, tmp_path / "out.jsonl")
    (e,) = load_manifest(tmp_path / "out.jsonl").entries
    assert (e.path, e.caption, e.meta) == ("/v/a.mp4", "über straße 東京", {"width": 1280})
