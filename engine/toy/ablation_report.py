"""What the toy ablation writes: docs/RESULTS.md (its section), docs/results/{ablation,teacher,ablation_runs}.json, the
curves of every monitored metric over training per variant (the paper's Figure 1) and a frame grid."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from engine.fsutil import atomic_write_text
from engine.toy.ablation import (
    ALL_METRICS,
    BY_NAME,
    CLAIMS,
    TRAINED,
    RunRecord,
    ablation_json,
    load_grid_latents,
    machine,
    mean_std,
    per_seed_table,
    run_dir,
    verdict,
)

SECTION = "ablation"
CURVE_METRICS = ("saturation_ratio", "dynamic_degree", "travel", "instance_preservation", "flicker", "frechet_distance")


def replace_section(path: Path, name: str, body: str, title: str = "# Results on the toy world\n") -> None:
    """Write ``body`` between the ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of ``path`` (appended when
    absent), leaving every other section of the file as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else title
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def _cell(values: list[float]) -> str:
    m, s = mean_std(values)
    if not math.isfinite(m):
        return "-"
    return f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}"


def results_table(abl: dict, real: dict, variants: list[str]) -> str:
    cols = ["real (val)", "real via codec", *(BY_NAME[v].label for v in variants)]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in ALL_METRICS:
        cells = [
            f"{real['real'][m]:.3f}" if m in real["real"] else "-",
            f"{real['real_via_codec'][m]:.3f}" if m in real["real_via_codec"] else "-",
        ]
        cells += [_cell(abl.get(v, {}).get(m, [])) for v in variants]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_table(verdicts: list[dict]) -> str:
    lines = [
        "| claim | metric | effect (paired mean ± sd) | 95% bound | seeds | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        bound = f"[{v['low']:.3f}, {v['high']:.3f}]" if "low" in v else "-"
        eff = "-"
        if math.isfinite(v["effect"]):
            eff = f"{v['effect']:+.3f}" + (f" ± {v['spread']:.3f}" if math.isfinite(v["spread"]) else " (one seed)")
        lines.append(
            f"| {v['claim']} | {v['metric']} | {eff} | {bound} | {v['seeds']} | **{v['verdict']}** ({v['why']}) |"
        )
    return "\n".join(lines)


def write_results(
    records: list[RunRecord],
    real: dict,
    seeds: list[int],
    docs: Path,
    out: Path,
    *,
    command: str,
    wall_seconds: float,
    tau: float,
    real_temporal_loss: float,
    codec,
    n: int = 100,
    monitored: int = 32,
) -> dict:
    """Write the JSON files, the plots and the RESULTS.md section; returns the verdicts."""
    results = docs / "results"
    results.mkdir(parents=True, exist_ok=True)
    abl = ablation_json(records, seeds)
    variants = [v for v in BY_NAME if v in abl or any(r.variant == v for r in records)]
    atomic_write_text(results / "ablation.json", json.dumps(abl, indent=1) + "\n")
    teacher = {k: float(np.mean(v)) for k, v in abl.get("teacher", {}).items()}
    real_rows = {**real, "real": {**real["real"], "latent_temporal_loss": real_temporal_loss}}
    atomic_write_text(results / "teacher.json", json.dumps({**real_rows, "teacher": teacher}, indent=1) + "\n")
    runs = [
        {k: getattr(r, k) for k in ("variant", "seed", "status", "run_dir", "log", "train_seconds", "score_seconds")}
        for r in records
    ]
    atomic_write_text(results / "ablation_runs.json", json.dumps(runs, indent=1) + "\n")
    table = per_seed_table(records)
    verdicts = [verdict(c, table) for c in CLAIMS]
    curves = plot_curves(out, seeds, results / "ablation_curves.png")
    grid = plot_frames(out, seeds[0], [v for v in variants if v in abl], codec, results / "ablation_frames.png")
    failed = [r for r in records if r.status == "failed"]
    missing = [r for r in records if r.status == "missing"]
    train_min = sum(r.train_seconds for r in records) / 60
    score_min = sum(r.score_seconds for r in records) / 60
    body = [
        "## The paper's ablation (its Table 2)",
        "",
        f"Command: `{command}`. Machine: {machine()}. Seeds: {', '.join(map(str, seeds))} (each seed is the "
        "distillation's `train.seed` and the evaluation noise, so variants are compared paired by seed). Wall time "
        f"of this invocation {wall_seconds / 60:.1f} min; training {train_min:.1f} min and scoring {score_min:.1f} min "
        "in total over every invocation that built these runs.",
        "",
        f"Mean ± standard deviation across seeds, {n} held-out prompts per seed (metric definitions: "
        "[toy-world.md](toy-world.md#metrics)). `latent_temporal_loss` is L_temp = -log(v + eps) of the latents "
        "before truncation, over batches of the distillation's micro-batch size.",
        "",
        results_table(abl, real_rows, variants),
        "",
    ]
    if missing:
        body += [
            f"**Partial results**: {len(missing)} of {len(records)} (variant, seed) entries are not trained yet "
            "(the set is still running; re-run the command to finish it). Not yet in the table: "
            + ", ".join(f"{r.variant} seed {r.seed}" for r in missing)
            + ".",
            "",
        ]
    if failed:
        body += ["Failed runs, left out of every mean:", ""]
        body += [f"- {r.variant} seed {r.seed}: {r.detail}; log `{r.log}`" for r in failed]
        body.append("")
    body += [
        "### The paper's claims",
        "",
        "Each verdict comes from the paired differences over seeds: confirmed when the one-sided 95% t bound of the "
        "mean difference excludes no effect in the claimed direction, refuted when it excludes none the other way, "
        "inconclusive otherwise. For VIF the claim is a bound on the drop (two points = 0.02).",
        "",
        verdict_table(verdicts),
        "",
        "### Does tau follow the latents?",
        "",
        f"Real training latents have L_temp = {real_temporal_loss:.2f} (batches of the micro-batch size); the "
        f"truncation threshold is tau = {tau:g}. The term counts only while L_temp >= tau, i.e. while the latents' "
        f"temporal variance is below exp(-tau) = {math.exp(-tau):.3f}; real toy latents have "
        f"{math.exp(-real_temporal_loss):.3f}. "
        + (
            "So the truncation never acts at toy scale: even a student as dynamic as the real clips is still pushed "
            "toward more temporal variance. tau would have to follow the data (about -log of the real latents' "
            "variance) to stop the push at real motion."
            if real_temporal_loss > tau
            else "So the truncation stops the push before the student's variance passes the real latents'."
        ),
        "",
    ]
    if curves:
        body += [
            "### During distillation (the paper's Figure 1)",
            "",
            f"The sample videos scored at every `logging.sample_every` steps by the quality monitor ({monitored} "
            "held-out prompts; mean over seeds, band min-max; dashed: the teacher on the same prompts and noise):",
            "",
            f"![metrics over training]({curves.relative_to(docs)})",
            "",
        ]
    if grid:
        body += [
            f"Frames 0, 2, 4, 6, 8 of the first {grid[1]} held-out prompts, seed {seeds[0]}, same noise in every row:",
            "",
            f"![frames]({grid[0].relative_to(docs)})",
            "",
        ]
    replace_section(docs / "RESULTS.md", SECTION, "\n".join(body))
    return {"verdicts": verdicts, "failed": len(failed)}


def _quality_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out: Path, seeds: list[int], dest: Path) -> Path | None:
    """One panel per metric, one line per trained variant (mean over seeds, band min-max), the teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, teacher = {}, {}
    for v in TRAINED:
        for s in seeds:
            rdir = run_dir(out, v, s)
            for row in _quality_rows(rdir / "quality" / "scores.jsonl"):
                data.setdefault(v, {}).setdefault(int(row["step"]), []).append(row)
            t = rdir / "quality" / "teacher.json"
            if t.is_file() and not teacher:
                teacher = json.loads(t.read_text())["scores"]
    if not data:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, m in zip(axes.ravel(), CURVE_METRICS):
        for v, by_step in data.items():
            steps = sorted(by_step)
            vals = [[r[m] for r in by_step[st] if m in r] for st in steps]
            mean = [np.mean(x) if x else np.nan for x in vals]
            ax.plot(steps, mean, label=BY_NAME[v].label)
            ax.fill_between(steps, [min(x) if x else np.nan for x in vals], [max(x) if x else np.nan for x in vals],
                            alpha=0.15)  # fmt: skip
        if m in teacher:
            ax.axhline(teacher[m], color="k", ls="--", lw=1, label="teacher")
        ax.set_title(m)
        ax.set_xlabel("trainer step")
    axes.ravel()[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=90)
    plt.close(fig)
    return dest


def plot_frames(out: Path, seed: int, variants: list[str], codec, dest: Path) -> tuple[Path, int] | None:
    """Rows: the teacher and each variant; columns: frames 0, 2, 4, 6, 8 of the first eval videos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for v in variants:
        lat = load_grid_latents(out, v, seed, teacher=(v == "teacher"))
        if lat is None:
            continue
        with torch.no_grad():
            video = ((codec.decode(lat).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 3, T, H, W)
        frames = video[:, :, ::2].permute(0, 2, 3, 4, 1).numpy()  # (N, T', H, W, 3)
        gap = np.full((frames.shape[2], 4, 3), 255, dtype=np.uint8)  # a white column between videos
        strip = np.concatenate([x for clip in frames for x in (np.concatenate(list(clip), axis=1), gap)][:-1], axis=1)
        rows.append((BY_NAME[v].label, strip, len(frames)))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(16, 1.2 * len(rows) + 0.4), squeeze=False)
    for ax, (label, strip, _) in zip(axes[:, 0], rows):
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(dest, dpi=90)
    plt.close(fig)
    return dest, rows[0][2]
