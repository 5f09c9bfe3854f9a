"""What a video file holds (codec, size, fps, frame count) and which of its frames make a clip.

Both readers take the frame indices from here, so DALI and PyAV decode the *same* frames of the same file. The frame
count is the number of video packets (one displayed frame per packet for VP8/VP9/H.264/MJPEG streams as muxed by
FFmpeg; VP9 superframes are one packet), not the header's estimate: DALI silently pads indices past the real end with
black frames, so an honest count is what keeps a truncated file from turning into a clip of zeros.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import av
import numpy as np

from engine.data.skips import BadSample

# Codecs each decoder handles (docs/architecture.md#decoders, checked on this machine: DALI 2.4 CPU refuses h264).
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}
# FFmpeg colour-space codes that mean BT.601 YUV (unspecified: decoders assume BT.601 at these sizes).
BT601_COLORSPACES = frozenset({2, 5, 6})  # unspecified, BT470BG, SMPTE170M


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float
    num_frames: int
    colorspace: int = 2  # FFmpeg AVColorSpace code from the stream header (1 = BT.709, 2 = unspecified)


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    # Demuxing only (no decode): milliseconds for a few-second clip.
    return sum(1 for pkt in container.demux(stream) if pkt.size > 0)


def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Seconds of video the header announces: the stream's own duration first (an audio track may run longer)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


def _open(path: str) -> av.container.InputContainer:
    if not os.path.exists(path):
        raise BadSample("missing_file", f"{path} does not exist")
    if os.path.getsize(path) == 0:
        raise BadSample("empty_file", f"{path} has zero bytes")
    try:
        return av.open(path)
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        cut = _cut_short(path)  # an MP4 cut before its index (moov) does not open at all: say what it is
        raise BadSample("truncated" if cut else "not_video", f"{path}: {cut or exc}") from exc


def _cut_short(path: str) -> str | None:
    """How an MP4/MOV or Matroska/WebM file's own structure says it ends early; None when it does not say so."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[4:8] == b"ftyp":  # ISO base media: a chain of boxes (32-bit size, type; size 1: 64-bit size follows)
            pos = 0
            while pos < size:
                fh.seek(pos)
                box = fh.read(16)
                if len(box) < 8:
                    return f"ends inside a box header at byte {pos}"
                n, kind = int.from_bytes(box[:4], "big"), box[4:8].decode("latin-1")
                n = int.from_bytes(box[8:16], "big") if n == 1 and len(box) == 16 else (size - pos if n == 0 else n)
                if n < 8:
                    return None  # not a box chain: not ours to diagnose
                if pos + n > size:
                    return f"box {kind!r} at byte {pos} declares {n} bytes, the file ends after {size - pos}"
                pos += n
            return None
        if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: the header element, then the Segment holding everything
            fh.seek(4)
            header = _ebml_size(fh)
            if header is None:
                return "ends inside its EBML header"
            fh.seek(fh.tell() + header)
            if fh.read(4) != b"\x18\x53\x80\x67":
                return "ends before its Segment" if fh.tell() >= size else None
            n = _ebml_size(fh)
            if n is None:
                return "ends inside its Segment header"
            body = size - fh.tell()
            return f"its Segment declares {n} bytes, the file holds {body}" if n != -1 and n > body else None
    return None


def _ebml_size(fh) -> int | None:
    """An EBML variable-length size at the file position (-1: unknown size); None when the file ends inside it."""
    first = fh.read(1)
    if not first:
        return None
    if first[0] == 0:
        return -1  # longer than 8 bytes: not valid EBML, nothing to say
    length = 8 - first[0].bit_length() + 1
    rest = fh.read(length - 1)
    if len(rest) < length - 1:
        return None
    value = int.from_bytes(bytes([first[0] & (0xFF >> length)]) + rest, "big")
    return -1 if value == (1 << (7 * length)) - 1 else value


def probe_video(path: str, *, min_side: int = 16, max_side: int = 8192) -> VideoInfo:
    """Codec, size, fps and true frame count of ``path``; raises :class:`BadSample` when it cannot be a clip source."""
    container = _open(path)
    try:
        if not container.streams.video:
            cut = _cut_short(path)
            raise BadSample("truncated" if cut else "not_video", f"{path} has no video stream{f': {cut}' * bool(cut)}")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        width, height, fps = stream.codec_context.width, stream.codec_context.height, _fps(stream)
        colorspace = int(stream.codec_context.colorspace)
        if not (min_side <= width <= max_side and min_side <= height <= max_side):
            raise BadSample("bad_resolution", f"{path} is {width}x{height}, outside [{min_side}, {max_side}] per side")
        if fps <= 0:
            raise BadSample("not_video", f"{path} has no frame rate")
        duration = _duration(container, stream)
        try:
            n = _count_packets(container, stream)
        except av.FFmpegError as exc:
            raise BadSample("decode_error", f"{path}: demuxing failed: {exc}") from exc
    finally:
        container.close()
    _check_complete(path, n, fps, duration)
    return VideoInfo(codec, width, height, fps, n, colorspace)


def _check_complete(path: str, n: int, fps: float, duration: float | None) -> None:
    if n == 0:
        raise BadSample("truncated", f"{path} holds no video packet")
    if duration is not None:
        expected = duration * fps
        # A muxer's duration can be off by a frame or two; a real truncation loses far more than 10%.
        if n < 0.9 * expected - 2:
            raise BadSample("truncated", f"{path}: header announces ~{expected:.0f} frames, file holds {n}")


def clip_span(num_frames: int, src_fps: float, fps: float) -> np.ndarray:
    """Source-frame offsets of a clip of ``num_frames`` at ``fps`` taken from a ``src_fps`` video: nearest frame."""
    step = src_fps / fps
    return np.floor(np.arange(num_frames) * step + 0.5).astype(np.int64)


def clip_frame_indices(info: VideoInfo, num_frames: int, fps: float, start_fraction: float = 0.0) -> np.ndarray:
    """The ``num_frames`` source indices of one clip, starting ``start_fraction`` of the way into the free range.

    ``start_fraction`` in [0, 1): 0 takes the first frames; the reader draws it from a seeded RNG for a random clip.
    Raises ``BadSample("too_short")`` when the video cannot cover ``(num_frames - 1) / fps`` seconds.
    """
    offsets = clip_span(num_frames, info.fps, fps)
    free = info.num_frames - 1 - int(offsets[-1])
    if free < 0:
        need = int(offsets[-1]) + 1
        raise BadSample(
            "too_short",
            f"{num_frames} frames at {fps:g} fps need {need} source frames at {info.fps:g} fps, "
            f"found {info.num_frames}",
        )
    start = min(int(math.floor(start_fraction * (free + 1))), free)
    return offsets + start
