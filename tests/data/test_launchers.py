"""The thin launchers: argument parsing reaches the engine and the outputs appear."""

from __future__ import annotations

import json
import logging
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
                     "min_height=48", "frame_positions=0,10", "clip_frames=9"])  # fmt: skip
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
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("precompute: error: ") and sum("error" in line for line in err) == 1  # no traceback
    assert "Traceback" not in "\n".join(err) and re.search(match, err[-1]), err
    assert not (tmp_path / "c").exists()


def _text_argv(tmp_path, vp9_entries, *extra):
    save_text_encoder(tmp_path / "m")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"path": e.path, "caption": e.caption} for e in vp9_entries])
    return ["--no-progress", "--device", "cpu", f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'c'}",
            f"text_encoder.path={tmp_path / 'm'}", "text_encoder.max_length=8", *extra, "--kinds", "text"]  # fmt: skip


def test_an_idle_precompute_rank_says_so_and_does_not_ask_for_a_rerun(tmp_path, vp9_entries, capsys, caplog):
    caplog.set_level(logging.INFO, logger="engine.data")
    argv = _text_argv(tmp_path, vp9_entries)  # 6 prompts: one text shard of 256 for 2 ranks
    assert precompute_cli.main([*argv, "--rank", "1", "--world-size", "2"]) == 0
    out, err = capsys.readouterr()
    said = out + err + caplog.text
    assert out.splitlines()[-1] == "text: this rank is done; the last rank to finish writes the index"
    assert "text cache: rank 1 has no shard to write (1 shards for 2 ranks)" in said
    assert "1 of 1 shards still being written by other ranks" in said and "re-run" not in said
    assert not (tmp_path / "c" / "text" / "index.json").exists()
    caplog.clear()
    assert precompute_cli.main([*argv, "--rank", "0", "--world-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "text: index written" and "re-run" not in out + err + caplog.text


@pytest.mark.parametrize(
    "overrides, kinds, match",
    [
        (["text_encoder.path=/CHANGE_ME/umt5-xxl"], ["text"], r"config key `text_encoder.path`: /CHANGE_ME/umt5-xxl"),
        (["vae.path=/CHANGE_ME/Wan2.1_VAE"], ["latents"], r"config key `vae.path`: /CHANGE_ME/Wan2.1_VAE does not"),
        (["text_encoder.max_length=12"], ["text"], r"config key `data.cache_dir`: .*text/.* was made with"),
    ],
)
def test_precompute_errors_name_the_config_key(tmp_path, vp9_entries, capsys, overrides, kinds, match):
    argv = _text_argv(tmp_path, vp9_entries)
    assert precompute_cli.main(argv) == 0  # a text cache made with max_length 8
    capsys.readouterr()
    assert precompute_cli.main([*argv[:-2], "--kinds", *kinds, *overrides]) == 2  # overrides may follow --kinds
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("precompute: error: ") and sum("error" in line for line in err) == 1  # no traceback
    assert "Traceback" not in "\n".join(err) and re.search(match, err[-1]), err
