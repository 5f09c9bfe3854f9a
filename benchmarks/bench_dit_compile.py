"""``model.compile`` against diffusers: our DiT and diffusers' WanTransformer3DModel at the same weights, forward +
backward, eager and block-compiled, measured round-robin in one process.

    python benchmarks/bench_dit_compile.py                    # medium config, 12 rounds; rows to results/dit_compile
    python benchmarks/bench_dit_compile.py --config tiny --rounds 5

Cases: ``ours`` (eager), ``ours-compiled`` (``model.compile``: each block's forward one compiled graph),
``diffusers`` (eager) and ``diffusers-compiled`` (each of its transformer blocks compiled the same way,
``block.compile(fullgraph=True)``: the regional compilation a diffusers user would apply). The compile time is paid
in the warm-up and not timed. Each round times one forward+backward of every case in turn (A B C D A B C D ...) so
that drifting machine load hits every case alike; a ratio is taken per round and reported as its median with the
smallest and largest round. Configs are those of benchmarks/test_bench_dit.py (medium: dim 512, 4 layers, 1170
tokens).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_rows  # noqa: E402
from test_bench_dit import CONFIGS, build, forward_backward  # noqa: E402

from engine.models.wan import WanModel  # noqa: E402


def cases(config: str) -> tuple[dict, tuple]:
    ours, theirs, inputs = build(config)
    compiled = WanModel(dataclasses.replace(ours.cfg, compile=True)).to(next(ours.parameters()).device)
    compiled.load_state_dict(ours.state_dict())
    theirs_compiled = copy.deepcopy(theirs)
    for block in theirs_compiled.blocks:
        block.compile(fullgraph=True)
    return {"ours": (ours, True), "ours-compiled": (compiled, True), "diffusers": (theirs, False),
            "diffusers-compiled": (theirs_compiled, False)}, inputs  # fmt: skip


def interleaved(models: dict, inputs, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in models}
    for model, ours in models.values():
        for _ in range(warmup):  # the compiled cases compile here
            forward_backward(model, inputs, ours)
    for _ in range(rounds):
        for k, (model, ours) in models.items():
            t0 = time.perf_counter()
            forward_backward(model, inputs, ours)
            times[k].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, slow: str, fast: str) -> dict:
    per_round = [a / b for a, b in zip(times[slow], times[fast])]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="medium", choices=sorted(CONFIGS))
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args(argv)
    models, inputs = cases(args.config)
    times = interleaved(models, inputs, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "diffusers / ours (both eager)": ratio(times, "diffusers", "ours"),
        "diffusers / ours-compiled": ratio(times, "diffusers", "ours-compiled"),
        "diffusers-compiled / ours-compiled": ratio(times, "diffusers-compiled", "ours-compiled"),
        "ours / ours-compiled": ratio(times, "ours", "ours-compiled"),
    }
    print(f"{args.config}, forward+backward, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:20} {v * 1e3:9.1f} ms (median)")
    for k, r in ratios.items():
        print(f"  {k:36} {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")
    row = {"config": args.config, "mode": "forward_backward", "rounds": args.rounds,
           "threads": torch.get_num_threads(), "median_s": med, "times_s": times, "ratios": ratios}  # fmt: skip
    print("written to", write_rows("dit_compile", [row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
