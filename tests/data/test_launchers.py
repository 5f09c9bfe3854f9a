"""The thin launchers: argument parsing reaches the engine and the outputs appear."""

from __future__ import annotations

import json
import re

import pytest

from launcher import curate as curate_cli
from launcher import precompute as precompute_cli
from tests.data.clips import write_clip
from tests.data.conftest import write_jsonl
from tests.data.tiny_models import save_text_encoder, save_vae


def test_curate_cli(tmp_path, capsys):
    write_clip(tmp_path / "raw" / "a", codec="ffv1", num_frames=30)
    curate_cli.main([str(tmp_path / "raw"), "--out", str(tmp_path / "kept.jsonl"), "--report",
                     str(tmp_path / "report.jsonl"), "--workers", "1", "--no-progress", "min_width=64",
                     "min_height=48", "frame_positions=0,10"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"inputs": 1, "kept": 1}
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 1


def test_precompute_cli_resumes(tmp_path, vp9_entries, capsys):
    save_text_encoder(tmp_path / "m")
    save_vae(tmp_path / "m")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"path": e.path, "caption": e.caption} for e in vp9_entries])
    argv = ["--no-progress", "--device", "cpu", f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'c'}",
            f"text_encoder.path={tmp_path / 'm'}", "text_encoder.max_length=8", f"vae.path={tmp_path / 'm'}",
            "data.num_frames=9", "data.height=16", "data.width=16", "data.reader=pyav"]  # fmt: skip
    precompute_cli.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["text: index written", "latents: index written"]
    shards = sorted((tmp_path / "c").rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    precompute_cli.main(argv)  # a re-run skips every finished shard
    assert [p.stat().st_mtime_ns for p in shards] == stamps


def test_curate_cli_fails_with_a_summary_when_nothing_is_kept(tmp_path, capsys):
    write_clip(tmp_path / "raw" / "a", codec="ffv1", num_frames=30)
    argv = [str(tmp_path / "raw"), "--out", str(tmp_path / "kept.jsonl"), "--report", str(tmp_path / "report.jsonl"),
            "--workers", "1", "--no-progress", "min_width=4096", "frame_positions=0,10"]  # fmt: skip
    assert curate_cli.main(argv) == 1
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["inputs"] == 1 and summary["kept"] == 0
    (reason,) = (k for k in summary if k not in ("inputs", "kept"))
    assert err.startswith("curate: error: no clip kept of 1 (") and f"{reason}: 1" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.manifest=/CHANGE_ME/manifest.jsonl"], r"config key `data.manifest`: /CHANGE_ME/manifest.jsonl is not"),
        (["data.manifest=EMPTY"], r"config key `data.manifest`: .*m.jsonl has no usable row"),
        (["data.manifest=EMPTY", "data.cache_dir=null"], r"config key `data.cache_dir`: required"),
        (["data.manifest=null"], r"config key `data.manifest`: required"),
    ],
)
def test_precompute_cli_names_the_key_of_a_bad_manifest(tmp_path, capsys, overrides, match):
    empty = tmp_path / "m.jsonl"
    empty.write_text("")
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    assert (
        precompute_cli.main(["--no-progress", "--device", "cpu", f"data.cache_dir={tmp_path / 'c'}", *overrides]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("precompute: error: ") and len(err.splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "c").exists()
