"""GPU data paths (skipped without CUDA): DALI NVDEC decode into CUDA memory, and the text encoder on CUDA."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine.data.decoders import DaliDecoder, PyAVDecoder
from engine.data.manifest import ManifestEntry
from engine.data.reader import VideoReader, make_decoder

pytestmark = pytest.mark.gpu


def _read(entries, decoder):
    r = VideoReader(entries, decoder, batch_size=2, num_frames=9, fps=16.0, height=32, width=32, num_epochs=1)
    return list(r)


def test_dali_gpu_matches_pyav(vp9_entries, h264_path):
    entries = [*vp9_entries[:3], ManifestEntry(3, h264_path, "h264")]  # NVDEC decodes H.264 too
    gpu = _read(entries, DaliDecoder("gpu", max_batch=2))
    cpu = _read(entries, PyAVDecoder())
    assert all(b["video"].is_cuda for b in gpu)
    assert [b["index"].tolist() for b in gpu] == [b["index"].tolist() for b in cpu]
    for a, b in zip(gpu, cpu):
        diff = (a["video"].cpu() - b["video"]).abs()
        print(f"max |DALI GPU - PyAV| = {diff.max().item() * 127.5:.1f} levels, mean {diff.mean().item() * 127.5:.2f}")
        # NVDEC's YUV->RGB kernel is not swscale: allow a few levels on average, never a different picture.
        assert diff.mean() * 127.5 < 2.0 and diff.max() * 127.5 < 24


def test_bt709_clips_decode_right_on_the_gpu_path(tmp_path, caplog):
    # DALI's mixed backend converts NV12 as BT.601 whatever the tag; the GPU decoder sends BT.709 files to PyAV.
    from tests.data.clips import moving_pattern, write_clip

    paths = [write_clip(tmp_path / f"c{bt}", codec="h264", num_frames=30, bt709=bt) for bt in (True, False)]
    entries = [ManifestEntry(i, p, "x") for i, p in enumerate(paths)]
    frames = np.stack([moving_pattern(t, 48, 64) for t in [0, 2, 3, 5, 6, 8, 9, 11, 12]])
    source = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0

    def errors(decoder):  # mean |decoded - source| in levels for the BT.709 and the BT.601 clip
        kw = dict(batch_size=2, num_frames=9, fps=16.0, height=48, width=64, num_epochs=1)
        (batch,) = list(VideoReader(entries, decoder, shuffle=False, random_clip_start=False, **kw))
        return [((v.cpu() - source).abs().mean() * 127.5).item() for v in batch["video"]]

    auto = make_decoder("auto")
    assert isinstance(auto, DaliDecoder) and auto.on_gpu
    routed_709, dali_601 = errors(auto)
    assert auto.fallback_paths == {paths[0]}  # the BT.709 file went to PyAV, the BT.601 one stayed on NVDEC
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        strict_709, _ = errors(DaliDecoder("gpu", max_batch=2))
    pyav_709, _ = errors(PyAVDecoder())
    print(f"mean error (levels): routed {routed_709:.2f}, PyAV {pyav_709:.2f}, NVDEC as BT.601 {strict_709:.2f}")
    assert routed_709 == pytest.approx(pyav_709) and routed_709 < dali_601 + 1.0
    assert strict_709 > 2 * routed_709  # what routing avoids (DALI 2.4's mixed backend)
    assert any("colours will be approximate" in r.getMessage() for r in caplog.records)


def test_auto_picks_dali_gpu_with_cuda():
    dec = make_decoder("auto")
    assert isinstance(dec, DaliDecoder) and dec.device == "gpu" and "h264" in dec.codecs


def test_text_encoder_on_cuda_matches_cpu(tmp_path):
    from engine.data.text import UMT5TextEncoder
    from tests.data.tiny_models import save_text_encoder

    save_text_encoder(tmp_path)
    cpu = UMT5TextEncoder.from_pretrained(tmp_path, max_length=8)
    gpu = UMT5TextEncoder.from_pretrained(tmp_path, max_length=8, device="cuda")
    prompts = ["a red ball", "two dogs"]
    torch.testing.assert_close(gpu.encode(prompts)[0].cpu(), cpu.encode(prompts)[0], rtol=1e-4, atol=1e-4)
