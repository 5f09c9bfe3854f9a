"""Tiny video fixtures written with PyAV: moving colour patterns in VP9 (DALI's CPU codec), H.264 and lossless FFV1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Interpolation

RGB_FLAGS = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND

# (container suffix, encoder, pixel format, encoder options)
CODECS = {
    "vp9": (".webm", "libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "lossless": "0"}),
    "h264": (".mp4", "libx264", "yuv420p", {"preset": "ultrafast"}),
    "ffv1": (".mkv", "ffv1", "yuv444p", {}),
}


def moving_pattern(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: smooth colour gradients drifting with ``t`` plus a bright moving square (real motion)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = seed * 0.7
    r = 127 + 100 * np.sin((x + 2 * t) / 7.0 + phase)
    g = 127 + 100 * np.cos((y - t) / 5.0 + phase)
    b = 127 + 100 * np.sin((x + y + 3 * t) / 9.0)
    img = np.stack([r, g, b], -1)
    s = max(4, min(h, w) // 4)
    top, left = (3 * t + 5 * seed) % max(1, h - s), (2 * t + 3 * seed) % max(1, w - s)
    img[top : top + s, left : left + s] = (250, 250, 40)
    return img.clip(0, 255).astype(np.uint8)


def write_clip(
    path: str | Path,
    *,
    codec: str = "vp9",
    num_frames: int = 24,
    width: int = 64,
    height: int = 48,
    fps: int = 24,
    frame_fn: Callable[[int, int, int], np.ndarray] | None = None,
    seed: int = 0,
    bt709: bool = False,
) -> str:
    """Encode a clip; ``frame_fn(t, h, w) -> (h, w, 3) uint8`` (default: :func:`moving_pattern`).

    ``bt709``: convert RGB -> YUV with BT.709 and tag the stream so (as HD video usually is); default BT.601, untagged.
    """
    suffix, encoder, pix_fmt, options = CODECS[codec]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    path = str(Path(path).with_suffix(suffix))
    frame_fn = frame_fn or (lambda t, h, w: moving_pattern(t, h, w, seed))
    with av.open(path, "w") as out:
        stream = out.add_stream(encoder, rate=fps, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if bt709:
            stream.codec_context.colorspace = 1  # AVCOL_SPC_BT709
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_fn(t, height, width), format="rgb24")
            if bt709:
                frame = frame.reformat(format=pix_fmt, dst_colorspace="ITU709", interpolation=RGB_FLAGS)
                frame.colorspace = 1
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def mean_saturation_scorer(rgb: np.ndarray) -> float:
    """A stand-in aesthetic scorer for tests (importable by worker processes): mean HSV saturation of a frame."""
    import cv2

    return float(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].mean())
