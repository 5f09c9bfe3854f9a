"""Frame decoders behind the video reader: PyAV (any codec FFmpeg knows, CPU) and DALI (GPU, or CPU for VP8/VP9/MJPEG).

A decoder works in two stages so the reader can overlap I/O with decoding:

- ``prepare(path, info, indices)`` runs in the reader's worker threads: PyAV decodes the frames there; DALI only
  reads the file's bytes (or, for a codec its CPU backend cannot decode, hands the file to the PyAV fallback);
- ``decode(prepared)`` runs once per chunk in the reader's producer thread: DALI decodes the whole chunk as one batch.

Both return frames as ``(T, H, W, 3)`` uint8 tensors (or a :class:`BadSample` per failed item). Colour conversion
matches: DALI converts YUV 4:2:0 to RGB with BT.601 and bilinear chroma upsampling, and PyAV's swscale does the same
when asked for ``BILINEAR | FULL_CHR_H_INT | ACCURATE_RND`` (measured: bit-identical on the VP9 test clips; swscale's
default nearest-chroma path differs by up to 70 levels at colour edges).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation

from engine.data.probe import BT601_COLORSPACES, DALI_CPU_CODECS, DALI_GPU_CODECS, VideoInfo
from engine.data.skips import BadSample

logger = logging.getLogger("engine.data")

_DALI_CODECS = {"cpu": DALI_CPU_CODECS, "gpu": DALI_GPU_CODECS}
_RGB_FLAGS = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


def decode_frames_pyav(path: str, indices: np.ndarray, threads: int = 1) -> torch.Tensor:
    """Frames ``indices`` (any order, repeats allowed) of ``path`` as (T, H, W, 3) uint8, decoding from the start."""
    wanted: dict[int, list[int]] = {}
    for pos, i in enumerate(indices.tolist()):
        wanted.setdefault(i, []).append(pos)
    last = max(wanted)
    out: Optional[np.ndarray] = None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            for n, frame in enumerate(container.decode(stream)):
                if n in wanted:
                    rgb = frame.to_ndarray(format="rgb24", interpolation=_RGB_FLAGS)  # (H, W, 3)
                    if out is None:
                        out = np.empty((len(indices), *rgb.shape), np.uint8)
                    out[wanted[n]] = rgb
                if n == last:
                    return torch.from_numpy(out)
    except av.FFmpegError as exc:
        raise BadSample("decode_error", f"{path}: {exc}") from exc
    raise BadSample("truncated", f"{path}: stream ended before frame {last}")


class PyAVDecoder:
    """Decodes in the reader's worker threads; ``decode`` passes the frames through."""

    name = "pyav"
    on_gpu = False

    def __init__(self, threads: int = 1):
        self.threads = threads

    def prepare(self, path: str, info: VideoInfo, indices: np.ndarray) -> torch.Tensor:
        return decode_frames_pyav(path, indices, self.threads)

    def decode(self, prepared: list[Any]) -> list[Any]:
        return prepared


@dataclass
class _Encoded:
    path: str
    data: np.ndarray  # (bytes,) uint8: the whole file
    frames: np.ndarray  # (T,) int32 frame indices


class DaliDecoder:
    """NVIDIA DALI's ``fn.decoders.video`` over in-memory files, one pipeline run per chunk.

    ``device="gpu"`` decodes on NVDEC (``mixed`` backend) into CUDA memory; ``device="cpu"`` uses DALI's libavcodec
    backend, which handles VP8/VP9/MJPEG only. Both backends convert every file as BT.601. A file in another codec
    goes to ``fallback`` (a PyAV decoder) when given, else it is skipped as ``unsupported_codec``. A file tagged with
    another colour space (BT.709: most HD video) also goes to the fallback, or without one is decoded anyway with a
    warning (:func:`dali_route` decides, for both devices). The pipeline survives a failed run (checked on DALI
    2.4), so a chunk that fails is re-decoded one file at a time to find the bad one.
    """

    name = "dali"

    def __init__(
        self,
        device: str = "cpu",
        *,
        device_id: Optional[int] = None,
        num_threads: int = 2,
        max_batch: int = 8,
        fallback: Optional[PyAVDecoder] = None,
    ):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DALI device must be cpu or gpu, got {device!r}")
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self.device, self.device_id, self.num_threads = device, device_id, max(1, num_threads)
        self.max_batch, self.fallback = max_batch, fallback
        self.codecs = _DALI_CODECS[device]
        self.on_gpu = device == "gpu"
        self._pipe = None
        self.fallback_paths: set[str] = set()  # files handed to PyAV (logged once each)
        self._warned: set[str] = set()

    def prepare(self, path: str, info: VideoInfo, indices: np.ndarray) -> Any:
        why = dali_route(self.device, info)
        if why is None:
            return _Encoded(path, np.fromfile(path, dtype=np.uint8), indices.astype(np.int32))
        if self.fallback is not None:
            if path not in self.fallback_paths:
                self.fallback_paths.add(path)
                logger.info("DALI %s: %s has %s, decoding it with PyAV", self.device, path, why)
            return self.fallback.prepare(path, info, indices)
        if info.codec not in self.codecs:
            raise BadSample("unsupported_codec", f"{path}: DALI ({self.device}) cannot decode {info.codec}")
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("DALI %s decodes %s despite its %s: colours will be approximate", self.device, path, why)
        return _Encoded(path, np.fromfile(path, dtype=np.uint8), indices.astype(np.int32))

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            backend = "mixed" if self.on_gpu else "cpu"
            return fn.decoders.video(encoded, device=backend, frames=frames)

        p = pipe()
        p.build()
        return p

    def _run(self, items: list[_Encoded]) -> list[torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [e.data for e in items])
        self._pipe.feed_input("frames", [e.frames for e in items])
        (out,) = self._pipe.run()
        return [self._to_torch(out[i]) for i in range(len(items))]

    def _to_torch(self, tensor) -> torch.Tensor:
        if not self.on_gpu:
            return torch.from_numpy(np.array(tensor))  # copy: DALI reuses its output buffers next run
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dev = torch.device("cuda", self.device_id)
        arr = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=dev)
        feed_ndarray(tensor, arr, cuda_stream=torch.cuda.current_stream(dev))
        return arr

    def _decode_each(self, items: list[_Encoded]) -> list[Any]:
        out: list[Any] = []
        for e in items:
            try:
                out.extend(self._run([e]))
            except RuntimeError as exc:
                first = next((ln for ln in str(exc).splitlines() if "Error" in ln or "error" in ln), str(exc))
                out.append(BadSample("decode_error", f"{e.path}: DALI: {first.strip()[:200]}"))
        return out

    @staticmethod
    def _check(e: _Encoded, f: Any) -> Any:
        if isinstance(f, torch.Tensor) and f.shape[0] != len(e.frames):
            return BadSample("decode_error", f"{e.path}: DALI returned {f.shape[0]} of {len(e.frames)} frames")
        return f

    def decode(self, prepared: list[Any]) -> list[Any]:
        encoded = [p for p in prepared if isinstance(p, _Encoded)]
        if not encoded:
            return [self._to_device(p) for p in prepared]
        try:
            frames = self._run(encoded)
        except RuntimeError:
            frames = self._decode_each(encoded)
        it = iter([self._check(e, f) for e, f in zip(encoded, frames)])
        return [next(it) if isinstance(p, _Encoded) else self._to_device(p) for p in prepared]

    def _to_device(self, item: Any) -> Any:
        """PyAV-fallback frames join the DALI ones on the GPU, so a batch never mixes devices."""
        if self.on_gpu and isinstance(item, torch.Tensor):
            return item.to(torch.device("cuda", self.device_id), non_blocking=True)
        return item


def dali_route(device: str, info: VideoInfo) -> Optional[str]:
    """Why DALI on ``device`` ("cpu" or "gpu") should not decode a file described by ``info``, or None.

    :class:`DaliDecoder` asks this for every file on either device, so a CPU test of it is a test of the GPU path.
    """
    if info.codec not in _DALI_CODECS[device]:
        return f"codec {info.codec}"
    if info.colorspace not in BT601_COLORSPACES:
        # DALI 2.4 converts with BT.601 whatever the header says: the CPU backend (measured: ~7 levels off on average
        # on BT.709 clips, 33 at worst) and the mixed backend's NV12 kernel alike (its conversion has no other matrix).
        # PyAV follows the tag (within 2 levels of the source).
        return f"colour space {info.colorspace} (DALI {device} assumes BT.601)"
    return None


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True
