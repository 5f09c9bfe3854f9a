"""Training loop of the frame-interpolation U-Net (paper appendix 8; docs/method.md#interpolator-training).

Per step: take real latents (B, C, F, H, W) with F odd, keep every other frame, predict every dropped frame from its
two kept neighbours (all pairs of the batch in one call), regress on the true frames. AdamW (betas 0.9, 0.999), batch
and steps from ``cfg.interp``; data-parallel with DeepSpeed (ZeRO stage ``interp.zero_stage``, client torch AdamW).

The loss is the MSE over the *generated* frames only. The paper regresses against all 21 frames, but the 11 kept frames
are exact copies (zero error, zero gradient), so its loss is ours times (F - 1) / (2F - 1) = 10/21: the same
gradient direction, and AdamW's update is invariant to a constant loss scale (up to eps). Ours reads as "MSE of an
inserted frame" whatever F is. The PSNR logged next to it is on the generated frames too, against the linear blend.

It runs on the engine's training loop (``engine.train.loop``: non-finite skipping, checkpoints completed atomically,
``latest``, keep-last-k, per-rank data positions, exact resume, logging); each step directory also holds the
deployable ``interpolator/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import RunConfig, save_config
from engine.config import deepspeed_config as run_deepspeed_config
from engine.interp.data import LatentSource
from engine.models.interp_unet import InterpolatorError, InterpUNet, frame_pairs, load_interpolator, save_interpolator
from engine.train import dist, runlock
from engine.train.accum import MicroBatches
from engine.train.loop import Loop, LoopSettings, Update
from engine.train.timer import PhaseTimer
from engine.train.warmup import linear_warmup


@dataclass
class InterpRun:
    """What a training run returns: the first and last step, the logged scalars, where rank 0 exported to."""

    step: int
    start: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    export_dir: Path | None = None
    heldout: dict[str, float] | None = None
    """Held-out MSE/PSNR of the interpolator and of the linear blend (toy world: its val split)."""


# ---------------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------------


def odd_frames(latents: torch.Tensor) -> torch.Tensor:
    """Drop the last frame of an even-length clip (2k frames -> 2k - 1), so keep/interpolate returns every frame."""
    f = latents.shape[2]
    if f < 3:
        raise InterpolatorError(f"interpolator training needs clips of at least 3 latent frames, got {f}")
    return latents if f % 2 else latents[:, :, :-1]


def split_batch(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, F, H, W), F odd -> pairs of kept neighbours (B (F-1)/2, 2C, H, W) and the dropped frames (same N, C)."""
    kept = latents[:, :, ::2]  # (B, C, (F + 1) / 2, H, W)
    dropped = latents[:, :, 1::2]  # (B, C, (F - 1) / 2, H, W): the frames the interpolator has to produce
    target = dropped.transpose(1, 2).reshape(-1, *dropped.shape[1:2], *dropped.shape[-2:])  # (N, C, H, W)
    return frame_pairs(kept), target


def latent_psnr(mse: torch.Tensor | float, peak: torch.Tensor | float) -> torch.Tensor:
    """10 log10(peak^2 / MSE), with the MSE pooled over all generated frames of a batch or a held-out set and the peak
    the target's range (max - min): latents have no fixed peak value. Pooled, not a mean of per-clip PSNRs: on a static
    clip the linear blend is exact and its per-clip PSNR unbounded (20% of toy-world clips are static), so a handful of
    clips would decide a per-clip mean."""
    mse, peak = torch.as_tensor(mse, dtype=torch.float64), torch.as_tensor(peak, dtype=torch.float64)
    return 10 * torch.log10(peak.square() / mse.clamp_min(1e-20))


def interp_objective(model, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (MSE over generated frames) and detached metrics (psnr, psnr_blend, loss_blend) for (B, C, F, H, W)."""
    pairs, target = split_batch(latents)
    pred = model(pairs)  # (N, C, H, W)
    loss = F.mse_loss(pred.float(), target.float())
    with torch.no_grad():
        a, b = pairs.chunk(2, dim=1)
        blend = 0.5 * (a + b)  # the baseline: linear blend of the two neighbours
        loss_blend = F.mse_loss(blend.float(), target.float())
        peak = target.max() - target.min()
        metrics = {
            "psnr": latent_psnr(loss.detach(), peak).float(),
            "psnr_blend": latent_psnr(loss_blend, peak).float(),
            "loss_blend": loss_blend,
        }
    return loss, metrics


@torch.no_grad()
def evaluate(model: InterpUNet, batches, max_batches: int | None = None) -> dict[str, float]:
    """Held-out MSE and PSNR (pooled over the whole set) of the interpolator and of the linear blend, on
    (B, C, F, H, W) batches (F >= 3)."""
    sums, count, lo, hi = {"loss": 0.0, "loss_blend": 0.0}, 0, float("inf"), float("-inf")
    for i, latents in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        latents = odd_frames(latents)
        loss, metrics = interp_objective(model, latents)
        target = latents[:, :, 1::2]  # the generated frames
        n = target.numel()
        sums["loss"] += float(loss) * n
        sums["loss_blend"] += float(metrics["loss_blend"]) * n
        lo, hi, count = min(lo, float(target.min())), max(hi, float(target.max())), count + n
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["psnr"] = float(latent_psnr(out["loss"], hi - lo))
    out["psnr_blend"] = float(latent_psnr(out["loss_blend"], hi - lo))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------------


def micro_batch(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(samples per rank per forward, gradient accumulation steps) for the global ``interp.batch_size``."""
    b = cfg.interp.batch_size
    if b % world_size:
        raise ValueError(f"interp.batch_size={b} is not divisible by the {world_size} data-parallel ranks")
    per_rank = b // world_size
    mb = cfg.interp.micro_batch_size or per_rank
    if per_rank % mb:
        raise ValueError(f"interp.micro_batch_size={mb} does not divide the {per_rank} samples per rank")
    return mb, per_rank // mb


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The run's DeepSpeed JSON (engine.config) with the interpolator's batch, ZeRO stage, fp32 and no clipping."""
    mb, accum = micro_batch(cfg, world_size)
    # A small model: its optimizer stays on the device whatever the run offloads.
    return run_deepspeed_config(
        cfg, world_size, micro_batch_size=mb, grad_accum_steps=accum, zero_stage=cfg.interp.zero_stage,
        gradient_clipping=0.0, dtype=torch.float32, offload_optimizer=False,
    )  # fmt: skip


def build_engine(cfg: RunConfig, world_size: int):
    """DeepSpeed engine over a fresh InterpUNet (channels = the student's model.in_dim) with a client torch AdamW."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    i = cfg.interp
    model = InterpUNet(cfg.model.in_dim, i.channels, residual=i.residual)
    opt = torch.optim.AdamW(model.parameters(), lr=i.lr, betas=(0.9, 0.999), weight_decay=i.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, config=deepspeed_config(cfg, world_size), lr_scheduler=linear_warmup(i.warmup_steps)
    )
    return engine


def _check_batch(latents: torch.Tensor, in_dim: int) -> torch.Tensor:
    if latents.ndim != 5 or latents.shape[1] != in_dim:
        raise InterpolatorError(
            f"latent batch {tuple(latents.shape)} does not match the interpolator: expected (B, {in_dim}, F, H, W) "
            f"with {in_dim} = model.in_dim, the student's latent channels"
        )
    return odd_frames(latents)


# ---------------------------------------------------------------------------------------------------------------------
# The method on the engine's loop
# ---------------------------------------------------------------------------------------------------------------------

ENGINE_TAG = "unet"  # the DeepSpeed engine's directory inside a step checkpoint


class InterpMethod:
    """One optimizer step = one update of the U-Net engine over ``accum`` micro-batches (the loop accumulates them,
    DeepSpeed applies the optimizer on the accumulation boundary; the step logs the means over its micro-batches)."""

    name = "interp"

    def __init__(self, engine, accum: int, in_dim: int, micro_batch_size: int):
        self.engines = {ENGINE_TAG: engine}
        self.accum, self.in_dim = accum, in_dim
        self.samples_per_step = micro_batch_size * accum
        self.timer = PhaseTimer()

    def updates(self, step: int, batch: list[torch.Tensor]):
        engine = self.engines[ENGINE_TAG]
        for i, latents in enumerate(batch):
            latents = _check_batch(latents, self.in_dim).to(engine.device)
            loss, metrics = interp_objective(engine, latents)
            yield Update(ENGINE_TAG, loss, {"loss": loss.detach(), **metrics}, micro=i, micros=len(batch))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def log_scalars(self, seconds: float, steps: int) -> dict[str, float]:
        self.timer.pop()
        return {}


def train_interp(cfg: RunConfig, source: LatentSource, *, export_dir: str | Path | None = None) -> InterpRun:
    """Train for ``cfg.interp.steps`` optimizer steps (resuming per ``cfg.checkpoint.resume``); export at the end.

    ``source`` yields this rank's micro-batches (see :func:`micro_batch`). Checkpoints go to
    ``<logging.run_dir>/checkpoints`` every ``checkpoint.every_steps`` steps and at the end, each with the deployable
    ``interpolator/``; the deployable interpolator (safetensors + config.json) to ``export_dir`` (default
    ``<run_dir>/interpolator``).
    """
    dist.init()
    with runlock.hold(cfg.logging.run_dir):  # one job per run directory
        return _train_interp(cfg, source, export_dir)


def _train_interp(cfg: RunConfig, source: LatentSource, export_dir: str | Path | None) -> InterpRun:
    world = dist.world_size()
    run_dir = Path(cfg.logging.run_dir)
    mb, accum = micro_batch(cfg, world)
    engine = build_engine(cfg, world)
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
    out = Path(export_dir or run_dir / "interpolator")
    exported: list[Path] = []

    def after_save(loop: Loop, path: Path) -> None:  # collective
        if dist.is_main():
            save_interpolator(engine.module, path / "interpolator")
        dist.barrier()

    def exporter() -> None:
        if dist.is_main():
            exported.append(save_interpolator(engine.module, out))
        dist.barrier()

    loop = Loop(
        LoopSettings.of(cfg, max_steps=cfg.interp.steps),
        InterpMethod(engine, accum, cfg.model.in_dim, mb),
        MicroBatches(source, accum),
        cfg=cfg,
        after_save=after_save,
        exporter=exporter,
        export_done=lambda: (out / "model.safetensors").is_file(),
    )
    summary = loop.run()
    return InterpRun(
        step=summary["step"], start=summary["start"], history=loop.history, export_dir=exported[0] if exported else None
    )


def run(
    cfg: RunConfig,
    *,
    latents: str | Path | None = None,
    synthetic: tuple[int, int, int] | None = None,
    online: bool = False,
    toy: bool = False,
    export_dir: str | Path | None = None,
) -> InterpRun:
    """Entry point of ``launcher/train_interp.py``: one of a latent directory/cache, synthetic (F, H, W) patterns with
    model.in_dim channels, or online encoding of ``cfg.data``; then :func:`train_interp`."""
    from engine.interp import data

    if sum((latents is not None, synthetic is not None, online, toy)) != 1:
        raise ValueError("give exactly one latent source: a latent directory, synthetic (F, H, W), online or toy")
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    mb, _ = micro_batch(cfg, world)
    common = dict(batch_size=mb, rank=rank, world_size=world, seed=cfg.train.seed)
    if latents is not None:
        source = data.open_latents(latents, **common)
    elif synthetic is not None:
        source = data.SyntheticLatents(cfg.model.in_dim, *synthetic, **common)
    elif toy:
        return _run_toy(cfg, common, export_dir)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        source = data.online_latents(cfg, **common, device=device)
    return train_interp(cfg, source, export_dir=export_dir)


def _run_toy(cfg: RunConfig, common: dict, export_dir) -> InterpRun:
    """Train on the toy world's train-split latents; score the held-out val split against the linear blend."""
    from engine.interp.data import TensorLatents
    from engine.toy.data import toy_tensors
    from engine.toy.parts import toy_parts

    parts = toy_parts(cfg)
    train = toy_tensors(cfg.toy, parts.codec, parts.text, split="train")
    result = train_interp(cfg, TensorLatents(train.latents, **common), export_dir=export_dir)
    if result.export_dir is not None:  # rank 0
        val = toy_tensors(cfg.toy, parts.codec, parts.text, split="val").latents
        model = load_interpolator(result.export_dir).eval()
        result.heldout = evaluate(model, val.split(32))
    return result
