"""Generated videos as mp4: PyAV probes what write_mp4 wrote (codec, frames, size, fps)."""

import numpy as np
import torch

from engine.data.mp4 import probe, to_frames, write_mp4


def test_write_and_probe(tmp_path):
    video = torch.linspace(-1, 1, 3 * 9 * 15 * 21).reshape(3, 9, 15, 21)  # odd sizes: padded to even
    frames = to_frames(video)
    assert frames.shape == (9, 15, 21, 3) and frames.dtype == np.uint8
    assert frames.min() == 0 and frames.max() == 255
    path = write_mp4(tmp_path / "a" / "clip.mp4", frames, fps=8, scale=2)
    info = probe(path)
    assert info == {"codec": "h264", "frames": 9, "width": 42, "height": 30, "fps": 8.0}
    assert not list((tmp_path / "a").glob(".*tmp*"))  # written under a temporary name, then renamed
