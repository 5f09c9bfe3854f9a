"""VP9 files for the toy world (PyAV), and the pixel conventions shared by the toy modules.

Two pixel forms meet here: uint8 RGB numpy ``(T, H, W, 3)`` per clip (what files, OpenCV and the metrics use) and
float torch ``(B, 3, T, H, W)`` in [-1, 1] (what the codec and the DiT use). :func:`to_tensor` and :func:`to_uint8`
convert between them; every other toy module takes one form and converts at its boundary.

Files are WebM (Matroska) with VP9, because DALI's CPU decoder reads VP9 and not H.264 (docs/architecture.md#decoders).
Measured here on 32x32 clips: lossless ``yuv444p`` decodes to the same bytes in DALI (CPU) and PyAV and keeps ~60 dB of
PSNR (only RGB -> YUV rounding is lost); ``yuv420p`` halves chroma resolution (~40 dB on sharp colour edges) and DALI
and PyAV then upsample chroma differently (up to 32 levels apart at edges). ``fflags=+bitexact`` drops the random
segment UID and date of the muxer, so the same frames give the same file bytes.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from engine.config import TOY_PIX_FMTS

PIX_FMTS = TOY_PIX_FMTS


def write_vp9(path: str | Path, frames: np.ndarray, fps: float, pix_fmt: str = "yuv444p") -> None:
    """Write uint8 RGB frames ``(T, H, W, 3)`` as a VP9 WebM file (lossless for yuv444p; yuv420p needs even sizes)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if pix_fmt not in PIX_FMTS:
        raise ValueError(f"pix_fmt must be one of {PIX_FMTS}, got {pix_fmt!r}")
    _, height, width, _ = frames.shape
    with av.open(str(path), "w", format="webm", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=_rate(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # Fastest libvpx preset: 6 ms a 32x32x9 clip instead of 19 ms, same pixels (lossless), files ~1.5x larger.
        stream.options = {"lossless": "1", "deadline": "realtime", "cpu-used": "8", "row-mt": "0"}
        stream.thread_count = 1  # one thread: the encoder's output bytes do not depend on scheduling
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a file with PyAV: uint8 RGB ``(T, H, W, 3)``. Raises av.FFmpegError on a broken file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1  # FFmpeg's default thread pool costs more than a 9-frame 32x32 clip: 7 ms vs 14 ms
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


def frames_hash(frames: np.ndarray) -> str:
    """Hash of a uint8 clip's pixels and shape (for determinism checks)."""
    return sha256_bytes(str(frames.shape).encode() + np.ascontiguousarray(frames).tobytes())


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (peak 255 for uint8, 2 for [-1, 1] tensors)."""
    a_t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b_t = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    mse = torch.mean((a_t - b_t) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def to_tensor(videos: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, T, H, W, 3)`` (or one clip ``(T, H, W, 3)``) -> float32 ``(N, 3, T, H, W)`` in [-1, 1]."""
    if videos.ndim == 4:
        videos = videos[None]
    x = torch.from_numpy(np.ascontiguousarray(videos)).float()  # (N, T, H, W, 3)
    return (x.permute(0, 4, 1, 2, 3) / 127.5 - 1.0).contiguous()  # (N, 3, T, H, W)


def to_uint8(videos: torch.Tensor | np.ndarray) -> np.ndarray:
    """float ``(N, 3, T, H, W)`` in [-1, 1] -> uint8 ``(N, T, H, W, 3)``; uint8 numpy input passes through."""
    if isinstance(videos, np.ndarray):
        if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"numpy videos must be uint8 (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
        return videos
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"tensor videos must be (N, 3, T, H, W), got {tuple(videos.shape)}")
    x = ((videos.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().numpy()  # (N, T, H, W, 3)
