"""The memory planner (engine/plan.py) against measured peak memory of 2-rank CPU runs (gloo, ZeRO-3, fp32).

    python benchmarks/memory_plan_check.py                     # every config below, 30 s to 2 min each on 2 busy cores
    python benchmarks/memory_plan_check.py --only toy-320-ckpt --json out.json
    python benchmarks/memory_plan_check.py --replan            # the planner again on the stored measurements

Each config runs the real job (engine.distill.job.run_distillation: three ZeRO-3 engines, the DMD method) for two
5:1 cycles on synthetic latents and measures the second (code paged in, Adam states allocated). ``resident``: the
bytes of the model-state tensors DeepSpeed holds on the rank when the cycle starts, read from the engines (weight
partitions, persistent tensors and gathered parameters by ``ds_status``, fp32 partitions, Adam states, gradient
partition, reduce bucket). ``activations``: the largest growth of the process's resident set over a step of the
cycle, with ``MALLOC_MMAP_THRESHOLD_`` making every block above 16 KB its own mapping (returned to the kernel when
freed) and the kernel's peak (VmHWM) reset before each step; ``peak`` = resident + activations. torch.profiler's
memory records are not used: a tensor freed on another thread (gloo's work threads drop the all-gather buffers)
never gets its free event, so their running sum climbs with no real growth. The planner is evaluated for the same
config with ``Layout(gpus=2, cuda=False, dtype_bytes=4)`` (no CUDA context, no headroom, the reference element-wise
ops). Writes docs/results/memory_plan.json unless --json says otherwise and prints the table of
docs/PERFORMANCE.md#validation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT_LEN = 16
TEACHER = ROOT / "engine" / "assets" / "toy_teacher"  # the toy world's shipped teacher: the toy preset's architecture
BASE_YAML = """
model: {{preset: toy, checkpoint: {teacher}, gradient_checkpointing: {ckpt}, lora: {{rank: {rank}}}}}
text_encoder: {{kind: umt5, max_length: {text_len}}}
vae: {{kind: wan}}
diffusion: {{guidance_scale: 3.0}}
optim: {{lr: 1.0e-4, critic_lr: 1.0e-4, micro_batch_size: {mb}}}
train: {{max_steps: {steps}}}
checkpoint: {{every_steps: 1000, export: false}}
logging: {{run_dir: {run_dir}, log_every: 5, progress_bar: false, tensorboard: false, quality: {{enabled: false}}}}
deepspeed:
  {{dtype: fp32, reduce_bucket_size: {bucket}, prefetch_bucket_size: {bucket}, param_persistence_threshold: {persist}}}
data: {{source: cache, cache_dir: {run_dir}/no-cache, num_frames: {frames}, height: {side}, width: {side}}}
"""
# name: (pixel frames, side in pixels, micro-batch, gradient checkpointing, param_persistence_threshold[, LoRA rank])
# tokens = (1 + (frames - 1) / 4) * (side / 16)^2 for the (4, 8, 8) VAE strides and the (1, 2, 2) patch.
CONFIGS = {
    "toy-320-ckpt": (17, 128, 1, True, 0),
    "toy-320-nockpt": (17, 128, 1, False, 0),
    "toy-576-persistent-nockpt": (33, 128, 1, False, 100_000),
    "toy-1280-ckpt": (17, 256, 1, True, 0),
    "toy-1280-nockpt": (17, 256, 1, False, 0),
    "toy-576-mb2-nockpt": (33, 128, 2, False, 0),
    "toy-320-lora16-nockpt": (17, 128, 1, False, 0, 16),  # model.lora: frozen base, adapters + their Adam states
    "toy-320-lora64-nockpt": (17, 128, 1, False, 0, 64),
}
BUCKET = 1_000_000
STEPS = 10  # two 5:1 cycles; the second is measured
MMAP_THRESHOLD = 16384  # bytes: every larger block is its own mmap, returned to the kernel when freed


def write_config(name: str, workdir: Path) -> Path:
    """The run config of one measured case, written into ``workdir``."""
    frames, side, mb, ckpt, persist, rank = (*CONFIGS[name], 0)[:6]
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(
        BASE_YAML.format(
            teacher=TEACHER,
            ckpt=str(ckpt).lower(),
            text_len=TEXT_LEN,
            mb=mb,
            run_dir=workdir / name,
            bucket=BUCKET,
            persist=persist,
            rank=rank,
            frames=frames,
            side=side,
            steps=STEPS,
        )  # fmt: skip
    )
    return cfg_path


def run_config(name: str, workdir: Path) -> dict:
    """Launch the worker for one config on 2 gloo ranks; return the measurement and the plan."""
    cfg_path = write_config(name, workdir)
    run_dir = workdir / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker",
           str(cfg_path)]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the 2-rank run failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads((run_dir / f"memory_rank{r}.json").read_text()) for r in range(2)]
    return {"config": name, "measured": ranks, "planned": planned(cfg_path)}


def planned(cfg_path: Path) -> dict:
    from engine.config import load_config
    from engine.plan import Layout, plan

    p = plan(load_config(cfg_path), Layout(gpus=2, cuda=False, dtype_bytes=4, context_gb=0.0, headroom=0.0))
    return {"resident": p.phases["resident"], "peak": p.peak, "activations": p.peak - p.phases["resident"],
            "worst_phase": p.phases["worst"], "tokens": p.tokens, "phases": p.phases,
            "rows": {name: value for name, value, _ in p.rows}}  # fmt: skip


def compare(row: dict) -> dict:
    """Planned over measured (the larger rank) for resident, activations and peak."""
    m = {k: max(r[k] for r in row["measured"]) for k in ("resident", "peak", "activations")}
    return {k: row["planned"][k] / m[k] for k in m} | {"measured": m}


# ---------------------------------------------------------------------------------------------------------------------
# The worker (one rank)
# ---------------------------------------------------------------------------------------------------------------------


def _status(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def synthetic_world(cfg, device):
    """The job's world for a measurement: 8 random latents of the config's shape and random text contexts."""
    import torch

    from engine.distill.job import World
    from engine.train import dist
    from engine.worlds.base import world_latent_shape
    from engine.worlds.source import TensorSource

    shape = world_latent_shape(cfg)
    g = torch.Generator().manual_seed(1234)
    latents = torch.randn(8, *shape, generator=g)
    context = torch.randn(8, TEXT_LEN, cfg.model.text_dim, generator=g)
    source = TensorSource(latents, context, cfg.optim.micro_batch_size, rank=dist.rank(),
                          world_size=dist.world_size(), seed=cfg.train.seed)  # fmt: skip
    return World(source=source, uncond=torch.zeros(1, TEXT_LEN, cfg.model.text_dim), latent_shape=shape)


def worker(cfg_path: str) -> None:

    from engine.config import load_config
    from engine.distill.job import run_distillation
    from engine.train import dist

    cfg = load_config(cfg_path)
    warm = cfg.method.critic_per_generator  # the measured cycle is the second: code paged in, Adam states allocated

    out: dict = {"rank": None, "step_growth": []}

    def on_step(loop, metrics):
        if loop.step < warm:
            return
        if loop.step == warm:
            out["census"] = _census(loop.method.roles)
            out["rss_start"] = _status("VmRSS")
        else:
            out["step_growth"].append(_status("VmHWM") - out["rss_start"])
        _reset_peak()

    run_distillation(cfg, synthetic_world, on_step=on_step)
    resident = sum(out["census"].values())
    growth = max(out["step_growth"])
    out.update(rank=dist.rank(), resident=resident, activations=growth, peak=resident + growth)
    Path(cfg.logging.run_dir, f"memory_rank{dist.rank()}.json").write_text(json.dumps(out))


def _census(roles) -> dict:
    """Bytes of the model states DeepSpeed holds on this rank, by kind (read from the engines' own tensors)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    out = {}
    for name in ("teacher", "generator", "critic"):
        engine = getattr(roles, name)
        params = {id(p): p for p in engine.module.parameters()}.values()
        out[f"{name}.weights"] = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in params)
        out[f"{name}.persistent_full"] = sum(
            p.numel() * p.element_size() for p in params if getattr(p, "ds_persist", False)
        )
        out[f"{name}.kept_gathered"] = sum(  # full copies ZeRO-3 holds between steps (reused within the trace)
            p.numel() * p.element_size()
            for p in params
            if not getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.AVAILABLE
        )
        opt = engine.optimizer if name != "teacher" else None
        if opt is None or not hasattr(opt, "fp32_partitioned_groups_flat"):
            continue
        out[f"{name}.fp32_master"] = sum(t.numel() * t.element_size() for t in opt.fp32_partitioned_groups_flat)
        out[f"{name}.adam"] = sum(
            v.numel() * v.element_size() for s in opt.optimizer.state.values() for v in s.values() if v.dim() > 0
        )
        buf = opt.grad_partitions_flat_buffer
        out[f"{name}.grad_partition"] = buf.numel() * buf.element_size()
        out[f"{name}.ipg_bucket"] = sum(
            b.buffer.numel() * b.buffer.element_size() for b in opt.ipg_buckets.values() if b.buffer is not None
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configs to run (default: all)")
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "memory_plan.json"))
    p.add_argument("--replan", action="store_true", help="re-evaluate the planner on the measurements in --json")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.replan:  # the measurements stay as they were; only the planned figures and ratios are recomputed
        rows = json.loads(Path(args.json).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            for row in rows:
                row["planned"] = planned(write_config(row["config"], Path(tmp)))
                row["ratio"] = compare(row)
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(markdown(rows))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CONFIGS:
            row = run_config(name, Path(tmp))
            row["ratio"] = compare(row)
            rows.append(row)
            r, m = row["ratio"], row["ratio"]["measured"]
            print(f"{name:<26} tokens {row['planned']['tokens']:>5}  resident {m['resident'] / 1e6:6.1f} MB "
                  f"(plan x{r['resident']:.3f})  activations {m['activations'] / 1e6:6.1f} MB "
                  f"(plan x{r['activations']:.3f})  peak {m['peak'] / 1e6:6.1f} MB (plan x{r['peak']:.3f})",
                  flush=True)  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    """The docs/PERFORMANCE.md#validation table: measured (the larger rank) and planned MB, and their ratio."""
    out = [
        "| config | tokens | micro-batch | checkpointing | resident MB measured / planned | activations MB measured / "
        "planned | peak MB measured / planned | peak planned / measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        _, _, mb, ckpt = CONFIGS[row["config"]][:4]
        m, p, r = row["ratio"]["measured"], row["planned"], row["ratio"]
        cells = [row["config"], f"{p['tokens']:,}", str(mb), "yes" if ckpt else "no"]
        cells += [f"{m[k] / 1e6:.1f} / {p[k] / 1e6:.1f}" for k in ("resident", "activations", "peak")]
        cells.append(f"{r['peak']:.3f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
