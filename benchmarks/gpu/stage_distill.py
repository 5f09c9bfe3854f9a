"""GPU check, stage "distill": the real distillation job (engine.distill.job.run_distillation: DeepSpeed ZeRO-3
engines for teacher, generator and critic, the DMD method, the loop with its guards and a checkpoint) on one GPU, for
one 5:1 cycle after a warm-up step, with a reduced-depth Wan2.1-1.3B: the real width, ``--layers`` blocks, random
weights built here (no download), synthetic latents of the 81x480x832 shape (16 x 21 x 60 x 104) and context.

Steps are timed at the loop's ``on_step`` hook (synchronized there, outside the step). Step 1 pays the warm-up (Triton
autotuning, allocator growth); the cycle is steps 2-6: five critic updates and one generator update (at step 6).
"""

from __future__ import annotations

import dataclasses
import shutil
import time

import torch
from common import LATENT, TEXT_LEN, Stage, stage_args, sync

from engine.config import load_config, model_preset
from engine.distill.job import World, run_distillation
from engine.models.checkpoint import save_weights
from engine.models.wan import WanModel
from engine.train import dist
from engine.worlds.source import TensorSource

SAMPLES = 4


def _teacher(path, cfg) -> None:
    """Random teacher weights (std 0.02, so activations stay in range), saved where model.checkpoint points."""
    torch.manual_seed(0)
    model = WanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_weights(model, cfg, path)


def _world(latent, text_len, text_dim):
    def make_world(cfg, device):
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(SAMPLES, *latent, generator=g)
        context = torch.randn(SAMPLES, text_len, text_dim, generator=g)
        source = TensorSource(latents, context, cfg.optim.micro_batch_size, rank=dist.rank(),
                              world_size=dist.world_size(), seed=cfg.train.seed, device=device)  # fmt: skip
        return World(source=source, uncond=torch.zeros(1, text_len, text_dim), latent_shape=tuple(latent))

    return make_world


def main() -> None:
    args = stage_args(__doc__.split("\n\n")[0], lambda p: p.add_argument("--layers", type=int, default=2))
    with Stage("distill", args) as st:
        run = st.path.parent / "distill_run"
        shutil.rmtree(run, ignore_errors=True)
        if args.dry_run:
            preset, arch, latent, text_len = "tiny", {"num_layers": 1}, (4, 3, 4, 4), 6
            frames = ["data.num_frames=9", "data.height=32", "data.width=32"]
        else:
            preset, arch, latent, text_len = "wan2.1-1.3b", {"num_layers": args.layers}, LATENT, TEXT_LEN
            frames = []
        model_cfg = model_preset(preset, **arch)
        _teacher(run / "teacher", model_cfg)
        overrides = [
            f"model.preset={preset}", f"model.num_layers={model_cfg.num_layers}",
            f"model.checkpoint={run / 'teacher'}", "train.max_steps=6", "method.critic_per_generator=5",
            "checkpoint.every_steps=1000", "checkpoint.export=false", "checkpoint.keep_last=1",
            f"logging.run_dir={run / 'run'}", "logging.log_every=6", "logging.progress_bar=false",
            "logging.tensorboard=false", "deepspeed.param_persistence_threshold=0", *frames,
        ]  # fmt: skip
        cfg = load_config(None, overrides)
        st.set(model=dataclasses.asdict(model_cfg), latent=list(latent), text_len=text_len, overrides=overrides)
        marks: list[tuple[int, float, dict]] = []

        def on_step(loop, metrics):
            sync()
            losses = {k: float(v) for k, v in (metrics or {}).items() if k.startswith("loss")}
            marks.append((loop.step, time.perf_counter(), losses))
            if metrics is not None:
                st.add({"step": loop.step, "seconds": marks[-1][1] - marks[-2][1], "losses": losses})

        if torch.cuda.is_available() and not args.dry_run:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        summary = run_distillation(cfg, _world(latent, text_len, model_cfg.text_dim), on_step=on_step)
        total = time.perf_counter() - t0
        steps = {r["step"]: r for r in st.record["rows"]}
        if sorted(steps) != [1, 2, 3, 4, 5, 6]:
            raise RuntimeError(f"the job ran steps {sorted(steps)}, not 1-6 (summary {summary})")
        gen_steps = [s for s, r in steps.items() if "loss_generator" in r["losses"]]
        if gen_steps != [1, 6]:
            raise RuntimeError(f"generator updates at steps {gen_steps}, expected 1 and 6 (5:1)")
        if any(summary["skipped"].values()):
            raise RuntimeError(f"updates skipped (non-finite values): {summary['skipped']}")
        cycle = sum(steps[s]["seconds"] for s in range(2, 7))
        st.set(
            cycle_s=cycle,
            warmup_step_s=steps[1]["seconds"],
            critic_step_s=sum(steps[s]["seconds"] for s in range(2, 6)) / 4,
            generator_step_s=steps[6]["seconds"],
            job_s=total,
            setup_s=marks[0][1] - t0,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        )
        print(f"5:1 cycle {cycle:.2f} s (critic {st.record['critic_step_s']:.2f} s, generator "
              f"{st.record['generator_step_s']:.2f} s); job {total:.1f} s", flush=True)  # fmt: skip
        shutil.rmtree(run, ignore_errors=True)  # the checkpoint (GBs at the real width) is not a result


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
