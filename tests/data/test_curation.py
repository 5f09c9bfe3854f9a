"""Curation: each appendix-6 filter rejects its hand-made fixture, good clips are kept, ranking, report, resume;
changed thresholds re-decide from the stored measurements; bad input (duplicates, short or truncated files)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import engine.data.curation_stats as curation_stats
from engine.data.curation import UNITS, CurationConfig, curate, rank
from engine.data.curation_stats import hue_entropy, laplacian_variance
from engine.data.manifest import ManifestError, load_manifest
from engine.data.probe import clip_frame_indices, probe_video
from engine.data.skips import BadSample
from launcher import curate as curate_cli
from tests.data.clips import moving_pattern, write_clip
from tests.data.conftest import write_jsonl

N = 62  # frames: the paper checks frames 1, 21, 41 and 61


def mono(t, h, w):
    frame = np.empty((h, w, 3), np.uint8)
    frame[:] = (30 + t, 60 + 2 * t, 200)  # one flat blue, fading: a single hue
    return frame


def blurry(t, h, w):
    return cv2.GaussianBlur(moving_pattern(t, h, w), (0, 0), 4)


def static(t, h, w):
    return moving_pattern(0, h, w)  # sharp and colourful, but nothing moves


def flicker(t, h, w):
    frame = moving_pattern(t, h, w)
    return frame if t % 2 else 255 - frame  # moves, but inverts every other frame


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    small = dict(codec="ffv1", num_frames=N, width=64, height=48)
    return {
        "good": write_clip(d / "good", **small),
        "good2": write_clip(d / "good2", **small, seed=3),
        "mono": write_clip(d / "mono", **small, frame_fn=mono),
        "blurry": write_clip(d / "blurry", **small, frame_fn=blurry),
        "static": write_clip(d / "static", **small, frame_fn=static),
        "lowres": write_clip(d / "lowres", codec="ffv1", num_frames=N, width=48, height=32),
        "flicker": write_clip(d / "flicker", **small, frame_fn=flicker),
    }


# The fixtures are 64x48, so the resolution filter is set to 64x48 here (the paper's 1280x720 is the default,
# checked in test_defaults_are_the_papers); the low-res fixture is 48x32. The training clip is 9 frames at 16 fps
# (13 source frames at 24 fps) instead of the recipes' 81. Every other threshold is the paper's.
SMALL = dict(min_width=64, min_height=48, workers=2, clip_frames=9, clip_fps=16.0)


def test_defaults_are_the_papers():
    c = CurationConfig()
    assert (c.min_width, c.min_height, c.frame_positions) == (1280, 720, (0, 20, 40, 60))
    assert (c.hue_entropy_min, c.laplacian_var_min, c.flow_min) == (0.60, 20.0, 0.2)
    assert (c.consistency_keep, c.aesthetic_keep, c.aesthetic_scorer) == (0.5, 0.5, None)
    assert (c.clip_frames, c.clip_fps) == (81, 16.0)  # the shipped Wan recipes' data.num_frames and data.fps


def test_hue_entropy_and_laplacian_by_hand():
    two = np.zeros((4, 4, 3), np.uint8)
    two[:2] = (255, 0, 0)  # red: hue 0
    two[2:] = (0, 0, 255)  # blue: hue 120 (OpenCV)
    assert hue_entropy(two) == pytest.approx(1.0)  # two equal bins: 1 bit
    grey = np.full((4, 4, 3), 128, np.uint8)
    assert hue_entropy(grey) == 0.0
    checker = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
    lap = cv2.Laplacian(checker, cv2.CV_64F)
    assert laplacian_variance(np.repeat(checker[..., None], 3, -1)) == pytest.approx(lap.var())


def test_each_filter_rejects_its_fixture_and_good_clips_are_kept(videos, tmp_path):
    names = ["good", "good2", "mono", "blurry", "static", "lowres"]
    source = write_jsonl(tmp_path / "raw.jsonl", [{"path": videos[n], "caption": n} for n in names])
    cfg = CurationConfig(**SMALL, consistency_keep=1.0)
    summary = curate(source, tmp_path / "kept.jsonl", tmp_path / "report.jsonl", cfg, progress=False)
    by_path = {r["path"]: r for r in _report(tmp_path / "report.jsonl")}
    reasons = {n: by_path[videos[n]]["reason"] for n in names}
    assert reasons == {"good": None, "good2": None, "mono": "monochrome", "blurry": "blurry", "static": "static",
                       "lowres": "low_resolution"}  # fmt: skip
    assert summary == {"inputs": 6, "kept": 2, "monochrome": 1, "blurry": 1, "static": 1, "low_resolution": 1}
    kept = load_manifest(tmp_path / "kept.jsonl")
    assert [e.caption for e in kept.entries] == ["good", "good2"]
    assert kept.entries[0].meta["width"] == 64 and "consistency" in kept.entries[0].meta
    # Measurements, not verdicts: every decoded statistic of every video past stage 1, whichever filter it fails.
    assert len(by_path[videos["mono"]]["hue_entropy"]) == 4 and max(by_path[videos["mono"]]["hue_entropy"]) < 0.6
    assert min(by_path[videos["blurry"]]["laplacian_var"]) < 20.0 < min(by_path[videos["good"]]["laplacian_var"])
    assert by_path[videos["static"]]["flow_mean"] < 0.2 < by_path[videos["good"]]["flow_mean"]
    for n in ("mono", "blurry", "static"):
        assert {"flow_mean", "consistency", "laplacian_var", "duration", "size", "mtime_ns"} <= set(by_path[videos[n]])
    assert by_path[videos["good"]]["duration"] == pytest.approx(N / 24)
    assert "hue_entropy" not in by_path[videos["lowres"]]  # stage 1 decides it: not decoded


def test_paper_resolution_rejects_small_videos(videos, tmp_path):
    summary = curate(_dir_of(videos, ["good"], tmp_path), tmp_path / "k.jsonl", tmp_path / "r.jsonl", progress=False)
    assert summary == {"inputs": 1, "kept": 0, "low_resolution": 1}


def test_consistency_and_aesthetic_rankings(videos, tmp_path):
    rows = _run(videos, ["good", "flicker"], tmp_path, CurationConfig(**SMALL))
    assert rows[videos["flicker"]]["consistency"] < rows[videos["good"]]["consistency"]
    assert (rows[videos["good"]]["kept"], rows[videos["flicker"]]["reason"]) == (True, "low_consistency")

    scorer = "tests.data.clips:mean_saturation_scorer"
    cfg = CurationConfig(**SMALL, consistency_keep=1.0, aesthetic_scorer=scorer)
    rows = _run(videos, ["good", "good2"], tmp_path / "aes", cfg)
    scores = {n: rows[videos[n]]["aesthetic"] for n in ("good", "good2")}
    low = min(scores, key=scores.get)
    assert rows[videos[low]]["reason"] == "low_aesthetic" and sum(r["kept"] for r in rows.values()) == 1


def test_rank_keeps_the_top_half_rounding_up():
    measured = dict(width=1280, height=720, fps=16.0, num_frames=81, hue_entropy=[2.0], laplacian_var=[50.0])
    rows = [{"path": str(i), **measured, "flow_mean": 1.0, "consistency": c} for i, c in enumerate([0.9, 0.5, 0.7])]
    rows.append({"path": "x", **measured, "flow_mean": 0.1, "consistency": 1.0})
    kept = rank(rows, CurationConfig())
    assert [r["path"] for r in kept] == ["0", "2"]  # ceil(0.5 * 3) = 2
    assert [r["reason"] for r in rows] == [None, "low_consistency", None, "static"]


def test_resume_skips_videos_already_in_the_report(videos, tmp_path, monkeypatch):
    source = _dir_of(videos, ["good", "static", "mono"], tmp_path)
    cfg = CurationConfig(**{**SMALL, "workers": 1})
    first = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", cfg, progress=False)
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    (tmp_path / "r.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if killed after two videos

    analysed = []
    import engine.data.curation as curation

    real = curation._analyze_all

    def spy(todo, *args, **kwargs):
        analysed.extend(todo)
        return real(todo, *args, **kwargs)

    monkeypatch.setattr(curation, "_analyze_all", spy)
    second = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", cfg, progress=False)
    assert len(analysed) == 1 and second == first
    curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", cfg, progress=False)
    assert len(analysed) == 1  # nothing left to analyse


def test_unreadable_video_is_reported_not_fatal(videos, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"garbage" * 100)
    source = write_jsonl(tmp_path / "raw.jsonl", [{"path": str(tmp_path / "broken.mp4")}, {"path": videos["good"]}])
    summary = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", CurationConfig(**SMALL), progress=False)
    assert summary == {"inputs": 2, "kept": 1, "unreadable:not_video": 1}


class _Counting:
    """Counts the calls of a function of curation_stats (measuring runs in this process with workers=1)."""

    def __init__(self, monkeypatch, name):
        self.calls, real = [], getattr(curation_stats, name)

        def counted(path, *args, **kwargs):
            self.calls.append(path)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(curation_stats, name, counted)


def test_changed_thresholds_re_decide_from_the_stored_measurements_without_decoding(videos, tmp_path, monkeypatch):
    d = tmp_path / "raw"
    d.mkdir()
    names = ["good", "good2", "static", "lowres"]
    copies = {n: shutil.copy(videos[n], d / f"{n}{os.path.splitext(videos[n])[1]}") for n in names}
    source = write_jsonl(tmp_path / "raw.jsonl", [{"path": str(copies[n]), "caption": n} for n in names])
    decodes, probes = _Counting(monkeypatch, "_decode"), _Counting(monkeypatch, "probe_video")
    cfg = CurationConfig(**{**SMALL, "workers": 1}, consistency_keep=1.0)

    def run(**changes):
        decodes.calls.clear(), probes.calls.clear()
        summary = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", dataclasses.replace(cfg, **changes),
                         progress=False)  # fmt: skip
        rows = {r["path"]: r for r in _report(tmp_path / "r.jsonl")}
        return summary, {n: rows[str(copies[n])] for n in names}

    summary, rows = run()
    assert summary == {"inputs": 4, "kept": 2, "static": 1, "low_resolution": 1}
    assert len(decodes.calls) == 3 and len(probes.calls) == 4  # the low-resolution clip is not decoded
    flows = {n: rows[n]["flow_mean"] for n in ("good", "good2", "static")}

    # A stricter motion threshold between the good clips' flows: decided again from the report, nothing decoded.
    between = (flows["good"] + flows["good2"]) / 2
    summary, rows = run(flow_min=between)
    slow = min(("good", "good2"), key=flows.get)
    assert summary == {"inputs": 4, "kept": 1, "static": 2, "low_resolution": 1}
    assert rows[slow]["reason"] == "static" and rows[slow]["flow_mean"] == flows[slow]
    assert decodes.calls == [] and probes.calls == []
    summary, rows = run()  # and back: the first decisions again, still from the report
    assert summary["kept"] == 2 and decodes.calls == [] and probes.calls == []

    # A looser resolution threshold needs the low-resolution clip's frames: only it is decoded.
    summary, rows = run(min_width=32, min_height=32)
    assert decodes.calls == [str(copies["lowres"])] and rows["lowres"]["reason"] is None and summary["kept"] == 3
    # A changed file (other bytes, newer mtime) is measured again; the others are not.
    shutil.copy(videos["good2"], copies["good"])
    st = os.stat(copies["good"])
    os.utime(copies["good"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    summary, rows = run()
    assert decodes.calls == [str(copies["good"])] and rows["good"]["flow_mean"] == pytest.approx(flows["good2"])
    # A measuring setting (not a threshold) measures every decodable clip again.
    summary, rows = run(flow_height=24)
    assert len(decodes.calls) == 3 and rows["good"]["measured_with"]["flow_height"] == 24


def test_duplicate_paths_are_an_error_listing_their_lines(videos, tmp_path):
    same = os.path.join(os.path.dirname(videos["good"]), ".", os.path.basename(videos["good"]))  # another spelling
    rows = [{"path": videos["good"], "caption": "a good clip"}, {"path": videos["good2"], "caption": "two"},
            {"path": same, "caption": ""}, {"path": videos["good2"], "caption": "again"}]  # fmt: skip
    source = write_jsonl(tmp_path / "raw.jsonl", rows)
    listed = r"2 path\(s\) listed more than once: .*good.mkv \(lines 1, 3\); .*good2.mkv \(lines 2, 4\)"
    with pytest.raises(ManifestError, match=listed):
        curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", CurationConfig(**SMALL), progress=False)
    assert not (tmp_path / "k.jsonl").exists() and not (tmp_path / "r.jsonl").exists()


def test_skipped_manifest_rows_are_counted_in_the_summary(videos, tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_text(
        json.dumps({"path": videos["good"]}) + "\n{not json\n" + json.dumps({"caption": "no path"}) + "\n"
    )
    summary = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", CurationConfig(**SMALL), progress=False)
    assert summary == {"inputs": 1, "kept": 1, "manifest_row:bad_row": 2}


def test_clips_too_short_for_one_training_sample_are_skipped(tmp_path):
    # 9 frames at 16 fps from a 24 fps video span 8 * 24 / 16 = 12 source frames after the first: 13 frames.
    short = write_clip(tmp_path / "v12", codec="ffv1", num_frames=12, width=64, height=48)
    enough = write_clip(tmp_path / "v13", codec="ffv1", num_frames=13, width=64, height=48)
    with pytest.raises(BadSample, match="too_short"):  # the training reader agrees: it could not take a clip
        clip_frame_indices(probe_video(short), 9, 16.0)
    clip_frame_indices(probe_video(enough), 9, 16.0)
    source = write_jsonl(tmp_path / "raw.jsonl", [{"path": short}, {"path": enough}])
    cfg = CurationConfig(**{**SMALL, "frame_positions": (0, 10)}, consistency_keep=1.0)
    summary = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", cfg, progress=False)
    assert summary == {"inputs": 2, "kept": 1, "too_short": 1}
    assert [e.path for e in load_manifest(tmp_path / "k.jsonl", require_caption=False).entries] == [enough]
    # The recipes' 81 frames at 16 fps need 5 s of 24 fps video: neither clip holds one.
    summary = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl",
                     dataclasses.replace(cfg, clip_frames=81), progress=False)  # fmt: skip
    assert summary == {"inputs": 2, "kept": 0, "too_short": 2}


@pytest.mark.parametrize("codec, cut", [("h264", 0.5), ("h264", 0.05), ("vp9", 0.5), ("vp9", 30), ("ffv1", 200)])
def test_truncated_files_are_labelled_truncated(videos, tmp_path, codec, cut):
    full = write_clip(tmp_path / "full", codec=codec, num_frames=N, width=64, height=48)
    data = Path(full).read_bytes()
    broken = tmp_path / f"cut{os.path.splitext(full)[1]}"
    broken.write_bytes(data[: int(len(data) * cut) if cut < 1 else cut])
    source = write_jsonl(tmp_path / "raw.jsonl", [{"path": str(broken)}, {"path": videos["good"]}])
    summary = curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", CurationConfig(**SMALL), progress=False)
    assert summary == {"inputs": 2, "kept": 1, "unreadable:truncated": 1}
    (row,) = (r for r in _report(tmp_path / "r.jsonl") if r["path"] == str(broken))
    assert row["error"] == "truncated" and str(broken) in row["detail"]


def test_help_lists_every_override_key_with_its_unit_and_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        curate_cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    fields = dataclasses.fields(CurationConfig)
    assert set(UNITS) == {f.name for f in fields} and all(UNITS.values())
    for f in fields:
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        assert f"  {f.name}  [{UNITS[f.name]}; default {shown}]\n" in out, f.name


def test_curate_cli_takes_the_clip_length_from_a_run_config_and_refuses_duplicates(videos, tmp_path, capsys):
    short = write_clip(tmp_path / "v12", codec="ffv1", num_frames=12, width=64, height=48)
    (tmp_path / "run.yaml").write_text("data:\n  num_frames: 9\n  fps: 16.0\n")
    source = write_jsonl(tmp_path / "raw.jsonl", [{"path": short}, {"path": videos["good"]}])
    argv = [str(source), "--out", str(tmp_path / "k.jsonl"), "--report", str(tmp_path / "r.jsonl"), "--workers", "1",
            "--no-progress", "--config", str(tmp_path / "run.yaml"), "min_width=64", "min_height=48"]  # fmt: skip
    assert curate_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"inputs": 2, "kept": 1, "too_short": 1}
    write_jsonl(source, [{"path": short}, {"path": short, "caption": "twice"}])
    assert curate_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curate: error: manifest ") and "(lines 1, 2)" in err and len(err.splitlines()) == 1


def _report(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _dir_of(videos, names, tmp_path):
    d = tmp_path / "src"
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        src = videos[n]
        (d / src.split("/")[-1]).symlink_to(src)
    return d


def _run(videos, names, tmp_path, cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tmp_path / "raw.jsonl", [{"path": videos[n]} for n in names])
    curate(source, tmp_path / "k.jsonl", tmp_path / "r.jsonl", cfg, progress=False)
    return {r["path"]: r for r in _report(tmp_path / "r.jsonl")}
