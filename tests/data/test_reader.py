"""Video reader: frame selection, geometry, DALI CPU vs PyAV agreement, sharding, resume, prefetch."""

from __future__ import annotations

import json
import logging
import threading
import time

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import Interpolation

from engine.data.decoders import DaliDecoder, PyAVDecoder
from engine.data.probe import clip_frame_indices, clip_span, probe_video
from engine.data.reader import VideoReader, make_decoder
from engine.data.skips import BadSample
from engine.data.transforms import cover_size, resize_center_crop
from tests.data.clips import moving_pattern, write_clip

RGB_FLAGS = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


def all_frames(path: str) -> np.ndarray:
    """Every frame of ``path`` as (N, H, W, 3) uint8, decoded here with PyAV directly."""
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24", interpolation=RGB_FLAGS) for f in c.decode(video=0)])


def to_unit(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) in [-1, 1], written out by hand."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def read_all(reader) -> list[dict]:
    return [b for b in reader]


def make(entries, decoder, **kw):
    args = dict(batch_size=2, num_frames=9, fps=16.0, height=48, width=64, seed=3, num_workers=2, prefetch=2)
    args.update(kw)
    return VideoReader(entries, decoder, **args)


# ---- frame selection and geometry -----------------------------------------------------------------------------------


def test_nearest_frame_resampling_24_to_16_fps():
    # k * 24/16 = 0, 1.5, 3, 4.5, ... rounded half up.
    assert clip_span(9, 24.0, 16.0).tolist() == [0, 2, 3, 5, 6, 8, 9, 11, 12]
    assert clip_span(4, 8.0, 16.0).tolist() == [0, 1, 1, 2]  # upsampling repeats frames
    assert clip_span(5, 16.0, 16.0).tolist() == [0, 1, 2, 3, 4]


def test_clip_indices_window_and_too_short(vp9_entries):
    info = probe_video(vp9_entries[0].path)
    assert (info.codec, info.fps, info.num_frames) == ("vp9", 24.0, 30)
    assert clip_frame_indices(info, 9, 16.0, 0.0).tolist() == [0, 2, 3, 5, 6, 8, 9, 11, 12]
    last = clip_frame_indices(info, 9, 16.0, 0.999)
    assert last[-1] == 29 and last[0] == 17  # free range is 30 - 1 - 12 = 17
    with pytest.raises(BadSample, match="too_short"):
        clip_frame_indices(info, 21, 16.0)  # needs 31 source frames


def test_cover_size_and_center_crop():
    assert cover_size(720, 1280, 480, 832) == (480, 853)
    assert cover_size(48, 64, 48, 32) == (48, 64)
    frames = torch.randint(0, 256, (3, 48, 64, 3), dtype=torch.uint8)
    # Same height, narrower target: no resize, a pure centre crop of columns 16..47.
    out = resize_center_crop(frames, 48, 32)
    assert out.shape == (3, 3, 48, 32)
    torch.testing.assert_close(out, to_unit(frames[:, :, 16:48].numpy()), rtol=0, atol=1e-6)
    # Identity size is exact.
    torch.testing.assert_close(resize_center_crop(frames, 48, 64), to_unit(frames.numpy()), rtol=0, atol=1e-6)


def test_resize_keeps_flat_colour_and_range():
    frames = torch.full((2, 30, 50, 3), 200, dtype=torch.uint8)
    out = resize_center_crop(frames, 16, 16)
    assert out.shape == (3, 2, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 200 / 127.5 - 1), rtol=0, atol=1e-5)


def test_pyav_reader_returns_the_nearest_source_frames(vp9_entries):
    reader = make(vp9_entries[:1], PyAVDecoder(), batch_size=1, num_epochs=1, random_clip_start=False)
    (batch,) = read_all(reader)
    expected = to_unit(all_frames(vp9_entries[0].path)[[0, 2, 3, 5, 6, 8, 9, 11, 12]])
    assert batch["video"].shape == (1, 3, 9, 48, 64)
    torch.testing.assert_close(batch["video"][0], expected, rtol=0, atol=1e-6)
    assert batch["caption"] == [vp9_entries[0].caption]


def test_random_clip_start_is_a_valid_window(vp9_entries):
    frames = all_frames(vp9_entries[0].path)
    offsets = np.array([0, 2, 3, 5, 6, 8, 9, 11, 12])
    starts = []
    for epoch in range(4):
        reader = make(vp9_entries[:1], PyAVDecoder(), batch_size=1, num_epochs=epoch + 1)
        reader.load_state_dict({"epoch": epoch, "cursor": 0})
        (batch,) = read_all(reader)
        match = [s for s in range(18) if torch.equal(batch["video"][0], to_unit(frames[s + offsets]))]
        assert len(match) == 1
        starts.append(match[0])
    assert len(set(starts)) > 1  # seeded per epoch, so the window moves


# ---- DALI CPU vs PyAV -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(48, 64), (32, 40)])
def test_dali_cpu_and_pyav_agree(vp9_entries, size):
    kw = dict(num_epochs=1, height=size[0], width=size[1], batch_size=4)
    pyav = read_all(make(vp9_entries, PyAVDecoder(), **kw))
    dali = read_all(make(vp9_entries, DaliDecoder("cpu", max_batch=4), **kw))
    assert [b["index"].tolist() for b in pyav] == [b["index"].tolist() for b in dali]
    assert sorted(sum((b["index"].tolist() for b in pyav), [])) == list(range(len(vp9_entries)))
    diff = max((a["video"] - b["video"]).abs().max().item() for a, b in zip(pyav, dali))
    print(f"max |DALI CPU - PyAV| at {size}: {diff:.3g} (in [-1, 1] units; {diff * 127.5:.2f} levels)")
    assert diff <= 2 / 127.5  # decoder rounding: at most 2 of 255 levels


def test_dali_fallback_decodes_h264_with_pyav(vp9_entries, h264_path):
    from engine.data.manifest import ManifestEntry

    entries = [ManifestEntry(0, h264_path, "h264 clip"), *vp9_entries[:1]]
    dali = DaliDecoder("cpu", max_batch=2, fallback=PyAVDecoder())
    got = read_all(make(entries, dali, num_epochs=1, shuffle=False, random_clip_start=False))
    ref = read_all(make(entries, PyAVDecoder(), num_epochs=1, shuffle=False, random_clip_start=False))
    torch.testing.assert_close(got[0]["video"], ref[0]["video"], rtol=0, atol=2 / 127.5)
    assert dali.fallback_paths == {h264_path}


def test_bt709_clips_go_to_pyav_on_cpu(tmp_path, caplog):
    # DALI 2.4's CPU backend converts every file as BT.601; PyAV follows the BT.709 tag of HD video.
    from engine.data.manifest import ManifestEntry

    paths = [write_clip(tmp_path / f"colours_{bt}", codec="vp9", num_frames=30, bt709=bt) for bt in (True, False)]
    assert [probe_video(p).colorspace for p in paths] == [1, 2]
    entries = [ManifestEntry(i, p, "x") for i, p in enumerate(paths)]
    kw = dict(num_epochs=1, shuffle=False, random_clip_start=False, batch_size=2)
    source = to_unit(np.stack([moving_pattern(t, 48, 64) for t in [0, 2, 3, 5, 6, 8, 9, 11, 12]]))

    def errors(decoder):  # mean |decoded - source| in levels, for the BT.709 and the BT.601 clip
        (batch,) = read_all(make(entries, decoder, **kw))
        return [((v - source).abs().mean() * 127.5).item() for v in batch["video"]], batch["video"]

    (pyav_709, pyav_601), pyav = errors(PyAVDecoder())
    assert pyav_709 < pyav_601 + 0.5  # PyAV: only the codec's loss, as for the BT.601 clip
    auto = DaliDecoder("cpu", max_batch=2, fallback=PyAVDecoder())
    assert torch.equal(errors(auto)[1], pyav) and auto.fallback_paths == {paths[0]}
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        (strict_709, strict_601), _ = errors(DaliDecoder("cpu", max_batch=2))
    print(f"mean error vs source (levels): PyAV {pyav_709:.2f}, DALI CPU without fallback {strict_709:.2f}")
    assert strict_709 > 2 * pyav_709 and strict_601 == pytest.approx(pyav_601)  # what the fallback avoids
    assert any("colours will be approximate" in r.getMessage() for r in caplog.records)


def test_bt709_clips_go_to_pyav_on_the_gpu_path(tmp_path):
    # DALI's mixed (NVDEC) backend also converts as BT.601. This runs the GPU decoder's own routing on CPU: a
    # DaliDecoder("gpu") with a device id touches no GPU until it decodes, and prepare() is where files are routed.
    from engine.data.decoders import _Encoded, dali_route

    paths = {
        (codec, bt): write_clip(tmp_path / f"{codec}_{bt}", codec=codec, num_frames=12, bt709=bt)
        for codec in ("h264", "vp9")
        for bt in (True, False)
    }
    infos = {k: probe_video(p) for k, p in paths.items()}
    assert {k: i.colorspace for k, i in infos.items()} == {k: 1 if k[1] else 2 for k in paths}
    gpu = DaliDecoder("gpu", device_id=3, fallback=PyAVDecoder())
    strict = DaliDecoder("gpu", device_id=3)
    idx = np.arange(6)
    for (codec, bt), path in paths.items():
        why = dali_route("gpu", infos[codec, bt])
        assert (why == "colour space 1 (DALI gpu assumes BT.601)") if bt else why is None
        got = gpu.prepare(path, infos[codec, bt], idx)
        if bt:  # decoded by PyAV, which follows the tag: the same frames PyAV alone gives
            assert torch.equal(got, PyAVDecoder().prepare(path, infos[codec, bt], idx))
            assert isinstance(strict.prepare(path, infos[codec, bt], idx), _Encoded)  # no fallback: DALI, warned
        else:  # BT.601 (H.264 included: NVDEC decodes it) stays on DALI
            assert isinstance(got, _Encoded) and got.frames.tolist() == idx.tolist()
    assert gpu.fallback_paths == {paths["h264", True], paths["vp9", True]}
    assert strict._warned == gpu.fallback_paths
    assert dali_route("cpu", infos["h264", False]) == "codec h264"  # the CPU backend has no H.264


def test_dali_isolates_a_file_that_fails_inside_a_batch(vp9_entries):
    from engine.data.decoders import _Encoded

    dali = DaliDecoder("cpu", max_batch=3)
    info = probe_video(vp9_entries[0].path)
    idx = np.arange(5)
    good = dali.prepare(vp9_entries[0].path, info, idx)
    broken = _Encoded("broken.webm", np.frombuffer(b"not a video at all" * 20, np.uint8), idx.astype(np.int32))
    out = dali.decode([good, broken, dali.prepare(vp9_entries[1].path, probe_video(vp9_entries[1].path), idx)])
    assert isinstance(out[1], BadSample) and out[1].reason == "decode_error"
    assert out[0].shape == (5, 48, 64, 3) and out[2].shape == (5, 64, 48, 3)


def test_make_decoder_choices():
    assert isinstance(make_decoder("pyav"), PyAVDecoder)
    auto = make_decoder("auto", cuda=False)
    assert isinstance(auto, DaliDecoder) and auto.device == "cpu" and isinstance(auto.fallback, PyAVDecoder)
    strict = make_decoder("dali", cuda=False)
    assert strict.fallback is None
    with pytest.raises(ValueError, match="unknown reader"):
        make_decoder("ffmpeg")


# ---- sharding and resume --------------------------------------------------------------------------------------------


def indices_of(batches) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def test_two_ranks_are_disjoint_and_cover_the_epoch(vp9_entries):
    seen = []
    for rank in (0, 1):
        r = make(vp9_entries, PyAVDecoder(), rank=rank, world_size=2, num_epochs=1, height=16, width=16)
        seen.append(indices_of(read_all(r)))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(vp9_entries)))
    assert len(seen[0]) == len(seen[1]) == 3


def test_same_seed_same_order_other_seed_other_order(vp9_entries):
    def order(seed, epochs=1):
        return indices_of(read_all(make(vp9_entries, PyAVDecoder(), seed=seed, num_epochs=epochs, height=16, width=16)))

    assert order(3) == order(3)
    two = order(3, epochs=2)
    assert two[:6] != two[6:] and sorted(two[6:]) == list(range(6))  # a new permutation each epoch
    assert any(order(s) != order(3) for s in (4, 5, 6))


@pytest.mark.parametrize("decoder", ["pyav", "dali"])
def test_resume_mid_epoch_continues_exactly(vp9_entries, decoder):
    def new():
        dec = PyAVDecoder() if decoder == "pyav" else DaliDecoder("cpu", max_batch=2)
        return make(vp9_entries, dec, batch_size=2, num_epochs=2, height=24, width=24, prefetch=3)

    full = read_all(new())
    first = new()
    it = iter(first)
    head = [next(it) for _ in range(4)]  # 1 1/3 epochs in; the prefetcher has read further
    time.sleep(0.2)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    it.close()
    assert (state["epoch"], state["cursor"]) == (1, 2)
    second = new()
    second.load_state_dict(state)
    tail = read_all(second)
    assert indices_of(head + tail) == indices_of(full)
    for a, b in zip(head + tail, full):
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)


def test_resume_refuses_a_different_sharding(vp9_entries):
    state = make(vp9_entries, PyAVDecoder(), rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        make(vp9_entries, PyAVDecoder(), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        make(vp9_entries, PyAVDecoder(), rank=0, world_size=2, seed=4).load_state_dict(state)


class _SlowCountingDecoder(PyAVDecoder):
    def __init__(self):
        super().__init__()
        self.prepared = 0
        self._lock = threading.Lock()

    def prepare(self, path, info, indices):
        with self._lock:
            self.prepared += 1
        return super().prepare(path, info, indices)


def test_prefetch_decodes_ahead_of_the_consumer(vp9_entries):
    dec = _SlowCountingDecoder()
    reader = make(vp9_entries * 4, dec, batch_size=2, prefetch=2, height=16, width=16)
    it = iter(reader)
    next(it)  # the consumer holds one batch and "computes"
    deadline = time.time() + 10
    while dec.prepared < 2 * (1 + 2) and time.time() < deadline:
        time.sleep(0.01)
    # Decoding ran ahead: the handed-out batch plus the `prefetch` queued ones (and the look-ahead window).
    assert dec.prepared >= 2 * (1 + 2)
    # Bounded: batches held (consumer 1, queue 2, producer 1) + a chunk being built + the look-ahead window.
    assert dec.prepared <= 2 * 4 + 2 + 2 * 3
    assert reader.state_dict()["cursor"] == 2  # the position is that of the consumer, not the prefetcher
    it.close()
