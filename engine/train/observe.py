"""Rank-0 observability: progress bar with ETA, TensorBoard scalars, a plain-text log, throughput and MFU.

Scalars per log step: the method's metrics (means over the window and the ranks), what the method adds (the
distillation: per-phase wall time, tokens/s, estimated MFU from model FLOPs as in docs/wan.md#flops, the regression
EMA cache), samples/s, skipped updates.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.console import progress
from engine.train import dist
from engine.train.quality import drop_rows_after

log = logging.getLogger("vidistill.train")

H100_BF16_TFLOPS = 989.0
CPU_FP32_TFLOPS = 0.077  # docs/architecture.md#cpu-speed: a plain fp32 matmul peaks near 77 GFLOP/s on these 2 cores


def peak_tflops(cfg: RunConfig) -> float:
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    return H100_BF16_TFLOPS if torch.cuda.is_available() else CPU_FP32_TFLOPS


class Observer:
    """Rank 0 only: the progress bar, ``train.log`` and TensorBoard of a :class:`engine.train.loop.Loop` run."""

    def __init__(self, settings, method):
        self.s, self.method = settings, method
        self.run_dir = Path(settings.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.text = (self.run_dir / "train.log").open("a") if settings.text_log else None
        self.tb = None
        self.bar = None

    def start(self, step: int, total: int) -> None:
        if self.s.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: drop the events a crashed run logged after the checkpoint it resumes from
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)
        if self.s.progress_bar:
            self.bar = progress(total=total, initial=step, desc=self.method.name, unit="step", dynamic_ncols=True)
        drop_rows_after(self.run_dir / "quality" / "scores.jsonl", step)  # a resumed run redoes later steps
        self.log_text(f"training steps {step} -> {total} on {dist.world_size()} rank(s)")

    def log_text(self, msg: str) -> None:
        if self.text is not None:
            self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            self.text.flush()
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.info(msg)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, means: dict[str, float], extra: dict[str, float]) -> None:
        """``means``: the method's metrics over the window (tagged ``<name>/<key>``); ``extra``: tagged scalars."""
        prefix = self.method.name if self.method.name != "distill" else "train"
        scalars = {f"{prefix}/{k}": v for k, v in means.items()} | extra
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        losses = {k: v for k, v in means.items() if k.startswith("loss")}
        if self.bar is not None:
            self.bar.set_postfix({k.replace("loss_", ""): f"{v:.4g}" for k, v in losses.items()}, refresh=False)
        brief = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
        mfu = f" mfu={extra['perf/mfu']:.3g}" if "perf/mfu" in extra else ""
        self.log_text(f"step {step} {brief}{mfu} samples/s={extra['perf/samples_per_s']:.3g}")

    def quality(self, step: int, report: dict) -> None:
        """A sample step's quality report (engine/train/quality.py): scalars quality/<name>, warnings in the log."""
        if self.tb is not None:
            for k, v in report["scores"].items():
                self.tb.add_scalar(f"quality/{k}", v, step)
        scores, teacher = report["scores"], report.get("teacher", {})
        shown = [
            f"{k}={scores[k]:.4g}" + (f" (teacher {teacher[k]:.4g})" if k in teacher else "")
            for k in ("saturation", "frame_diff", "travel", "instance_preservation")
            if k in scores
        ]
        self.log_text(f"step {step} quality: " + ", ".join(shown))
        for w in report["warnings"]:
            self.log_text(f"step {step} WARNING quality drift: {w}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.text is not None:
            self.text.close()
