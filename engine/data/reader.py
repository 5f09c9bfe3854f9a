"""The video reader: (video, caption) batches for the trainer, sharded by rank, seeded, resumable, prefetched.

Iterating yields ``{"video": (B, 3, T, H, W) float32 in [-1, 1], "caption": list[str], "index": (B,) int64,
"path": list[str]}``. Pipeline per sample: probe (codec, size, fps, true frame count; cached) -> the clip's source
frame indices (nearest frame at the target fps, start drawn from ``(seed, epoch, index)``) -> decode (PyAV in worker
threads, or DALI per chunk) -> resize to cover + centre crop + scale (``transforms.py``). A producer thread runs ahead
by ``prefetch`` batches so decoding overlaps the training step; the position saved by ``state_dict`` is that of the
last batch *handed out*, not of the prefetcher, so a resume continues exactly after it.

Bad samples (see ``skips.py``) are skipped, counted and logged; the batch is filled with the next good samples. An
epoch in which no sample (or more than ``max_bad_fraction``) was good raises :class:`AllSamplesBadError`.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from engine.data.manifest import ManifestEntry
from engine.data.probe import VideoInfo, clip_frame_indices, probe_video
from engine.data.sampler import Position, ShardedOrder, StreamItem
from engine.data.skips import AllSamplesBadError, BadSample, SkipCounter
from engine.data.transforms import resize_center_crop


@dataclass
class _Progress:
    """What a batch hands to the consumer: the stream position after it, and the epoch's counts so far."""

    pos: Position
    good: int = 0
    bad: int = 0
    skips: Counter = field(default_factory=Counter)


class VideoReader:
    """Iterable over batches of clips from ``entries`` (see the module docstring).

    ``decoder`` is a :class:`~engine.data.decoders.PyAVDecoder` or :class:`~engine.data.decoders.DaliDecoder`;
    ``num_epochs=None`` streams forever (batches run across epoch boundaries), else the last batch may be short.
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        decoder: Any,
        *,
        batch_size: int,
        num_frames: int = 81,
        fps: float = 16.0,
        height: int = 480,
        width: int = 832,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        random_clip_start: bool = True,
        num_workers: int = 2,
        prefetch: int = 2,
        num_epochs: Optional[int] = None,
        min_side: int = 16,
        max_side: int = 8192,
        max_bad_fraction: float = 1.0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.entries, self.decoder, self.batch_size = list(entries), decoder, batch_size
        self.num_frames, self.fps, self.height, self.width = num_frames, fps, height, width
        self.order = ShardedOrder(len(self.entries), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        self.random_clip_start, self.num_epochs = random_clip_start, num_epochs
        self.num_workers, self.prefetch = max(1, num_workers), max(1, prefetch)
        self.min_side, self.max_side, self.max_bad_fraction = min_side, max_side, max_bad_fraction
        self.skipped = SkipCounter("video")
        self._progress = _Progress(Position())
        self._infos: dict[str, VideoInfo] = {}
        self._lock = threading.Lock()  # one producer at a time drives the decoder

    # ---- position ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        p = self._progress
        return {**self.order.state(p.pos), "epoch_good": p.good, "epoch_bad": p.bad, "skipped": dict(p.skips)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pos = self.order.position_from(state)
        skips = Counter(state.get("skipped", {}))
        self._progress = _Progress(pos, int(state.get("epoch_good", 0)), int(state.get("epoch_bad", 0)), skips)
        self.skipped.load_state_dict(dict(skips))

    # ---- per-sample work (worker threads) ------------------------------------------------------------------------

    def _probe(self, path: str) -> VideoInfo:
        info = self._infos.get(path)
        if info is None:
            info = self._infos[path] = probe_video(path, min_side=self.min_side, max_side=self.max_side)
        return info

    def _load(self, item: StreamItem) -> Any:
        path = self.entries[item.index].path
        try:
            info = self._probe(path)
            frac = self.order.clip_fraction(item.epoch, item.index) if self.random_clip_start else 0.0
            return self.decoder.prepare(path, info, clip_frame_indices(info, self.num_frames, self.fps, frac))
        except BadSample as err:
            return err

    def _transform(self, frames: Any) -> Any:
        return frames if isinstance(frames, BadSample) else resize_center_crop(frames, self.height, self.width)

    # ---- the stream (producer thread) ----------------------------------------------------------------------------

    def _prepared(self, items: Iterator[StreamItem], pool: ThreadPoolExecutor, stop: threading.Event):
        """(item, prepared | BadSample) in stream order, with a bounded number of loads in flight."""
        window: deque = deque()
        depth = self.batch_size * (self.prefetch + 1)
        for item in items:
            window.append((item, pool.submit(self._load, item)))
            if len(window) >= depth:
                head, fut = window.popleft()
                yield head, fut.result()
            if stop.is_set():
                return
        while window:
            head, fut = window.popleft()
            yield head, fut.result()

    def _decoded(self, items: Iterator[StreamItem], pool: ThreadPoolExecutor, stop: threading.Event):
        """(item, (3, T, H, W) clip | BadSample) in stream order; DALI decodes a chunk of up to B files at once."""
        chunk: list = []
        for item, prep in self._prepared(items, pool, stop):
            chunk.append((item, prep))
            n_good = sum(not isinstance(p, BadSample) for _, p in chunk)
            if n_good == self.batch_size or item.last_of_epoch:  # never mix epochs: keeps all-bad detection finite
                yield from self._decode_chunk(chunk, pool)
                chunk = []
        if chunk:
            yield from self._decode_chunk(chunk, pool)

    def _decode_chunk(self, chunk: list, pool: ThreadPoolExecutor):
        frames = self.decoder.decode([p for _, p in chunk])
        if self.decoder.on_gpu:
            clips = [self._transform(f) for f in frames]
        else:
            clips = list(pool.map(self._transform, frames))
        yield from ((item, clip) for (item, _), clip in zip(chunk, clips))

    def _check_epoch(self, epoch: int, good: int, bad: int, skips: Counter) -> None:
        rank = self.order.rank
        if good == 0:
            raise AllSamplesBadError(
                f"every sample of epoch {epoch} on rank {rank} was bad ({bad} samples; {dict(skips)}): "
                "check the manifest and the logged reasons"
            )
        if bad / (good + bad) > self.max_bad_fraction:
            raise AllSamplesBadError(
                f"{bad} of {good + bad} samples of epoch {epoch} on rank {rank} were bad, more than "
                f"max_bad_fraction={self.max_bad_fraction} ({dict(skips)})"
            )

    def _batches(self, start: _Progress, pool: ThreadPoolExecutor, stop: threading.Event):
        good, bad, skips = start.good, start.bad, Counter(start.skips)
        buf: list = []
        items = self.order.items(start.pos, self.num_epochs)
        for item, clip in self._decoded(items, pool, stop):
            if isinstance(clip, BadSample):
                self.skipped.skip(self.entries[item.index].path, clip)
                skips[clip.reason] += 1
                bad += 1
            else:
                buf.append((item, clip))
                good += 1
            if item.last_of_epoch:
                self._check_epoch(item.epoch, good, bad, skips)
                good = bad = 0
            if len(buf) == self.batch_size:
                yield self._collate(buf), _Progress(item.after, good, bad, Counter(skips))
                buf = []
        if buf:
            yield self._collate(buf), _Progress(buf[-1][0].after, good, bad, Counter(skips))

    def _collate(self, buf: list) -> dict[str, Any]:
        entries = [self.entries[item.index] for item, _ in buf]
        return {
            "video": torch.stack([clip for _, clip in buf]),  # (B, 3, T, H, W)
            "caption": [e.caption for e in entries],
            "index": torch.tensor([e.index for e in entries], dtype=torch.int64),
            "path": [e.path for e in entries],
        }

    # ---- iteration -----------------------------------------------------------------------------------------------

    def _produce(self, q: queue.Queue, stop: threading.Event, start: _Progress) -> None:
        def put(msg) -> bool:
            while not stop.is_set():
                try:
                    q.put(msg, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        with self._lock, ThreadPoolExecutor(self.num_workers, thread_name_prefix="video-load") as pool:
            try:
                for batch, progress in self._batches(start, pool, stop):
                    if not put(("batch", (batch, progress))):
                        break
                else:
                    put(("end", None))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                put(("error", exc))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop, self._progress), daemon=True)
        thread.start()
        try:
            while True:
                kind, payload = q.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise payload
                batch, self._progress = payload
                yield batch
        finally:
            stop.set()
            thread.join()

    def iter_clips(self, indices: Sequence[int]) -> Iterator[tuple[int, Any]]:
        """``(index, (3, T, H, W) clip | BadSample)`` for the given manifest rows, in order, clip start 0 (caches)."""
        items = (
            StreamItem(0, int(i), Position(), last_of_epoch=(k == len(indices) - 1)) for k, i in enumerate(indices)
        )
        stop = threading.Event()
        with self._lock, ThreadPoolExecutor(self.num_workers, thread_name_prefix="video-load") as pool:
            random_start, self.random_clip_start = self.random_clip_start, False
            try:
                for item, clip in self._decoded(items, pool, stop):
                    yield item.index, clip
            finally:
                self.random_clip_start = random_start


def make_decoder(
    kind: str = "auto",
    *,
    num_workers: int = 2,
    max_batch: int = 8,
    cuda: Optional[bool] = None,
    device_id: Optional[int] = None,
) -> Any:
    """The decoder for ``kind`` (``DataConfig.reader``).

    ``pyav``: PyAV. ``dali``: DALI only (GPU when CUDA is present, else CPU; other codecs are skipped as
    ``unsupported_codec``). ``auto``: DALI when installed, with PyAV decoding per file what DALI cannot (logged); PyAV
    alone when DALI is not installed. ``device_id``: the GPU DALI decodes on (default: the current CUDA device).
    """
    from engine.data.decoders import DaliDecoder, PyAVDecoder, dali_available

    if kind not in ("auto", "dali", "pyav"):
        raise ValueError(f"unknown reader {kind!r}: use auto, dali or pyav")
    if kind == "pyav" or (kind == "auto" and not dali_available()):
        return PyAVDecoder()
    if not dali_available():
        raise RuntimeError("data.reader=dali but nvidia-dali is not installed (pip install '.[dali]')")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fallback = PyAVDecoder() if kind == "auto" else None
    return DaliDecoder(
        "gpu" if cuda else "cpu",
        device_id=device_id if cuda else None,
        num_threads=num_workers,
        max_batch=max_batch,
        fallback=fallback,
    )


def build_reader(
    entries: Sequence[ManifestEntry],
    data_cfg: Any,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_epochs: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> VideoReader:
    """A :class:`VideoReader` configured from a ``DataConfig``; ``device``: where frames are decoded to (default: the
    current CUDA device when there is one, else the CPU)."""
    d = data_cfg
    where = {} if device is None else {"cuda": device.type == "cuda", "device_id": device.index}
    decoder = make_decoder(d.reader, num_workers=d.num_workers, max_batch=batch_size, **where)
    return VideoReader(
        entries,
        decoder,
        batch_size=batch_size,
        num_frames=d.num_frames,
        fps=d.fps,
        height=d.height,
        width=d.width,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=d.shuffle,
        random_clip_start=d.random_clip_start,
        num_workers=d.num_workers,
        prefetch=d.prefetch,
        num_epochs=num_epochs,
        min_side=d.min_side,
        max_side=d.max_side,
        max_bad_fraction=d.max_bad_fraction,
    )
