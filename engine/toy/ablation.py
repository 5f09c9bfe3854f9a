"""The paper's ablation (its Table 2) on the toy world: every variant trained and scored with the same budget and seeds.

Variants (``VARIANTS``): plain DMD; DMD + temporal regularization (TR); DMD + TR + regression with fixed weights;
DMD + TR + adaptive regression (the full method); the full method sampled with VIF. The teacher is scored with the
same protocol. Seed ``s`` is the distillation's ``train.seed`` and the evaluation noise (video ``i`` drawn with
``video_seed(s, i)``, for the teacher too), so the variants of one seed see the same noise and differ only in their
losses: comparisons are paired by seed.

Every (variant, seed) is its own run directory ``<out>/<variant>/seed<s>`` with its ``job.log``; a finished run
(its last checkpoint at ``train.max_steps`` and its export present) is reused, an unfinished one resumes from its
newest checkpoint, a failed one is reported with its log path and left out of every mean. Scores are cached in
``scores.json`` keyed by the weights' fingerprint and the evaluation protocol.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.config import RunConfig, load_config
from engine.fsutil import atomic_write_text
from engine.models.checkpoint import weights_fingerprint
from engine.models.interp_unet import load_interpolator
from engine.toy.metrics import METRICS
from engine.toy.recipes import load_teacher
from engine.toy.sampling import decode, student_latents, teacher_latents, vif_latents
from engine.toy.teacher_curve import EvalSet, compute_metrics, eval_set
from engine.train import checkpoint as ckpt

GRID_VIDEOS = 4  # eval videos kept per run for the frame grid


@dataclass(frozen=True)
class Variant:
    name: str
    label: str  # as in the paper's table
    overrides: tuple[str, ...] = ()  # method.* overrides of the training run
    trains: str | None = None  # the variant whose run it samples (None: its own run; "" for the teacher)
    sampler: str = "student"  # student | vif | teacher


VARIANTS = (
    Variant("teacher", "Teacher (50 steps x 2, CFG)", trains="", sampler="teacher"),
    Variant("dmd", "DMD", ("method.regression.enabled=false", "method.temporal.enabled=false")),
    Variant("dmd_tr", "+TR", ("method.regression.enabled=false",)),
    Variant("dmd_tr_reg", "+TR+RegLoss", ("method.regression.adaptive=false",)),
    Variant("dmd_tr_adareg", "+TR+AdaLoss", ()),
    Variant("full_vif", "Full+VIF", trains="dmd_tr_adareg", sampler="vif"),
)
BY_NAME = {v.name: v for v in VARIANTS}
TRAINED = tuple(v.name for v in VARIANTS if v.trains is None)


@dataclass
class RunRecord:
    variant: str
    seed: int
    status: str  # ok | failed | missing
    run_dir: str
    log: str = ""
    train_seconds: float = 0.0
    score_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str = ""


def _say(msg: str) -> None:
    print(f"[ablate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def train_overrides(variant: Variant, seed: int, rdir: Path, extra: list[str]) -> list[str]:
    """The overrides of one training run: the variant's losses, the seed, the run directory, then the user's."""
    return [*variant.overrides, f"train.seed={seed}", f"logging.run_dir={rdir}", *extra]


def _finished(cfg: RunConfig) -> bool:
    rdir = Path(cfg.logging.run_dir)
    done = ckpt.finished(rdir / "checkpoints", "auto", cfg.train.max_steps)
    return done is not None and (rdir / "export" / "transformer" / "config.json").is_file()


def _status_path(rdir: Path) -> Path:
    return rdir / "ablation_run.json"


def _read_status(rdir: Path) -> dict:
    p = _status_path(rdir)
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_status(rdir: Path, **updates) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_status_path(rdir), json.dumps({**_read_status(rdir), **updates}, indent=1))


def train(config: Path, variant: Variant, seed: int, out: Path, extra: list[str], nproc: int) -> RunRecord:
    """Train (or resume, or reuse) one run on ``nproc`` CPU ranks; its output goes to ``<run_dir>/job.log``."""
    rdir = run_dir(out, variant.name, seed)
    overrides = train_overrides(variant, seed, rdir, extra)
    cfg = load_config(config, overrides)
    log = rdir / "job.log"
    rec = RunRecord(variant.name, seed, "ok", str(rdir), str(log))
    if _finished(cfg):
        rec.train_seconds = float(_read_status(rdir).get("train_seconds", 0.0))
        return rec
    rdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "launcher.run", "--config", str(config), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    t0 = time.time()
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    seconds = float(_read_status(rdir).get("train_seconds", 0.0)) + time.time() - t0
    _write_status(rdir, train_seconds=seconds)
    rec.train_seconds = seconds
    if code != 0 or not _finished(cfg):
        rec.status, rec.detail = "failed", f"exit {code}"
    return rec


def eval_key(cfg: RunConfig, weights: Path | None, variant: Variant, seed: int, n: int) -> dict:
    d = cfg.diffusion
    key = {
        "version": 1,
        "variant": variant.sampler,
        "seed": seed,
        "n": n,
        "world": repr(cfg.toy),
        "weights": weights_fingerprint(weights) if weights is not None else None,
    }
    if variant.sampler == "teacher":
        key |= {"sampler": [d.teacher_steps, d.guidance_scale, d.guidance_form, d.shift]}
    else:
        key |= {"sampler": [list(d.student_timesteps), d.shift]}
    if variant.sampler == "vif":
        key |= {"interp": weights_fingerprint(cfg.interp.checkpoint), "half_rate_steps": cfg.interp.half_rate_steps}
        key |= {"rope": cfg.interp.rope_positions}
    return key


def sample(cfg: RunConfig, variant: Variant, weights: Path, es: EvalSet, parts, seed: int) -> torch.Tensor:
    """(n, C, F, h, w) latents of the eval prompts, video i from ``video_seed(seed, i)``."""
    d = cfg.diffusion
    model = load_teacher(weights).eval()
    if variant.sampler == "teacher":
        return teacher_latents(
            model, es.context, parts.uncond, es.latent_shape, parts.schedule, steps=d.teacher_steps,
            scale=d.guidance_scale, form=d.guidance_form, seed=seed,
        )  # fmt: skip
    if variant.sampler == "vif":
        interp = load_interpolator(cfg.interp.checkpoint).eval()
        return vif_latents(
            model, interp, es.context, es.latent_shape, parts.schedule, d.student_timesteps,
            half_rate_steps=cfg.interp.half_rate_steps, rope_positions=cfg.interp.rope_positions, seed=seed,
        )  # fmt: skip
    return student_latents(model, es.context, es.latent_shape, parts.schedule, d.student_timesteps, seed=seed)


def score(
    cfg: RunConfig, variant: Variant, weights: Path, es: EvalSet, parts, seed: int, sdir: Path
) -> tuple[dict, float]:
    """The metrics of one (variant, seed), cached in ``<sdir>/scores.json``; the first videos' latents are kept in
    ``<sdir>/eval_latents.safetensors`` for the frame grid. Returns (metrics, seconds spent now)."""
    key = eval_key(cfg, weights, variant, seed, len(es.params))
    path = sdir / f"scores_{variant.name}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["metrics"], 0.0
    t0 = time.time()
    latents = sample(cfg, variant, weights, es, parts, seed)
    metrics = compute_metrics(decode(parts.codec, latents), es.params, es.reference)
    metrics["latent_temporal_loss"] = temporal_loss_of(latents, cfg)
    sdir.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents[:GRID_VIDEOS].contiguous()}, str(sdir / f"eval_latents_{variant.name}.safetensors"))
    atomic_write_text(path, json.dumps({"key": key, "metrics": metrics}, indent=1))
    return metrics, time.time() - t0


def temporal_loss_of(latents: torch.Tensor, cfg: RunConfig, batch: int | None = None) -> float:
    """Mean over batches of ``optim.micro_batch_size`` latents of L_temp = -log((v + eps)^p), v the population
    variance over frames averaged over (B, C, h, w): the temporal regularization's value before truncation."""
    t = cfg.method.temporal
    b = batch or cfg.optim.micro_batch_size
    values = []
    for i in range(0, len(latents) - b + 1, b):
        v = latents[i : i + b].float().var(dim=2, unbiased=False).mean()
        values.append(float(-t.power * torch.log(v + t.eps)))
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# The whole set
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Ablation:
    config: Path
    out: Path
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    nproc: int = 2
    n: int = 100
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS)
    report_only: bool = False
    """Train nothing: score the runs that finished, report the others as not run yet (a set still training)."""

    def cfg(self) -> RunConfig:
        return load_config(self.config, self.overrides)

    def plan(self) -> list[tuple[str, int]]:
        """(trained variant, seed) runs the chosen variants need, in the order they run: seed-major, so every
        variant has a seed before any has two."""
        need = []
        for v in self.variants:
            base = BY_NAME[v].trains
            if base is None:
                need.append(v)
            elif base:
                need.append(base)
        return [(v, s) for s in self.seeds for v in TRAINED if v in need]

    def run(self, progress: Callable[[str], None] = _say) -> list[RunRecord]:
        from engine.toy.parts import toy_parts

        t_start = time.time()
        cfg = self.cfg()
        trained: dict[tuple[str, int], RunRecord] = {}
        plan = self.plan()
        for k, (name, seed) in enumerate(plan, 1):
            rdir = run_dir(self.out, name, seed)
            run_cfg = load_config(self.config, train_overrides(BY_NAME[name], seed, rdir, self.overrides))
            done = _finished(run_cfg)
            if self.report_only:
                rec = RunRecord(name, seed, "ok" if done else "missing", str(rdir), str(rdir / "job.log"))
                rec.train_seconds = float(_read_status(rdir).get("train_seconds", 0.0))
                rec.detail = "" if done else "not trained yet"
                trained[(name, seed)] = rec
                continue
            progress(f"{k}/{len(plan)} {'reusing' if done else 'training'} {name} seed {seed} ({rdir}/job.log)")
            rec = train(self.config, BY_NAME[name], seed, self.out, self.overrides, self.nproc)
            trained[(name, seed)] = rec
            if rec.status != "ok":
                progress(f"{name} seed {seed} FAILED ({rec.detail}); see {rec.log}")
            else:
                progress(f"{name} seed {seed} trained ({rec.train_seconds / 60:.1f} min)")
        parts = toy_parts(cfg)
        progress(f"scoring on {self.n} held-out prompts")
        es = eval_set(cfg, parts, self.n)
        records = []
        for seed in self.seeds:
            for name in self.variants:
                v = BY_NAME[name]
                if v.trains == "":
                    rdir, weights, base = self.out / "teacher" / f"seed{seed}", Path(cfg.model.checkpoint), None
                else:
                    base = trained[(v.trains or v.name, seed)]
                    rdir = Path(base.run_dir)
                    weights = rdir / "export" / "transformer"
                rec = RunRecord(name, seed, "ok", str(rdir), base.log if base else "")
                rec.train_seconds = base.train_seconds if base and v.trains is None else 0.0
                if base is not None and base.status != "ok":
                    rec.status = base.status
                    rec.detail = f"training failed: {base.detail}" if base.status == "failed" else base.detail
                    records.append(rec)
                    continue
                rec.metrics, rec.score_seconds = score(cfg, v, weights, es, parts, seed, rdir)
                records.append(rec)
                shown = ("instance_preservation", "dynamic_degree", "travel", "saturation_ratio")
                brief = ", ".join(f"{m} {rec.metrics[m]:.3f}" for m in shown if m in rec.metrics)
                progress(f"scored {name} seed {seed}: {brief}")
        self.real = {"real": es.real, "real_via_codec": es.real_codec}
        self.wall_seconds = time.time() - t_start
        return records


# ---------------------------------------------------------------------------------------------------------------------
# Statistics and verdicts
# ---------------------------------------------------------------------------------------------------------------------

T_CRIT_ONE_SIDED_95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833}
"""Student's t, one-sided 95% (df = seeds - 1)."""


def t_crit(df: int) -> float:
    return T_CRIT_ONE_SIDED_95.get(df, 1.645)


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean and standard deviation over the common seeds of a - b, and how many seeds."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), 0
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else float("nan"), len(d)


@dataclass
class Claim:
    text: str
    metric: str
    better: str  # variant expected to be better
    worse: str
    direction: str  # "higher" or "lower" is better; "within" for a bounded cost
    bound: float = 0.0  # for "within": the largest acceptable drop


CLAIMS = (
    Claim("temporal regularization restores motion (dynamic degree)", "dynamic_degree", "dmd_tr", "dmd", "higher"),
    Claim("temporal regularization restores motion (object travel)", "travel", "dmd_tr", "dmd", "higher"),
    Claim(
        "adaptive regression preserves objects better than fixed-weight regression",
        "instance_preservation",
        "dmd_tr_adareg",
        "dmd_tr_reg",
        "higher",
    ),  # fmt: skip
    Claim("the full method oversaturates less than DMD", "saturation_ratio", "dmd_tr_adareg", "dmd", "lower"),
    Claim(
        "VIF costs at most two points of instance preservation",
        "instance_preservation",
        "full_vif",
        "dmd_tr_adareg",
        "within",
        0.02,
    ),  # fmt: skip
    Claim(
        "VIF costs at most two points of dynamic degree", "dynamic_degree", "full_vif", "dmd_tr_adareg", "within", 0.02
    ),  # fmt: skip
)


def verdict(claim: Claim, per_seed: dict[str, dict[str, dict[int, float]]]) -> dict:
    """confirmed / refuted / inconclusive from the paired differences over seeds (one-sided 95% t bounds)."""
    a = per_seed.get(claim.better, {}).get(claim.metric, {})
    b = per_seed.get(claim.worse, {}).get(claim.metric, {})
    diff, sd, n = paired(a, b)
    out = {"claim": claim.text, "metric": claim.metric, "effect": diff, "spread": sd, "seeds": n}
    if n < 2 or not math.isfinite(sd):
        return {**out, "verdict": "inconclusive", "why": f"{n} paired seed(s)"}
    half = t_crit(n - 1) * sd / math.sqrt(n)  # one-sided 95% half-width of the mean difference
    lo, hi = diff - half, diff + half
    out |= {"low": lo, "high": hi}
    if claim.direction == "within":  # the drop b - a must stay under the bound
        drop_hi, drop_lo = -lo, -hi
        if drop_hi <= claim.bound:
            return {**out, "verdict": "confirmed", "why": f"drop at most {drop_hi:.3f} (95%) <= {claim.bound}"}
        if drop_lo > claim.bound:
            return {**out, "verdict": "refuted", "why": f"drop at least {drop_lo:.3f} (95%) > {claim.bound}"}
        return {**out, "verdict": "inconclusive", "why": f"drop between {drop_lo:.3f} and {drop_hi:.3f} (95%)"}
    sign = 1.0 if claim.direction == "higher" else -1.0
    if sign * diff > 0 and (lo > 0 if sign > 0 else hi < 0):
        return {**out, "verdict": "confirmed", "why": "the 95% bound excludes no effect"}
    if sign * diff < 0 and (hi < 0 if sign > 0 else lo > 0):
        return {**out, "verdict": "refuted", "why": "the opposite effect, 95% bound excludes none"}
    return {**out, "verdict": "inconclusive", "why": "the 95% bound includes no effect"}


def per_seed_table(records: list[RunRecord]) -> dict[str, dict[str, dict[int, float]]]:
    table: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        if r.status != "ok":
            continue
        for m, v in r.metrics.items():
            table.setdefault(r.variant, {}).setdefault(m, {})[r.seed] = float(v)
    return table


def ablation_json(records: list[RunRecord], seeds: list[int]) -> dict:
    """{variant: {metric: [one value per seed, in seed order]}} of the runs that finished (failed seeds left out)."""
    table = per_seed_table(records)
    return {
        v: {m: [vals[s] for s in seeds if s in vals] for m, vals in metrics.items()} for v, metrics in table.items()
    }


ALL_METRICS = (*METRICS, "latent_temporal_loss")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Linux {platform.release()}, torch {torch.__version__}"


def load_grid_latents(out: Path, variant: str, seed: int, teacher: bool = False) -> torch.Tensor | None:
    v = BY_NAME[variant]
    rdir = out / "teacher" / f"seed{seed}" if teacher else run_dir(out, v.trains or v.name, seed)
    path = rdir / f"eval_latents_{variant}.safetensors"
    return load_file(str(path))["latents"] if path.is_file() else None
