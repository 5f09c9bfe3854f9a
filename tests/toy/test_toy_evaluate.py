"""Evaluation glue (cached real reference, real rows of a table) and the toy-data command line."""

import json

from engine.toy.evaluate import REFERENCE_VERSION, real_rows, reference_for
from engine.toy.metrics import METRICS
from engine.toy.world import read_manifest
from launcher import toy_data


def test_reference_is_calibrated_once_and_cached(small_world, small_manifest):
    ref = reference_for(small_world)
    cached = small_manifest.parent / "reference.json"
    assert json.loads(cached.read_text())["version"] == REFERENCE_VERSION
    assert ref.num_clips == 36  # the train split: 48 clips minus 12 val
    assert reference_for(small_world) == ref  # read back from the file


def test_real_rows_score_the_real_clips_as_perfect(small_world):
    rows = real_rows(small_world)
    assert set(rows) == {"real (val)", "real via codec"}
    real = rows["real (val)"]
    assert set(real) == set(METRICS)
    assert real["instance_preservation"] == 1.0 and real["prompt_alignment"] == 1.0
    assert abs(real["saturation_ratio"] - 1.0) < 0.1


def test_cli_generate_verify_and_repair(tmp_path, capsys):
    args = ["--cache-dir", str(tmp_path), "--num-clips", "6"]
    assert toy_data.main(["generate", *args]) == 0
    assert "clips generated: 6" in capsys.readouterr().out
    assert toy_data.main(["verify", "--deep", *args]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": 6}
    manifest = next(tmp_path.glob("*/manifest.jsonl"))
    (manifest.parent / read_manifest(manifest)[2]["path"]).write_bytes(b"broken")
    assert toy_data.main(["verify", *args]) == 1  # detected, not repaired
    assert json.loads(capsys.readouterr().out)["file corrupted (sha256 mismatch)"] == 1
    assert toy_data.main(["generate", *args]) == 0
    assert "clips generated: 1" in capsys.readouterr().out
