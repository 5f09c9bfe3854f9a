"""Shared fixtures of the toy-world tests: one small VP9 dataset per session (seed 1, so the shipped codec, fitted on
seed 0, sees it as held-out data) and a metric reference calibrated on rendered clips."""

import numpy as np
import pytest

from engine.config import ToyWorldConfig
from engine.toy.metrics import calibrate
from engine.toy.render import render_clip, sample_params
from engine.toy.world import ensure_dataset, load_clips


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> ToyWorldConfig:
    return ToyWorldConfig(cache_dir=str(tmp_path_factory.mktemp("toy")), num_clips=48, seed=1, val_fraction=0.25)


@pytest.fixture(scope="session")
def small_manifest(small_world):
    return ensure_dataset(small_world, progress=False)


@pytest.fixture(scope="session")
def small_clips(small_manifest):
    """(videos uint8 (N, T, H, W, 3), params, captions) of the whole small dataset, decoded from its files."""
    return load_clips(small_manifest)


@pytest.fixture(scope="session")
def reference():
    """Metric reference from 80 rendered clips of the default world (seed 2): both static and moving ones."""
    cfg = ToyWorldConfig(seed=2)
    params = [sample_params(cfg, i) for i in range(80)]
    videos = np.stack([render_clip(p, cfg.height, cfg.width, cfg.num_frames) for p in params])
    return calibrate(videos, params)
