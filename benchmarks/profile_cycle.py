"""One 5:1 cycle of the real distillation job, profiled: time per phase, bytes per collective against ZeRO-3's volume,
the share of wall time outside model compute, tokens/s and MFU against this machine's measured matmul peak.

    python benchmarks/profile_cycle.py                          # toy architecture, 1280 tokens, 2 gloo ranks: 20 s
    python benchmarks/profile_cycle.py --config toy-320 --json out.json

The job (engine.distill.job.run_distillation: three ZeRO-3 engines, the DMD method with regression and TR) runs three
5:1 cycles on synthetic latents with the toy architecture and its shipped teacher. Cycle 1 warms up (code paged in,
DeepSpeed's prefetch traces recorded, Adam states allocated). Cycle 2 is timed: the method's phase timer (host
wall-clock on CPU) per phase, the cycle's wall-clock, tokens/s and MFU, as the job logs them. Cycle 3 counts bytes:
DeepSpeed's comms logger (``deepspeed.comm.configure``) on for that cycle only, since it makes every collective
blocking, plus a count of each role's forward passes and backward passes.

ZeRO-3's volume, per rank and cycle, in the logger's convention (an all-gather's message is the rank's own partition,
a reduce-scatter's the whole gradient it reduces): if every forward pass of a role gathered its parameters and every
backward pass gathered them again, ``gathered = P / world * (forwards + backwards)``, and every backward pass
reduce-scatters the gradients once, ``reduced = P_trained * backwards`` (bytes of the role's working dtype, P the
role's parameter bytes). Gathered below theory is what ZeRO-3 keeps live from one pass to the next (its prefetch
trace and ``stage3_max_live_parameters``); above it, parameters gathered twice.

Outside model compute: the cycle's wall-clock minus the forward and backward phases (teacher, critic_eval, rollout,
generator_forward, regression, critic_forward, generator_backward, critic_backward), over the wall-clock: the
optimizer steps, data, the loop's own work (signal checks, log reductions, checkpoint decisions). Collectives inside
a forward or backward count as compute here; their own time is in the bytes cycle (``latency_s``, blocking).

The peak: a fp32 matmul of --peak-size squared on each rank at once (one thread per rank, as the job runs), the best
of 5; MFU = the job's model FLOPs per second per rank over that peak. Writes docs/results/profile_cycle.json unless
--json says otherwise and prints the table of docs/PERFORMANCE.md#per-phase-profile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.memory_plan_check import TEXT_LEN  # noqa: E402  (the same synthetic world)

TEACHER = ROOT / "engine" / "assets" / "toy_teacher"
BASE_YAML = """
model: {{preset: toy, checkpoint: {teacher}, gradient_checkpointing: false}}
text_encoder: {{kind: umt5, max_length: {text_len}}}
vae: {{kind: wan}}
diffusion: {{guidance_scale: 3.0}}
optim: {{lr: 1.0e-4, critic_lr: 1.0e-4, micro_batch_size: 1}}
train: {{max_steps: {steps}}}
checkpoint: {{every_steps: 1000, export: false}}
logging:
  {{run_dir: {run_dir}, log_every: {cycle}, progress_bar: false, tensorboard: false, quality: {{enabled: false}}}}
deepspeed: {{dtype: fp32, param_persistence_threshold: 0}}
data: {{source: cache, cache_dir: {run_dir}/no-cache, num_frames: {frames}, height: {side}, width: {side}}}
"""
CONFIGS = {"toy-1280": (17, 256), "toy-320": (17, 128)}  # (pixel frames, side): tokens; the toy architecture
CYCLE = 5  # configs/toy.yaml's method.critic_per_generator: 5 critic updates, then one generator update
COMPUTE = ("teacher", "critic_eval", "rollout", "generator_forward", "regression", "critic_forward",
           "generator_backward", "critic_backward")  # fmt: skip


def measure_peak(size: int, repeats: int = 5) -> float:
    """Best fp32 matmul TFLOPS of this process (its thread count as set), over ``repeats`` timed products."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


def run(name: str, workdir: Path, peak_size: int) -> dict:
    frames, side = CONFIGS[name]
    cfg_path = workdir / f"{name}.yaml"
    run_dir = workdir / name
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker",
           str(cfg_path), "--worker-out", str(out), "--peak-size", str(peak_size)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cfg_path.write_text(BASE_YAML.format(teacher=TEACHER, text_len=TEXT_LEN, steps=3 * CYCLE, run_dir=run_dir,
                                         cycle=CYCLE, frames=frames, side=side))  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the 2-rank run failed:\n{proc.stderr[-4000:]}")
    return {"config": name, **json.loads(out.read_text())}


# ---------------------------------------------------------------------------------------------------------------------
# The worker (one rank)
# ---------------------------------------------------------------------------------------------------------------------


ROLES = ("teacher", "generator", "critic")
GATHERS = {"all_gather_into_tensor", "allgather_fn", "all_gather", "all_gather_base"}


class CycleProbe:
    """``on_step`` of the job: on the build it wraps each role's forward and backward (pass counts) and the method's
    ``log_scalars`` (the cycle's figures); it stamps the wall-clock at the cycle edges and turns DeepSpeed's comms
    logger on for cycle 3 only."""

    def __init__(self):
        self.scalars: dict[int, dict] = {}
        self.passes = {r: {"forward": 0, "backward": 0} for r in ROLES}
        self.wall: dict[int, float] = {}
        self.counting = False
        self.engines: dict = {}
        self.tokens_per_sample = 0
        self.comms: dict = {}

    def __call__(self, loop, metrics) -> None:
        import deepspeed.comm
        from deepspeed.comm.comm import comms_logger

        if metrics is None:
            self._install(loop)
            return
        if loop.step in (CYCLE, 2 * CYCLE):
            self.wall[loop.step] = time.perf_counter()
        if loop.step == 2 * CYCLE:  # cycle 3 counts bytes and passes
            comms_logger.comms_dict.clear()
            deepspeed.comm.configure(enabled=True, prof_all=True, verbose=False, debug=False)
            self.counting = True
        if loop.step == 3 * CYCLE:
            deepspeed.comm.configure(enabled=False)
            self.counting = False
            self.comms = {
                op: {str(size): {"count": rec[0], "latency_s": sum(rec[1]) / 1000.0} for size, rec in sizes.items()}
                for op, sizes in comms_logger.get_raw_data().items()
            }

    def _install(self, loop) -> None:
        method = loop.method
        log_scalars = method.log_scalars

        def captured(seconds, steps):
            out = log_scalars(seconds, steps)
            self.scalars[loop.step] = {"seconds": seconds, "steps": steps, **out}
            return out

        method.log_scalars = captured
        for role in ROLES:
            engine = getattr(method.roles, role)
            engine.module.register_forward_pre_hook(self._count(role, "forward"))
            engine.backward = self._counted(role, engine.backward)
            self.engines[role] = engine
        self.tokens_per_sample = method.tokens_per_sample

    def _count(self, role: str, kind: str):
        def hook(*_):
            if self.counting:
                self.passes[role][kind] += 1

        return hook

    def _counted(self, role: str, backward):
        count = self._count(role, "backward")

        def wrapped(*args, **kwargs):
            count()
            return backward(*args, **kwargs)

        return wrapped


def role_bytes(engine) -> dict:
    """Bytes of a role's parameters (full ZeRO-3 sizes), all and trained."""
    ps = list({id(p): p for p in engine.module.parameters()}.values())
    return {
        "bytes": sum(p.ds_numel * p.element_size() for p in ps),
        "trained_bytes": sum(p.ds_numel * p.element_size() for p in ps if p.requires_grad),
    }


def volume(comms: dict, passes: dict, params: dict, world: int) -> dict:
    """Bytes per rank and cycle by kind of collective, logged and as ZeRO-3's accounting gives them (module doc)."""
    measured = {"gathered": 0, "reduced": 0, "other": 0}
    for op, sizes in comms.items():
        kind = "gathered" if op in GATHERS else "reduced" if "reduce_scatter" in op else "other"
        measured[kind] += sum(int(s) * v["count"] for s, v in sizes.items())
    theory = {"gathered": 0, "reduced": 0}
    for role, n in passes.items():
        theory["gathered"] += params[role]["bytes"] // world * (n["forward"] + n["backward"])
        theory["reduced"] += params[role]["trained_bytes"] * n["backward"]
    return {"measured": measured, "theory": theory}


def worker(cfg_path: str, out_path: str, peak_size: int) -> None:
    from benchmarks.memory_plan_check import synthetic_world
    from engine.config import load_config
    from engine.distill.job import run_distillation
    from engine.train import dist

    cfg = load_config(cfg_path)
    probe = CycleProbe()
    cfg.logging.peak_tflops = measure_peak(peak_size)  # both ranks at once, as they will run: the job's MFU against it
    run_distillation(cfg, synthetic_world, on_step=probe)
    cycle2 = probe.scalars[2 * CYCLE]
    params = {role: role_bytes(engine) for role, engine in probe.engines.items()}
    result = {
        "rank": dist.rank(),
        "world": dist.world_size(),
        "tokens_per_sample": probe.tokens_per_sample,
        "peak_tflops_measured": cfg.logging.peak_tflops,
        "cycle_wall_s": probe.wall[2 * CYCLE] - probe.wall[CYCLE],
        "phases_s": {k[len("time/") :]: v * cycle2["steps"] for k, v in cycle2.items() if k.startswith("time/")},
        "tokens_per_s": cycle2["perf/tokens_per_s"],
        "mfu": cycle2["perf/mfu"],
        "passes": probe.passes,
        "params": params,
        "comms": probe.comms,
        "volume": volume(probe.comms, probe.passes, params, dist.world_size()),
    }
    ranks = dist.all_gather_object(result)
    if dist.is_main():
        Path(out_path).write_text(json.dumps({"ranks": ranks}, indent=1))


def summary(row: dict) -> dict:
    """Rank means of the figures the table shows (the bytes are per rank already)."""
    ranks = row["ranks"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    wall = mean([r["cycle_wall_s"] for r in ranks])
    phases = {k: mean([r["phases_s"].get(k, 0.0) for r in ranks]) for k in ranks[0]["phases_s"]}
    compute = sum(v for k, v in phases.items() if k in COMPUTE)
    vol = ranks[0]["volume"]
    return {
        "wall_s": wall,
        "phases_s": phases,
        "outside_compute_share": (wall - compute) / wall,
        "tokens_per_s": mean([r["tokens_per_s"] for r in ranks]),
        "mfu": mean([r["mfu"] for r in ranks]),
        "peak_tflops": mean([r["peak_tflops_measured"] for r in ranks]),
        "gathered_ratio": vol["measured"]["gathered"] / max(vol["theory"]["gathered"], 1),
        "reduced_ratio": vol["measured"]["reduced"] / max(vol["theory"]["reduced"], 1),
        "volume": vol,
        "comm_latency_s": mean([sum(v["latency_s"] for s in r["comms"].values() for v in s.values()) for r in ranks]),
    }


def markdown(row: dict) -> str:
    s = summary(row)
    lines = ["| phase | s per cycle | share of the cycle |", "|---|---|---|"]
    for k, v in sorted(s["phases_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.2f} | {v / s['wall_s']:.1%} |")
    named = sum(s["phases_s"].values())
    lines.append(
        f"| (loop, outside every phase) | {s['wall_s'] - named:.2f} | {(s['wall_s'] - named) / s['wall_s']:.1%} |"
    )
    lines.append(f"| **cycle (wall)** | **{s['wall_s']:.2f}** | 100% |")
    v = s["volume"]
    lines += [
        "",
        f"Outside model compute: {s['outside_compute_share']:.1%} of the cycle. Tokens/s: {s['tokens_per_s']:.0f}. "
        f"MFU: {s['mfu']:.1%} of a measured {s['peak_tflops'] * 1e3:.1f} GFLOPS per rank (fp32 matmul).",
        "",
        "| per rank and cycle | measured (comms logger) | ZeRO-3 theory | measured / theory |",
        "|---|---|---|---|",
        f"| gathered parameters | {v['measured']['gathered'] / 1e6:.1f} MB | {v['theory']['gathered'] / 1e6:.1f} MB | "
        f"{s['gathered_ratio']:.3f} |",
        f"| reduce-scattered gradients | {v['measured']['reduced'] / 1e6:.1f} MB | "
        f"{v['theory']['reduced'] / 1e6:.1f} MB | {s['reduced_ratio']:.3f} |",
        f"| other collectives | {v['measured']['other'] / 1e6:.3f} MB | | |",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--config", default="toy-1280", choices=sorted(CONFIGS))
    p.add_argument("--peak-size", type=int, default=1024, help="side of the square matmul that measures the peak")
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "profile_cycle.json"))
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.worker_out, args.peak_size)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        row = run(args.config, Path(tmp), args.peak_size)
    row["summary"] = summary(row)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=1))
    print(markdown(row))
    return 0


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
