"""Video reader throughput: DALI's CPU decoder vs PyAV on the same VP9 files, same reader, same output.

    python benchmarks/test_bench_data.py                    # clips/s, frames/s, ratio -> results/data.jsonl
    pytest benchmarks/test_bench_data.py --benchmark-only   # the same cases under pytest-benchmark (one group)

Workload: 8 VP9 clips of 320x192 at 24 fps, 50 frames each; every clip read once per round as 33 frames at 16 fps
(the nearest-frame resampling of the reader), output at the source size so the shared resize/crop costs nothing and
the comparison is the decoders'. Both readers run with the same number of worker threads (2 = this machine's cores).
The DALI pipeline is built in a warm-up round, outside the timing. GPU decoding (NVDEC) needs CUDA: not measured here.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from results import write_rows  # noqa: E402

from engine.data.decoders import DaliDecoder, PyAVDecoder  # noqa: E402
from engine.data.manifest import ManifestEntry  # noqa: E402
from engine.data.reader import VideoReader  # noqa: E402
from tests.data.clips import write_clip  # noqa: E402

NUM_CLIPS, WIDTH, HEIGHT, SRC_FRAMES, FRAMES, WORKERS = 8, 320, 192, 50, 33, 2


def make_clips(directory: Path) -> list[ManifestEntry]:
    paths = [
        write_clip(directory / f"bench_{i}", codec="vp9", num_frames=SRC_FRAMES, width=WIDTH, height=HEIGHT, seed=i)
        for i in range(NUM_CLIPS)
    ]
    return [ManifestEntry(i, p, f"clip {i}") for i, p in enumerate(paths)]


def make_decoder(name: str):
    return PyAVDecoder() if name == "pyav" else DaliDecoder("cpu", num_threads=WORKERS, max_batch=4)


def read_epoch(entries, decoder) -> int:
    """One pass over every clip; returns the number of frames delivered."""
    reader = VideoReader(entries, decoder, batch_size=4, num_frames=FRAMES, fps=16.0, height=HEIGHT, width=WIDTH,
                         num_workers=WORKERS, prefetch=2, num_epochs=1, random_clip_start=False)  # fmt: skip
    return sum(b["video"].shape[0] * b["video"].shape[2] for b in reader)


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    return make_clips(tmp_path_factory.mktemp("bench_clips"))


@pytest.fixture(scope="module")
def timings(request):
    """Collects each reader's best seconds per epoch; at module end writes the ratio (one row) and prints it."""
    collected: dict[str, float] = {}
    yield collected
    if {"pyav", "dali_cpu"} <= set(collected):
        row = summary_row(collected["pyav"], collected["dali_cpu"])
        write_rows("data", [row])
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # shown even though pytest captures output
            print("\n" + format_row(row))


@pytest.mark.parametrize("reader", ["pyav", "dali_cpu"])
def test_reader_throughput(benchmark, entries, timings, reader):
    decoder = make_decoder(reader)
    benchmark.group = "video-reader-vp9-320x192"
    frames = benchmark.pedantic(read_epoch, args=(entries, decoder), rounds=7, warmup_rounds=1)
    assert frames == NUM_CLIPS * FRAMES
    best = benchmark.stats.stats.min  # the least disturbed round: the 2 cores are often shared
    timings[reader] = best
    benchmark.extra_info.update(clips_per_s=NUM_CLIPS / best, frames_per_s=NUM_CLIPS * FRAMES / best)


def summary_row(pyav_s: float, dali_s: float) -> dict:
    return {
        "suite": "video-reader",
        "workload": f"{NUM_CLIPS} VP9 {WIDTH}x{HEIGHT}, {FRAMES} frames/clip, {WORKERS} workers",
        "pyav_clips_per_s": NUM_CLIPS / pyav_s,
        "pyav_frames_per_s": NUM_CLIPS * FRAMES / pyav_s,
        "dali_cpu_clips_per_s": NUM_CLIPS / dali_s,
        "dali_cpu_frames_per_s": NUM_CLIPS * FRAMES / dali_s,
        "dali_cpu_over_pyav": pyav_s / dali_s,
    }


def format_row(row: dict) -> str:
    return (
        f"video reader ({row['workload']}): PyAV {row['pyav_clips_per_s']:.1f} clips/s "
        f"{row['pyav_frames_per_s']:.0f} frames/s | DALI CPU {row['dali_cpu_clips_per_s']:.1f} clips/s "
        f"{row['dali_cpu_frames_per_s']:.0f} frames/s | DALI CPU / PyAV = {row['dali_cpu_over_pyav']:.2f}x"
    )


def best_epoch(entries, decoder, repeats: int = 7) -> float:
    """Fastest of ``repeats`` epochs (the least disturbed by other load), after a warm-up epoch."""
    read_epoch(entries, decoder)  # warm-up: DALI builds its pipeline here
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read_epoch(entries, decoder)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        entries = make_clips(Path(d))
        row = summary_row(best_epoch(entries, make_decoder("pyav")), best_epoch(entries, make_decoder("dali")))
    print(format_row(row))
    print("written to", write_rows("data", [row]))


if __name__ == "__main__":
    main()
