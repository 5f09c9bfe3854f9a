"""GPU data paths (skipped without CUDA): DALI NVDEC decode into CUDA memory, and the text encoder on CUDA."""

from __future__ import annotations

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
