"""Bad input: each case is skipped with a counted, logged reason while the run continues; all-bad stops clearly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine.data.decoders import DaliDecoder, PyAVDecoder
from engine.data.manifest import ManifestEntry, load_manifest
from engine.data.reader import VideoReader
from engine.data.skips import AllSamplesBadError
from tests.data.clips import write_clip
from tests.data.conftest import write_jsonl


def bad_file(kind: str, d: Path, good_path: str) -> str:
    """A file that must be skipped for reason ``kind``."""
    if kind == "empty_file":
        (d / "empty.webm").write_bytes(b"")
        return str(d / "empty.webm")
    if kind == "truncated":
        data = Path(good_path).read_bytes()
        (d / "truncated.webm").write_bytes(data[: len(data) // 2])
        return str(d / "truncated.webm")
    if kind == "not_video":
        (d / "notes.webm").write_text("this is a text file, not a video\n" * 20)
        return str(d / "notes.webm")
    if kind == "missing_file":
        return str(d / "does_not_exist.webm")
    if kind == "too_short":
        return write_clip(d / "short", num_frames=8)  # 9 frames at 16 fps need 13 at 24 fps
    if kind == "bad_resolution":
        return write_clip(d / "tiny", width=8, height=8)  # under min_side=16
    raise ValueError(kind)


def reader_over(entries, decoder=None, **kw):
    args = dict(batch_size=2, num_frames=9, fps=16.0, height=16, width=16, num_workers=2, prefetch=1)
    return VideoReader(entries, decoder or PyAVDecoder(), **{**args, **kw})


def run_one_epoch(reader) -> list[int]:
    return [i for b in reader for i in b["index"].tolist()]


@pytest.mark.parametrize(
    "kind", ["empty_file", "truncated", "not_video", "missing_file", "too_short", "bad_resolution"]
)
@pytest.mark.parametrize("decoder", ["pyav", "dali"])
def test_bad_file_is_skipped_counted_and_logged(kind, decoder, tmp_path, vp9_entries, caplog):
    path = bad_file(kind, tmp_path, vp9_entries[0].path)
    entries = [*vp9_entries[:3], ManifestEntry(3, path, "bad one")]
    dec = PyAVDecoder() if decoder == "pyav" else DaliDecoder("cpu", max_batch=2)
    reader = reader_over(entries, dec, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        seen = run_one_epoch(reader)
    assert sorted(seen) == [0, 1, 2]  # the run went on with every good sample
    assert dict(reader.skipped.counts) == {kind: 1}
    assert reader.state_dict()["skipped"] == {kind: 1}  # and the count is part of the saved state
    assert any(path in r.getMessage() and kind in r.getMessage() for r in caplog.records)


def test_unsupported_codec_is_skipped_by_strict_dali(vp9_entries, h264_path, caplog):
    entries = [*vp9_entries[:2], ManifestEntry(2, h264_path, "h264")]
    reader = reader_over(entries, DaliDecoder("cpu", max_batch=2), num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        seen = run_one_epoch(reader)
    assert sorted(seen) == [0, 1]
    assert dict(reader.skipped.counts) == {"unsupported_codec": 1}
    assert any("h264" in r.getMessage() for r in caplog.records)


def test_manifest_rows_with_bad_captions_are_skipped(tmp_path, vp9_entries, caplog):
    rows = [
        {"path": vp9_entries[0].path, "caption": "fine"},
        {"path": vp9_entries[1].path},  # missing caption
        {"path": vp9_entries[2].path, "caption": "   "},  # empty caption
        {"path": vp9_entries[3].path, "caption": "also fine", "fps": 24},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    with open(manifest, "ab") as fh:  # a row whose caption bytes are Latin-1, not UTF-8
        fh.write(b'{"path": "' + vp9_entries[4].path.encode() + b'", "caption": "caf\xe9 au lait"}\n')
        fh.write(b"{not json\n")
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        m = load_manifest(manifest)
    assert [e.caption for e in m.entries] == ["fine", "also fine"]
    assert m.entries[1].meta == {"fps": 24}
    assert dict(m.skipped.counts) == {"missing_caption": 2, "non_utf8_caption": 1, "bad_row": 1}
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 4
    # The run continues on what is left.
    assert sorted(run_one_epoch(reader_over(m.entries, num_epochs=1))) == [0, 1]


@pytest.mark.timeout(60)
def test_all_bad_stops_with_a_clear_error_instead_of_spinning(tmp_path, vp9_entries):
    entries = [
        ManifestEntry(i, bad_file(k, tmp_path, vp9_entries[0].path), "x")
        for i, k in enumerate(["empty_file", "not_video", "missing_file", "too_short"])
    ]
    reader = reader_over(entries, num_epochs=None)  # an endless stream: must still stop
    with pytest.raises(AllSamplesBadError, match="every sample of epoch 0 on rank 0 was bad"):
        run_one_epoch(reader)
    assert reader.skipped.total == 4


def test_too_many_bad_samples_stop_the_run(tmp_path, vp9_entries):
    entries = [*vp9_entries[:3], ManifestEntry(3, bad_file("empty_file", tmp_path, ""), "x")]
    reader = reader_over(entries, num_epochs=1, max_bad_fraction=0.2)
    with pytest.raises(AllSamplesBadError, match="max_bad_fraction=0.2"):
        run_one_epoch(reader)
