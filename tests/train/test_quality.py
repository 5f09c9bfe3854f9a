"""The quality monitor's scores against independent computations, its drift warnings and its files."""

import colorsys
import json

import numpy as np
import pytest
import torch

from engine.config import RunConfig
from engine.train.quality import Margins, QualityMonitor, drift_warnings, drop_rows_after, video_scores


def _videos(seed=0, n=2, t=5, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, t, h, w), generator=g) * 2 - 1


def test_video_scores_match_a_pixel_by_pixel_computation():
    videos = _videos()
    latents = torch.randn((2, 4, 3, 2, 2), generator=torch.Generator().manual_seed(1))
    got = video_scores(latents, videos)
    pixels = ((videos + 1) * 127.5).round().clamp(0, 255) / 255.0  # the uint8 frames the scores see, in [0, 1]
    rgb = pixels.permute(0, 2, 3, 4, 1).reshape(-1, 3).numpy()
    sat = np.mean([colorsys.rgb_to_hsv(*p)[1] for p in rgb])
    assert got["saturation"] == pytest.approx(sat, abs=2e-3)  # OpenCV rounds S to 8 bits
    diff = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean()
    assert got["frame_diff"] == pytest.approx(float(diff), rel=1e-5)
    lat = latents.numpy()
    var = np.mean([lat[b, c, :, i, j].var() for b in range(2) for c in range(4) for i in range(2) for j in range(2)])
    assert got["latent_temporal_variance"] == pytest.approx(var, rel=1e-5)


def test_frozen_frames_score_no_motion():
    frozen = _videos(t=1).expand(-1, -1, 5, -1, -1)
    lat = torch.randn(2, 4, 1, 2, 2).expand(-1, -1, 3, -1, -1)
    s = video_scores(lat, frozen)
    assert s["frame_diff"] == 0.0 and s["latent_temporal_variance"] == pytest.approx(0.0, abs=1e-12)


def test_drift_warnings_name_the_score_and_respect_the_margins():
    teacher = {"saturation": 0.30, "frame_diff": 0.020, "travel": 10.0}
    m = Margins(saturation=0.10, motion=0.25)
    assert drift_warnings({"saturation": 0.32, "frame_diff": 0.016, "travel": 8.0}, teacher, m) == []
    out = drift_warnings({"saturation": 0.36, "frame_diff": 0.010, "travel": 11.0}, teacher, m)
    assert len(out) == 2
    assert out[0].startswith("saturation 0.36 is 20% above the teacher's 0.3")
    assert out[1].startswith("frame_diff 0.01 is 50% below the teacher's 0.02")
    # more motion or less saturation than the teacher is no drift
    assert drift_warnings({"saturation": 0.1, "frame_diff": 0.1}, teacher, m) == []


def test_monitor_caches_the_teacher_by_key_and_appends_scores(tmp_path):
    cfg = RunConfig()
    cfg.logging.run_dir = str(tmp_path)
    key = {"teacher": "abc", "prompts": ["p"]}
    mon = QualityMonitor(cfg, scorer=lambda v: {"travel": 3.0}, teacher_key=key)
    assert mon.needs_teacher
    lat, vid = torch.zeros(2, 4, 3, 2, 2), _videos()
    mon.set_teacher(lat, vid)
    assert QualityMonitor(cfg, teacher_key=key).teacher == mon.teacher  # cached for a resumed run
    assert QualityMonitor(cfg, teacher_key={**key, "teacher": "other"}).needs_teacher  # other weights: redrawn
    assert not QualityMonitor(cfg, teacher_key=None).needs_teacher  # no reference asked for
    r1 = mon.report(10, lat, vid)
    r2 = mon.report(20, lat, vid * 0)
    assert r1["scores"]["travel"] == 3.0 and r1["warnings"] == []
    assert any(w.startswith("frame_diff") for w in r2["warnings"])  # frozen frames: the motion fell
    rows = [json.loads(x) for x in (tmp_path / "quality" / "scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    drop_rows_after(tmp_path / "quality" / "scores.jsonl", 10)  # a run resumed from step 10 redoes step 20
    rows = [json.loads(x) for x in (tmp_path / "quality" / "scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10]
