"""Dataset generation: manifest content, determinism, rendering, and repair of missing/partial/corrupted caches."""

import dataclasses
import json
import threading

import numpy as np
import pytest

from engine.config import ToyWorldConfig
from engine.toy.captions import OBJECT_COLOURS, ClipParams, ObjectParams, caption, caption_fields, parse_caption
from engine.toy.render import render_clip, rgb_of, sample_params
from engine.toy.videos import frames_hash, sha256_file
from engine.toy.world import dataset_dir, read_manifest, sync_dataset, verify_dataset


def _tiny(tmp_path, **kw) -> ToyWorldConfig:
    return ToyWorldConfig(cache_dir=str(tmp_path), num_clips=kw.pop("num_clips", 10), **kw)


def test_manifest_fields(small_world, small_manifest):
    entries = read_manifest(small_manifest)
    assert len(entries) == small_world.num_clips
    assert sum(e["split"] == "val" for e in entries) == 12  # 25% of 48, the last ones
    assert all(e["split"] == "val" for e in entries[-12:])
    for i, e in enumerate(entries):
        assert (e["fps"], e["frames"], e["width"], e["height"]) == (8.0, 9, 32, 32)
        assert (small_manifest.parent / e["path"]).is_file()
        p = ClipParams.from_dict(e["params"])
        assert p == sample_params(small_world, i)
        assert e["caption"] == caption(p)
        assert parse_caption(e["caption"]) == caption_fields(p)


def test_same_seed_same_bytes_other_seed_other_clips(tmp_path):
    a = sync_dataset(_tiny(tmp_path / "a"), progress=False).manifest.read_text()
    b = sync_dataset(_tiny(tmp_path / "b"), progress=False).manifest.read_text()
    c = sync_dataset(_tiny(tmp_path / "c", seed=5), progress=False).manifest.read_text()
    assert a == b  # captions, params, frame hashes and file sha256 identical
    hashes = lambda text: [json.loads(line)["frames_sha256"] for line in text.splitlines()]  # noqa: E731
    assert len(set(hashes(a)) & set(hashes(c))) == 0


def test_decoded_files_match_the_rendered_frames(small_world, small_manifest, small_clips):
    videos, params, _ = small_clips
    for video, p in zip(videos[:8], params[:8]):
        rendered = render_clip(p, small_world.height, small_world.width, small_world.num_frames)
        diff = np.abs(video.astype(int) - rendered.astype(int))
        assert diff.max() <= 3  # lossless VP9 4:4:4: only RGB <-> YUV rounding


def test_render_draws_what_the_params_say():
    obj = ObjectParams("red", "square", x=10.0, y=16.0, size=10.0)
    p = ClipParams((obj,), "right", 2.0, "gray", "background")
    frames = render_clip(p, 32, 32, 9)  # (T, H, W, 3)
    red = np.rint(rgb_of(OBJECT_COLOURS["red"]) * 255)
    for t in range(9):
        centre = frames[t, 16, int(10 + 2 * t)].astype(float)
        assert np.abs(centre - red).max() <= 1
        is_red = np.all(np.abs(frames[t].astype(float) - red) <= 1, axis=-1)
        cols = np.nonzero(is_red.any(axis=0))[0]
        assert cols.mean() == pytest.approx(10 - 0.5 + 2 * t, abs=0.5)  # pixel i covers [i, i + 1)
    still = render_clip(dataclasses.replace(p, direction="still", speed=0.0), 32, 32, 9)
    assert all(np.array_equal(still[0], f) for f in still)


def test_pan_moves_the_background_only():
    obj = ObjectParams("blue", "circle", x=16.0, y=16.0, size=10.0)
    p = ClipParams((obj,), "still", 0.0, "sand", "texture", "right", 1.0, seed=3)
    frames = render_clip(p, 32, 32, 5).astype(float)
    # Panning right: background content drifts left by 1 px per frame; the object stays put.
    assert np.abs(frames[1, :8, :-1] - frames[0, :8, 1:]).max() <= 2
    assert (
        np.abs(frames[1, 13:19, 13:19] - frames[0, 13:19, 13:19]).max() == 0
    )  # interior; edges mix with the background


def test_missing_cache_is_built_then_reused(tmp_path):
    cfg = _tiny(tmp_path)
    first = sync_dataset(cfg, progress=False)
    assert first.generated == 10 and "missing or partial cache (no manifest/meta)" in first.reasons
    second = sync_dataset(cfg, progress=False)
    assert second.generated == 0 and second.manifest == first.manifest


@pytest.mark.parametrize(
    "damage", ["delete manifest", "truncate manifest", "garble manifest", "blank entry", "delete meta"]
)
def test_partial_cache_is_rebuilt(tmp_path, damage):
    cfg = _tiny(tmp_path)
    manifest = sync_dataset(cfg, progress=False).manifest
    original = manifest.read_text()
    if damage == "delete manifest":
        manifest.unlink()
    elif damage == "truncate manifest":
        manifest.write_text("".join(original.splitlines(keepends=True)[:4]))
    elif damage == "garble manifest":
        manifest.write_text(original[: len(original) // 2])
    elif damage == "blank entry":
        manifest.write_text("{}\n" + "".join(original.splitlines(keepends=True)[1:]))
    else:
        (manifest.parent / "meta.json").unlink()
    assert verify_dataset(cfg)["ok"] == 0
    status = sync_dataset(cfg, progress=False)
    assert status.generated == 10
    assert manifest.read_text() == original


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_clip_is_detected_and_regenerated_alone(tmp_path, damage):
    cfg = _tiny(tmp_path)
    manifest = sync_dataset(cfg, progress=False).manifest
    entries = read_manifest(manifest)
    victim = manifest.parent / entries[3]["path"]
    data = bytearray(victim.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        victim.unlink()
    assert verify_dataset(cfg)["ok"] == 9
    status = sync_dataset(cfg, progress=False)
    assert status.generated == 1 and sum(status.reasons.values()) == 1
    assert sha256_file(victim) == entries[3]["file_sha256"]
    assert verify_dataset(cfg, deep=True) == {"ok": 10}


def test_deep_verify_decodes(tmp_path):
    cfg = _tiny(tmp_path, num_clips=4)
    manifest = sync_dataset(cfg, progress=False).manifest
    entries = read_manifest(manifest)
    entries[0]["decoded_sha256"] = frames_hash(np.zeros((1,), np.uint8))  # the file no longer matches its record
    manifest.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    assert verify_dataset(cfg)["ok"] == 4  # bytes intact
    assert verify_dataset(cfg, deep=True)["decoded pixels differ from the recorded hash"] == 1


def test_concurrent_callers_build_once(tmp_path):
    cfg = _tiny(tmp_path, num_clips=6)
    results = []
    threads = [threading.Thread(target=lambda: results.append(sync_dataset(cfg, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.generated for r in results) == [0, 6]


def test_config_changes_use_another_directory(tmp_path):
    assert dataset_dir(_tiny(tmp_path)) != dataset_dir(_tiny(tmp_path, seed=1))
    assert dataset_dir(_tiny(tmp_path)) == dataset_dir(_tiny(tmp_path))


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(num_frames=10), "num_frames"),
        (dict(speeds=(3.0,)), "speeds"),
        (dict(pix_fmt="rgb24"), "pix_fmt"),
        (dict(num_clips=0), "num_clips"),
        (dict(object_size=(0.4, 0.3)), "object_size"),
    ],
)
def test_bad_config_names_the_field(tmp_path, change, key):
    with pytest.raises(ValueError, match=key):
        _tiny(tmp_path, **change).validate()
