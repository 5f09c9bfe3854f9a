"""VP9 files: round-trip fidelity (PyAV), byte determinism, pixel conversions, and DALI's CPU reader on our files."""

import numpy as np
import pytest
import torch

from engine.config import ToyWorldConfig
from engine.toy.render import render_clip, sample_params
from engine.toy.videos import psnr, read_video, to_tensor, to_uint8, write_vp9


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    cfg = ToyWorldConfig(seed=4)
    return np.stack([render_clip(sample_params(cfg, i), 32, 32, 9) for i in range(6)])  # (6, 9, 32, 32, 3)


@pytest.mark.parametrize("pix_fmt, min_psnr", [("yuv444p", 45.0), ("yuv420p", 30.0)])
def test_vp9_round_trip(tmp_path, clips, pix_fmt, min_psnr):
    decoded = []
    for i, clip in enumerate(clips):
        path = tmp_path / f"{i}.webm"
        write_vp9(path, clip, fps=8.0, pix_fmt=pix_fmt)
        decoded.append(read_video(path))
    decoded = np.stack(decoded)
    assert decoded.shape == clips.shape and decoded.dtype == np.uint8
    value = psnr(decoded, clips)
    print(f"VP9 {pix_fmt} round trip: {value:.2f} dB")  # reported with -s
    assert value >= min_psnr


def test_same_frames_same_bytes(tmp_path, clips):
    write_vp9(tmp_path / "a.webm", clips[0], fps=8.0)
    write_vp9(tmp_path / "b.webm", clips[0], fps=8.0)
    assert (tmp_path / "a.webm").read_bytes() == (tmp_path / "b.webm").read_bytes()


def test_bad_inputs_raise(tmp_path, clips):
    with pytest.raises(ValueError, match="uint8"):
        write_vp9(tmp_path / "x.webm", clips[0].astype(np.float32), fps=8.0)
    with pytest.raises(ValueError, match="pix_fmt"):
        write_vp9(tmp_path / "x.webm", clips[0], fps=8.0, pix_fmt="rgb24")
    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"not a video")
    with pytest.raises(Exception):  # noqa: B017 - PyAV raises its own error types
        read_video(broken)


def test_pixel_conversions(clips):
    x = to_tensor(clips)
    assert x.shape == (6, 3, 9, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[2, :, 4, 7, 9], torch.from_numpy(clips[2, 4, 7, 9]).float() / 127.5 - 1)
    assert np.array_equal(to_uint8(x), clips)  # exact inverse on uint8 values
    assert to_tensor(clips[0]).shape == (1, 3, 9, 32, 32)


def test_psnr_formula():
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    b[0, 0] = 16  # mse = 256 / 16 = 16
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 16))
    assert psnr(a, a) == float("inf")


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv420p"])
def test_dali_cpu_reader_reads_our_files(tmp_path, clips, pix_fmt):
    dali = pytest.importorskip("nvidia.dali")  # the [dali] extra
    files = []
    for i, clip in enumerate(clips):
        files.append(str(tmp_path / f"{i}.webm"))
        write_vp9(files[-1], clip, fps=8.0, pix_fmt=pix_fmt)

    @dali.pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def pipe():
        videos, labels = dali.fn.experimental.readers.video(
            device="cpu", filenames=files, labels=list(range(len(files))), sequence_length=9, random_shuffle=False
        )
        return videos, labels

    p = pipe()
    p.build()
    videos, labels = p.run()
    for k in range(len(files)):
        got = np.array(videos[k])  # (T, H, W, 3) uint8
        index = int(np.array(labels[k]).ravel()[0])
        assert got.shape == (9, 32, 32, 3)
        if pix_fmt == "yuv444p":  # no chroma resampling: DALI and PyAV agree to the byte
            assert np.array_equal(got, read_video(files[index]))
        else:  # both upsample chroma, differently; each stays close to the source
            assert psnr(got, clips[index]) >= 30.0
