"""The end-to-end toy demo: dataset -> teacher -> distillation on 2 ranks (ZeRO-3, gloo) -> samples -> metrics.

Every stage is resumable and skipped when its output exists: a second run reprints the table in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine.config import RunConfig, save_config
from engine.data.mp4 import to_frames, write_mp4
from engine.diffusion.samplers import video_seed
from engine.models.checkpoint import weight_files, weights_fingerprint
from engine.models.interp_unet import load_interpolator
from engine.toy.data import toy_tensors
from engine.toy.evaluate import real_rows, reference_for
from engine.toy.metrics import compute_metrics, format_table
from engine.toy.parts import toy_parts
from engine.toy.recipes import load_teacher, train_teacher
from engine.toy.sampling import decode, student_latents, teacher_latents, vif_latents
from engine.toy.world import ensure_dataset
from engine.train import checkpoint as ckpt


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _has_weights(path: str | Path) -> bool:
    try:
        return bool(weight_files(path))
    except Exception:
        return False


def ensure_teacher(cfg: RunConfig) -> Path:
    path = Path(cfg.model.checkpoint)
    if _has_weights(path):
        _say(f"teacher: {path} (shipped; `python launcher/train_teacher.py --config configs/toy.yaml` reproduces it)")
        return path
    _say(f"teacher: {path} missing, training it now (resumable; about 90 minutes on 2 CPU cores)")
    train_teacher(cfg)
    return path


def distill(config: Path, run_dir: Path, overrides: list[str], nproc: int, teacher: Path) -> float:
    """The real job: torchrun on ``nproc`` CPU ranks. Resumes if a previous demo was interrupted."""
    export = run_dir / "export" / "transformer"
    # a finished (or interrupted) run distilled from other teacher weights is an error, not a silent reuse
    ckpt.check_teacher(run_dir / "checkpoints", "auto", weights_fingerprint(teacher), str(teacher))
    if _has_weights(export):
        _say(f"distillation: {export} exists, skipping (delete {run_dir} to redo)")
        return 0.0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "launcher.run",  # the installed package, not a path inside a checkout
        "--config",
        str(config),
        f"logging.run_dir={run_dir}",
        *overrides,
    ]
    _say("distillation: " + " ".join(cmd[2:]))
    t0 = time.time()
    # one thread per rank and core: OpenMP teams oversubscribing the cores stall at every barrier
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    subprocess.run(cmd, check=True, env=env)
    return time.time() - t0


def _videos_row(parts, latents, params, reference) -> dict:
    return compute_metrics(decode(parts.codec, latents), params, reference)


def evaluate(cfg: RunConfig, run_dir: Path, n: int) -> dict:
    """Teacher (50 steps, CFG) and student (4 steps) on the same n val prompts, scored against real clips."""
    parts = toy_parts(cfg)
    val = toy_tensors(cfg.toy, parts.codec, parts.text, split="val")
    n = min(n, val.latents.shape[0])
    shape, ctx, params = tuple(val.latents.shape[1:]), val.context[:n], val.params[:n]
    ref = reference_for(cfg.toy)
    d = cfg.diffusion
    cache = run_dir / "teacher_latents.pt"
    t0 = time.time()
    # the teacher's samples are reused by a re-run only if nothing they depend on changed
    key = {
        "n": n,
        "weights": weights_fingerprint(cfg.model.checkpoint),  # the same identity the distillation run records
        "sampler": (d.teacher_steps, d.guidance_scale, d.guidance_form, d.shift),
        "world": repr(cfg.toy),
    }
    cached = torch.load(cache, weights_only=True) if cache.is_file() else None
    if cached is not None and cached.get("key") == key:
        teacher = cached["latents"]
    else:
        model = load_teacher(cfg.model.checkpoint)
        teacher = teacher_latents(
            model,
            ctx,
            parts.uncond,
            shape,
            parts.schedule,
            steps=d.teacher_steps,
            scale=d.guidance_scale,
            form=d.guidance_form,
        )
        torch.save({"key": key, "latents": teacher}, cache)
    t_teacher = time.time() - t0
    student_model = load_teacher(run_dir / "export" / "transformer")
    t0 = time.time()
    student = student_latents(student_model, ctx, shape, parts.schedule, d.student_timesteps)
    t_student = time.time() - t0
    real = real_rows(cfg.toy, parts.codec)
    rows = {
        **real,
        f"teacher ({d.teacher_steps} steps, CFG {d.guidance_scale:g})": _videos_row(parts, teacher, params, ref),
        f"student ({len(d.student_timesteps)} steps)": _videos_row(parts, student, params, ref),
    }
    outputs = {"teacher": teacher, "student": student}
    timings = {"teacher_seconds": t_teacher, "student_seconds": t_student}
    if cfg.interp.checkpoint and Path(cfg.interp.checkpoint).is_dir():
        _evaluate_vif(cfg, parts, student_model, ctx, shape, params, ref, rows, outputs, timings)
    videos = run_dir / "videos"
    for name, lat in outputs.items():
        for i, video in enumerate(decode(parts.codec, lat[:4])):
            write_mp4(videos / f"{name}_{i:02d}.mp4", to_frames(video), fps=cfg.data.fps, scale=4)
    # video i of every sampler was drawn with seed video_seed(0, i): launcher/generate.py --seeds <seed> redraws it
    index = [{"video": f"<sampler>_{i:02d}.mp4", "prompt": val.captions[i], "seed": video_seed(0, i)} for i in range(4)]
    (videos / "prompts.json").write_text(json.dumps(index, indent=1))
    return {"rows": rows, "n": n, **timings}


def _evaluate_vif(cfg, parts, student, ctx, shape, params, ref, rows, outputs, timings) -> None:
    """The student with VIF, with both RoPE position choices for the half-rate steps (issue: pick the better)."""
    interp = load_interpolator(cfg.interp.checkpoint).eval()
    k = cfg.interp.half_rate_steps
    for rope in ("contiguous", "stride2"):
        t0 = time.time()
        lat = vif_latents(
            student,
            interp,
            ctx,
            shape,
            parts.schedule,
            cfg.diffusion.student_timesteps,
            half_rate_steps=k,
            rope_positions=rope,
        )
        timings[f"vif_{rope}_seconds"] = time.time() - t0
        rows[f"student + VIF ({k} half-rate steps, {rope} RoPE)"] = _videos_row(parts, lat, params, ref)
        outputs[f"vif_{rope}"] = lat


def run_demo(
    cfg: RunConfig, config_path: Path, run_dir: Path, overrides: list[str], *, nproc: int = 2, eval_clips: int = 100
) -> str:
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "demo-config.yaml")
    t0 = time.time()
    manifest = ensure_dataset(cfg.toy)
    _say(f"dataset: {manifest} ({time.time() - t0:.1f} s)")
    teacher = ensure_teacher(cfg)
    t_distill = distill(config_path, run_dir, overrides, nproc, teacher)
    _say("evaluating teacher and student on held-out prompts")
    result = evaluate(cfg, run_dir, eval_clips)
    table = format_table(result["rows"])
    total = time.time() - t_start
    times = ", ".join(f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in result.items() if k.endswith("_seconds"))
    summary = (
        f"{table}\n\n{result['n']} held-out prompts. Sampling: {times}.\n"
        f"Distillation {t_distill / 60:.1f} min; demo total {total / 60:.1f} min.\n"
        f"Videos: {run_dir / 'videos'} and {run_dir / 'samples'}; student weights: {run_dir / 'export' / 'transformer'}"
    )
    (run_dir / "metrics.md").write_text(summary + "\n")
    (run_dir / "metrics.json").write_text(
        json.dumps({**result, "distill_seconds": t_distill, "total": total}, indent=1, default=float)
    )
    return summary
