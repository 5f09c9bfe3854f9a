"""Toy-world data throughput, each case next to the baseline a user would pick.

    python benchmarks/test_bench_toy_data.py                    # ms/clip and ratios -> results/toy_data.jsonl
    pytest benchmarks/test_bench_toy_data.py --benchmark-only   # the same cases under pytest-benchmark

Workload: 64 clips of the default world (32x32, 9 frames). Cases:
- encode: our VP9 settings (lossless, realtime deadline, cpu-used 8) vs PyAV's libvpx-vp9 lossless at its default
  deadline (same pixels out, measured in tests/toy);
- decode: DALI's CPU reader (one pipeline over all files, built outside the timing) vs PyAV, file by file;
- render: drawing the frames (no baseline: it is the floor under generation).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from results import write_rows  # noqa: E402

from engine.toy.render import render_clip, sample_params  # noqa: E402
from engine.toy.videos import read_video, write_vp9  # noqa: E402
from engine.toy.world import ToyWorldConfig  # noqa: E402

NUM_CLIPS = 64
CFG = ToyWorldConfig()


def render_all() -> list[np.ndarray]:
    return [render_clip(sample_params(CFG, i), CFG.height, CFG.width, CFG.num_frames) for i in range(NUM_CLIPS)]


def write_default_libvpx(path: Path, frames: np.ndarray) -> None:
    """The baseline: PyAV's libvpx-vp9, lossless, default (good) deadline."""
    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.options = {"lossless": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def encode_all(clips, directory: Path, ours: bool) -> list[str]:
    paths = []
    for i, clip in enumerate(clips):
        path = directory / f"{'ours' if ours else 'base'}_{i}.webm"
        write_vp9(path, clip, CFG.fps) if ours else write_default_libvpx(path, clip)
        paths.append(str(path))
    return paths


def dali_reader(files: list[str]):
    """A built DALI CPU pipeline over ``files`` and a function that reads one epoch (all files)."""
    from nvidia.dali import fn, pipeline_def

    batch = 8

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipe():
        videos, labels = fn.experimental.readers.video(
            device="cpu", filenames=files, labels=list(range(len(files))), sequence_length=CFG.num_frames, name="r"
        )
        return videos, labels

    p = pipe()
    p.build()
    return lambda: [np.array(v) for _ in range(len(files) // batch) for v in p.run()[0]]


def read_pyav(files: list[str]):
    return [read_video(f) for f in files]


@pytest.fixture(scope="module")
def clips():
    return render_all()


@pytest.fixture(scope="module")
def files(clips, tmp_path_factory):
    return encode_all(clips, tmp_path_factory.mktemp("toy_bench"), ours=True)


@pytest.mark.benchmark(group="toy-encode")
@pytest.mark.parametrize("ours", [True, False], ids=["ours", "libvpx-default"])
def test_encode(benchmark, clips, tmp_path, ours):
    benchmark(encode_all, clips, tmp_path, ours)


@pytest.mark.benchmark(group="toy-decode")
@pytest.mark.parametrize("reader", ["dali-cpu", "pyav"])
def test_decode(benchmark, files, reader):
    if reader == "dali-cpu":
        pytest.importorskip("nvidia.dali")
        epoch = dali_reader(files)
        epoch()  # warm-up: first batches pay the decoder start-up
    else:
        epoch = lambda: read_pyav(files)  # noqa: E731
    assert len(benchmark(epoch)) == NUM_CLIPS


@pytest.mark.benchmark(group="toy-render")
def test_render(benchmark):
    benchmark(render_all)


def _ms_per_clip(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * sorted(times)[len(times) // 2] / NUM_CLIPS


def main() -> None:
    clips = render_all()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        enc_ours = _ms_per_clip(lambda: encode_all(clips, tmp, True))
        enc_base = _ms_per_clip(lambda: encode_all(clips, tmp, False))
        files = encode_all(clips, tmp, True)
        epoch = dali_reader(files)
        epoch()
        dec_dali = _ms_per_clip(epoch)
        dec_pyav = _ms_per_clip(lambda: read_pyav(files))
    render = _ms_per_clip(render_all)
    rows = [
        {"case": "encode", "ours_ms": enc_ours, "baseline": "libvpx default", "baseline_ms": enc_base},
        {"case": "decode", "ours_ms": dec_dali, "ours": "dali-cpu", "baseline": "pyav", "baseline_ms": dec_pyav},
        {"case": "render", "ours_ms": render},
    ]
    for r in rows:
        ratio = f"  speed-up x{r['baseline_ms'] / r['ours_ms']:.2f} vs {r['baseline']}" if "baseline_ms" in r else ""
        print(f"{r['case']:7s} {r['ours_ms']:6.2f} ms/clip{ratio}")
    print("rows ->", write_rows("toy_data", rows))


if __name__ == "__main__":
    main()
