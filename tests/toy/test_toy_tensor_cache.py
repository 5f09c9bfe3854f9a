"""The toy tensor cache (tensors-*.safetensors next to the manifest) is checked on every load: a truncated or garbled
file is rebuilt, with one warning, to the same tensors as a fresh build."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.toy.data import toy_tensors
from engine.toy.parts import toy_parts

TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = load_config(TOY, [f"toy.cache_dir={tmp_path_factory.mktemp('toy')}", "toy.num_clips=8"])
    parts = toy_parts(cfg)
    fresh = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
    (cache,) = Path(cfg.toy.cache_dir).rglob("tensors-*.safetensors")
    return cfg, parts, fresh, cache, cache.read_bytes()


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garble_values(data: bytes) -> bytes:  # the header still parses; a run of tensor bytes become NaN/garbage
    return data[:-64] + b"\xff" * 64


def _garble_header(data: bytes) -> bytes:
    return data[:8] + b"#" * 16 + data[24:]


@pytest.mark.parametrize("damage", [_truncate, _garble_values, _garble_header, lambda d: b""])
def test_a_damaged_cache_is_rebuilt_once(world, damage, caplog):
    cfg, parts, fresh, cache, good = world
    cache.write_bytes(damage(good))
    with caplog.at_level(logging.WARNING, logger="engine.toy.data"):
        again = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
        toy_tensors(cfg.toy, parts.codec, parts.text, split="train")  # the rebuilt file is good: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.name == "engine.toy.data"]
    assert len(warnings) == 1 and "rebuilding" in warnings[0] and str(cache) in warnings[0]
    assert torch.equal(again.latents, fresh.latents) and torch.equal(again.context, fresh.context)
    assert torch.isfinite(again.latents).all()
    assert cache.read_bytes() == good  # the same file as the first build


def test_an_intact_cache_is_read_without_a_warning(world, caplog):
    cfg, parts, fresh, cache, good = world
    cache.write_bytes(good)
    with caplog.at_level(logging.WARNING, logger="engine.toy.data"):
        again = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
    assert not [r for r in caplog.records if r.name == "engine.toy.data"]
    assert torch.equal(again.latents, fresh.latents)
