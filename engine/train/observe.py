"""Rank-0 observability: progress bar with ETA, TensorBoard scalars, a plain-text log, throughput and MFU.

Scalars per log step: the method's metrics (means over the window and the ranks), what the method adds (the
distillation: per-phase wall time, tokens/s, estimated MFU from model FLOPs as in docs/wan.md#flops, the regression
EMA cache), samples/s, skipped updates.

Weights & Biases (``logging.wandb``, off by default) receives the same scalars at the same steps, the sample videos
as media and the resolved config; offline mode writes ``<run_dir>/wandb/offline-run-*`` for a later ``wandb sync``.
The run id is kept in ``<run_dir>/wandb-run-id`` so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.console import progress
from engine.fsutil import atomic_write_text
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
        self.wandb = None

    def _start_wandb(self) -> None:
        import wandb  # importable: checked with the config (logging.wandb.mode)

        id_file = self.run_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        atomic_write_text(id_file, run_id + "\n")
        self.wandb = wandb.init(
            project=self.s.wandb_project or "vidistill",
            mode=self.s.wandb_mode,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            name=self.run_dir.name,
            config=self.s.run_config or {},
            settings=wandb.Settings(console="off", silent=True),  # our own console; no stdout capture
        )

    def start(self, step: int, total: int) -> None:
        if self.s.wandb_mode != "disabled":
            self._start_wandb()
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
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
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

    def log_videos(self, step: int, paths: list[Path]) -> None:
        """Sample videos (mp4 files the sampler wrote) as W&B media, keyed by name without the step prefix."""
        if self.wandb is None:
            return
        import wandb

        media = {f"samples/{Path(p).stem.split('_', 1)[-1]}": wandb.Video(str(p), format="mp4") for p in paths}
        self.wandb.log(media, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.text is not None:
            self.text.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # waits for the service to write everything (finish alone may return before that)
            self.wandb = None
