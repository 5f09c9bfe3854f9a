"""The ablation driver: its verdicts, its files, and its bookkeeping of finished, unfinished and failed runs (the
training and scoring are replaced by fakes here; launcher/ablate.py runs them for real)."""

import json
import math
import subprocess
from pathlib import Path

import pytest

import engine.toy.ablation as ab
from engine.toy.ablation import CLAIMS, Claim, RunRecord, ablation_json, verdict
from engine.toy.ablation_report import replace_section

ROOT = Path(__file__).resolve().parents[2]


def _table(better, worse, metric="instance_preservation"):
    return {"a": {metric: dict(enumerate(better))}, "b": {metric: dict(enumerate(worse))}}


CLAIM = Claim("a beats b", "instance_preservation", "a", "b", "higher")


def test_a_consistent_paired_effect_is_confirmed_and_the_opposite_refuted():
    v = verdict(CLAIM, _table([0.60, 0.72, 0.55], [0.50, 0.61, 0.46]))  # +0.10, +0.11, +0.09 paired
    assert v["verdict"] == "confirmed" and v["effect"] == pytest.approx(0.10) and v["seeds"] == 3
    assert v["low"] > 0
    v = verdict(CLAIM, _table([0.50, 0.61, 0.46], [0.60, 0.72, 0.55]))
    assert v["verdict"] == "refuted"


def test_a_noisy_or_unpaired_effect_is_inconclusive():
    assert verdict(CLAIM, _table([0.6, 0.4, 0.7], [0.5, 0.5, 0.5]))["verdict"] == "inconclusive"
    one_seed = {"a": {"instance_preservation": {0: 0.9}}, "b": {"instance_preservation": {1: 0.1}}}
    v = verdict(CLAIM, one_seed)  # no seed in common: nothing paired
    assert v["verdict"] == "inconclusive" and v["seeds"] == 0
    assert verdict(CLAIM, {})["verdict"] == "inconclusive"  # a variant that never finished


def test_lower_is_better_claims_and_bounded_costs():
    sat = Claim("a less saturated", "saturation_ratio", "a", "b", "lower")
    assert verdict(sat, _table([1.01, 1.03, 1.02], [1.20, 1.25, 1.22], "saturation_ratio"))["verdict"] == "confirmed"
    cost = Claim("a costs at most 0.02", "dynamic_degree", "a", "b", "within", 0.02)
    small = _table([0.900, 0.895, 0.905], [0.905, 0.900, 0.910], "dynamic_degree")  # drop 0.005 every seed
    assert verdict(cost, small)["verdict"] == "confirmed"
    large = _table([0.80, 0.79, 0.81], [0.90, 0.90, 0.90], "dynamic_degree")  # drop 0.10
    assert verdict(cost, large)["verdict"] == "refuted"


def test_every_claim_names_variants_that_exist():
    for c in CLAIMS:
        assert c.better in ab.BY_NAME and c.worse in ab.BY_NAME and c.metric in ab.ALL_METRICS


def test_failed_runs_are_left_out_of_the_json():
    recs = [
        RunRecord("dmd", 0, "ok", "r0", metrics={"travel": 1.0}),
        RunRecord("dmd", 1, "failed", "r1", metrics={"travel": 99.0}),
        RunRecord("dmd", 2, "ok", "r2", metrics={"travel": 3.0}),
    ]
    assert ablation_json(recs, [0, 1, 2]) == {"dmd": {"travel": [1.0, 3.0]}}


def test_replace_section_keeps_the_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    replace_section(path, "ablation", "first")
    replace_section(path, "finetune", "other table")
    replace_section(path, "ablation", "second")
    text = path.read_text()
    assert "second" in text and "first" not in text and "other table" in text
    assert text.count("<!-- ablation:start -->") == 1


def _fake_world(monkeypatch, scored):
    monkeypatch.setattr("engine.toy.parts.toy_parts", lambda cfg: object())
    monkeypatch.setattr(ab, "eval_set", lambda cfg, parts, n: type("ES", (), {"real": {}, "real_codec": {}})())

    def fake_score(cfg, variant, weights, es, parts, seed, sdir):
        scored.append((variant.name, seed, Path(weights)))
        return {"instance_preservation": 0.5 + seed}, 1.0

    monkeypatch.setattr(ab, "score", fake_score)


def test_the_set_reports_failed_runs_and_never_scores_them(monkeypatch, tmp_path):
    trained, scored = [], []

    def fake_train(config, variant, seed, out, extra, nproc):
        trained.append((variant.name, seed))
        rdir = ab.run_dir(out, variant.name, seed)
        status = "failed" if (variant.name, seed) == ("dmd_tr_adareg", 1) else "ok"
        return RunRecord(variant.name, seed, status, str(rdir), str(rdir / "job.log"), 60.0, detail="exit 1")

    monkeypatch.setattr(ab, "train", fake_train)
    monkeypatch.setattr(ab, "_finished", lambda cfg: False)
    _fake_world(monkeypatch, scored)
    abl = ab.Ablation(ROOT / "configs" / "toy.yaml", tmp_path, [0, 1])
    records = abl.run(progress=lambda msg: None)
    # seed-major: every variant gets seed 0 before any gets seed 1; full_vif reuses the adaptive run
    assert trained == [(v, s) for s in (0, 1) for v in ab.TRAINED]
    by = {(r.variant, r.seed): r for r in records}
    assert by[("dmd_tr_adareg", 1)].status == "failed" and by[("full_vif", 1)].status == "failed"
    assert by[("full_vif", 1)].log.endswith("dmd_tr_adareg/seed1/job.log")
    assert ("full_vif", 1, tmp_path / "dmd_tr_adareg" / "seed1" / "export" / "transformer") not in scored
    assert ("full_vif", 0, tmp_path / "dmd_tr_adareg" / "seed0" / "export" / "transformer") in scored
    assert ("teacher", 0, ROOT / "engine" / "assets" / "toy_teacher") in [(a, b, c.resolve()) for a, b, c in scored]
    assert ablation_json(records, [0, 1])["dmd_tr_adareg"]["instance_preservation"] == [0.5]  # seed 1 left out


def test_train_reuses_finished_runs_and_resumes_or_reports_the_others(monkeypatch, tmp_path):
    calls = []
    finished = {"v": False}

    def fake_run(cmd, stdout, stderr, env):
        calls.append(cmd)
        stdout.write("job output\n")
        return subprocess.CompletedProcess(cmd, 3 if len(calls) == 1 else 0)

    def fake_finished(cfg):
        return finished["v"]

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    monkeypatch.setattr(ab, "_finished", fake_finished)
    variant = ab.BY_NAME["dmd"]
    rec = ab.train(ROOT / "configs" / "toy.yaml", variant, 4, tmp_path, ["train.max_steps=7"], 2)
    assert rec.status == "failed" and rec.detail == "exit 3" and rec.log == str(tmp_path / "dmd" / "seed4" / "job.log")
    cmd = calls[0]
    assert "method.temporal.enabled=false" in cmd and "train.seed=4" in cmd and "train.max_steps=7" in cmd
    assert f"logging.run_dir={tmp_path / 'dmd' / 'seed4'}" in cmd
    finished["v"] = True  # the re-run completes it (resuming from its checkpoints: the job's own business) ...
    monkeypatch.setattr(ab, "_finished", lambda cfg: len(calls) >= 2)
    rec = ab.train(ROOT / "configs" / "toy.yaml", variant, 4, tmp_path, ["train.max_steps=7"], 2)
    assert rec.status == "ok" and len(calls) == 2
    rec = ab.train(ROOT / "configs" / "toy.yaml", variant, 4, tmp_path, ["train.max_steps=7"], 2)
    assert rec.status == "ok" and len(calls) == 2  # ... and a finished run is reused, not retrained
    assert (tmp_path / "dmd" / "seed4" / "job.log").read_text().count("job output") == 2
    status = json.loads((tmp_path / "dmd" / "seed4" / "ablation_run.json").read_text())
    assert status["train_seconds"] >= 0 and math.isfinite(status["train_seconds"])


def test_the_command_refuses_bad_input_before_anything_runs(tmp_path):
    from launcher.ablate import main

    out = ["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]
    assert main([*out, "--variants", "dmd", "nonsense"]) == 2
    assert main([*out, "--seeds", "0", "0"]) == 2
    # the DMD variant with its only remaining loss switched off: no generator loss at all
    assert main([*out, "method.dmd.enabled=false"]) == 2
    assert not (tmp_path / "runs").exists()


def test_report_only_trains_nothing_and_scores_only_finished_runs(monkeypatch, tmp_path):
    scored = []
    monkeypatch.setattr(ab, "train", lambda *a, **k: pytest.fail("a report-only set must not train"))
    done = {str(tmp_path / "dmd" / "seed0"), str(tmp_path / "dmd_tr_adareg" / "seed0")}
    monkeypatch.setattr(ab, "_finished", lambda cfg: cfg.logging.run_dir in done)
    _fake_world(monkeypatch, scored)
    abl = ab.Ablation(ROOT / "configs" / "toy.yaml", tmp_path, [0, 1], report_only=True)
    by = {(r.variant, r.seed): r for r in abl.run(progress=lambda msg: None)}
    assert by[("dmd", 0)].status == "ok" and by[("full_vif", 0)].status == "ok"
    assert by[("dmd", 1)].status == "missing" and by[("full_vif", 1)].status == "missing"
    assert by[("dmd_tr", 0)].detail == "not trained yet"
    assert {(v, s) for v, s, _ in scored} == {("teacher", 0), ("teacher", 1), ("dmd", 0), ("dmd_tr_adareg", 0),
                                              ("full_vif", 0)}  # fmt: skip
