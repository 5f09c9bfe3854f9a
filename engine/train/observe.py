"""Rank-0 observability: progress bar with ETA, TensorBoard scalars, a plain-text log, throughput and MFU.

Scalars per log step: every loss, adaptive weights per student timestep and the EMA cache, temporal variance, grad
norms, per-phase wall time, samples/s, tokens/s and estimated MFU (model FLOPs from docs/wan.md#flops over the
peak of every device), skipped updates.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.config import RunConfig
from engine.train import dist

log = logging.getLogger("vidistill.train")

H100_BF16_TFLOPS = 989.0
CPU_FP32_TFLOPS = 0.077  # docs/architecture.md#cpu-speed: a plain fp32 matmul peaks near 77 GFLOP/s on these 2 cores


def peak_tflops(cfg: RunConfig) -> float:
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    return H100_BF16_TFLOPS if torch.cuda.is_available() else CPU_FP32_TFLOPS


class Observer:
    def __init__(self, cfg: RunConfig, method):
        self.cfg, self.method = cfg, method
        self.run_dir = Path(cfg.logging.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.text = (self.run_dir / "train.log").open("a")
        self.tb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.bar = None
        self.window = {"time": 0.0, "steps": 0, "samples": 0}
        self.sums: dict[str, float] = {}  # metric sums over the logging window (generator metrics appear 1 step in 5)
        self.counts: dict[str, int] = {}

    def start(self, step: int, total: int) -> None:
        if self.cfg.logging.progress_bar:
            self.bar = tqdm(total=total, initial=step, desc="distill", unit="step", dynamic_ncols=True)
        self.log_text(f"training steps {step} -> {total} on {dist.world_size()} rank(s)")

    def log_text(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.text.write(line + "\n")
        self.text.flush()
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.info(msg)

    def step(self, step: int, metrics: dict, seconds: float, skipped: dict) -> None:
        w = self.window
        w["time"] += seconds
        w["steps"] += 1
        w["samples"] += self.cfg.optim.micro_batch_size * dist.world_size()
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.logging.log_every:
            return
        scalars = {f"train/{k}": self.sums[k] / self.counts[k] for k in self.sums}  # means over the window
        self.sums, self.counts = {}, {}
        scalars.update({f"time/{k}": v / w["steps"] for k, v in self.method.timer.pop().items()})
        flops = self.method.pop_flops() * dist.world_size()  # every rank ran the same passes
        samples_s = w["samples"] / max(w["time"], 1e-9)
        scalars["perf/samples_per_s"] = samples_s
        scalars["perf/tokens_per_s"] = samples_s * self.method.tokens_per_sample
        scalars["perf/mfu"] = flops / max(w["time"], 1e-9) / (peak_tflops(self.cfg) * 1e12 * dist.world_size())
        scalars["perf/step_s"] = w["time"] / w["steps"]
        for k, v in zip(self.cfg.diffusion.student_timesteps, self.method.regression.ema.tolist()):
            scalars[f"reg_ema/t{k:g}"] = v
        scalars.update({f"skipped/{k}": v for k, v in skipped.items()})
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        losses = {k.split("/", 1)[1]: v for k, v in scalars.items() if k.startswith("train/loss")}
        if self.bar is not None:
            self.bar.set_postfix({k.replace("loss_", ""): f"{v:.4g}" for k, v in losses.items()}, refresh=False)
        brief = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
        self.log_text(f"step {step} {brief} mfu={scalars['perf/mfu']:.3g} samples/s={samples_s:.3g}")
        self.window = {"time": 0.0, "steps": 0, "samples": 0}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.text.close()
