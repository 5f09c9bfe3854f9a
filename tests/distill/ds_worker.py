"""Worker for the distributed trainer tests: a tiny teacher, synthetic latents, the real job wiring.

    torchrun --nproc_per_node 2 tests/distill/ds_worker.py RUN.yaml [overrides...]

Writes <run_dir>/report.json on rank 0 (per-step losses, which roles changed at each step, the regression EMA after
each step, the fraction of each parameter held locally) and <run_dir>/final_weights.pt (full generator and critic
weights after the last step).

Faults, by environment variable (steps are the loop's 0-based step index, as in NAN_BATCHES):
    NAN_BATCHES=0,10            real latents of these batches are NaN
    NAN_GRADS=critic:2,...      that role's backward at that step yields NaN gradients (its loss stays finite)
    NAN_SCORES=teacher:5,...    that role's (teacher or critic) score at that step is NaN
    POISON_WEIGHTS=generator:3:1  after step 3, rank 1's partition of the generator's first weight becomes NaN
With RECORD_GENERATOR=1 rank 0 also writes <run_dir>/generator_step<n>.pt, the full generator after each step n that
changed it, and <run_dir>/sampled_step<n>.pt, the full weights the sample-video writer got at step n (the job's own
writer with SAMPLE_VIDEOS=1, a stand-in that only records without). With
SAMPLE_VIDEOS=1 the world has two sample prompts and a pixel codec (tanh of the first three latent channels, 8x
nearest upsampling), so logging.sample_every writes real sample videos through the job's own sampler.
"""

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch

from engine.config import load_config
from engine.distill import job
from engine.distill.job import World, run_distillation
from engine.train import dist
from engine.train.errors import TrainingStopped
from engine.train.errors import report as report_stop
from engine.train.orphans import die_with_parent
from engine.worlds.source import Batch, TensorSource

LATENT = (4, 3, 4, 4)  # (C, F, H, W) for the tiny preset (in_dim 4)
CTX = (6, 16)  # (L, text_dim)


class NanAt(TensorSource):
    """Real latents become NaN at the listed batches (a corrupt sample): the generator update must be skipped."""

    def __init__(self, *a, nan_batches=(), **kw):
        super().__init__(*a, **kw)
        self.nan_batches = set(nan_batches)

    def next_batch(self) -> Batch:
        index = self.position.epoch * 1000 + self.position.cursor  # position-based, so it survives resume
        b = super().next_batch()
        if index in self.nan_batches:
            b.real_latents = torch.full_like(b.real_latents, float("nan"))
        return b


class PixelCodec:
    """Latents (B, 4, F, 4, 4) -> a (B, 3, F, 32, 32) video in [-1, 1]; nothing is ever encoded."""

    z_dim, temporal_stride, spatial_stride = LATENT[0], 1, 8

    def encode(self, video):
        raise NotImplementedError

    def decode(self, latents):
        return torch.tanh(latents[:, :3].float()).repeat_interleave(8, -1).repeat_interleave(8, -2)


def make_world(cfg, device):
    g = torch.Generator().manual_seed(1234)
    t = torch.linspace(0, 1, LATENT[1]).view(1, 1, -1, 1, 1)
    latents = torch.randn(32, *LATENT, generator=g) * 0.5 + torch.sin(6 * t)  # some temporal structure
    context = torch.randn(32, *CTX, generator=g)
    nan = [int(x) for x in os.environ.get("NAN_BATCHES", "").split(",") if x]
    source = NanAt(
        latents,
        context,
        cfg.optim.micro_batch_size,
        rank=dist.rank(),
        world_size=dist.world_size(),
        seed=cfg.train.seed,
        nan_batches=nan,
    )
    if not os.environ.get("SAMPLE_VIDEOS"):
        return World(source=source, uncond=torch.zeros(1, *CTX), latent_shape=LATENT)
    prompts = ["a red ball", "a blue cube"]
    return World(source=source, uncond=torch.zeros(1, *CTX), latent_shape=LATENT, sample_prompts=prompts,
                 sample_context=torch.randn(len(prompts), *CTX, generator=g), load_codec=PixelCodec)  # fmt: skip


def _faults(name):
    """NAME=role:step[:rank],... -> [(role, step, rank or None)]."""
    out = []
    for item in filter(None, os.environ.get(name, "").split(",")):
        role, step, *rank = item.split(":")
        out.append((role, int(step), int(rank[0]) if rank else None))
    return out


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: the loss stays finite, every gradient through it is NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def install_faults(trainer):
    modules = _modules(trainer)
    for env, poison in (("NAN_GRADS", NanGrad.apply), ("NAN_SCORES", lambda out: out * float("nan"))):
        by_role = {}
        for role, step, _ in _faults(env):
            by_role.setdefault(role, set()).add(step)
        for role, steps in by_role.items():

            def hook(module, inputs, output, steps=steps, poison=poison, grads=env == "NAN_GRADS"):
                if trainer.step in steps and (torch.is_grad_enabled() or not grads):
                    return poison(output)
                return output

            modules[role].register_forward_hook(hook)


def poison_weights(trainer):
    for role, step, rank in _faults("POISON_WEIGHTS"):
        if trainer.step == step and rank in (None, dist.rank()):
            with torch.no_grad():
                local = next(
                    t for p in _modules(trainer)[role].parameters() if (t := getattr(p, "ds_tensor", p)).numel()
                )
                local.fill_(float("nan"))


def _modules(trainer):
    roles = trainer.method.roles
    return {"generator": roles.generator.module, "critic": roles.critic.module, "teacher": roles.teacher.module}


def _local(module):
    return torch.cat([getattr(p, "ds_tensor", p).detach().flatten().clone() for p in module.parameters()])


def _full(module):
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def _zero3_vs_plain(trainer):
    """Max |out| difference between the ZeRO-3 generator and a plain WanModel loaded from the teacher checkpoint."""
    from engine.models.checkpoint import load_weights
    from engine.models.wan import WanModel

    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, *LATENT, generator=g), torch.randn(2, *CTX, generator=g)
    t = torch.tensor([900.0, 100.0])
    with torch.no_grad():
        partitioned = trainer.method.roles.generator.module(x, t, ctx)  # collective: every rank runs it
        plain = WanModel(trainer.method.roles.model_cfg)
        load_weights(plain, trainer.cfg.model.checkpoint)
        return float((partitioned - plain(x, t, ctx)).abs().max())


def _optimizer_census(engine):
    """What the engine's optimizer holds on this rank: the names of the parameters it steps, summed over the ranks the
    elements of its fp32 master partitions and of Adam's moments (ZeRO-3's flat partitions)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None) or [g["params"] for g in opt.param_groups]
    stepped = sorted(names[id(p)] for g in groups for p in g)
    flat = getattr(opt, "fp32_partitioned_groups_flat", [])
    inner = getattr(opt, "optimizer", opt)
    moments = [v for st in inner.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    counts = torch.tensor([float(sum(t.numel() for t in flat)), float(sum(t.numel() for t in moments))])
    fp32, adam = dist.all_reduce_sum(counts).tolist()
    return {"stepped": stepped, "fp32_master": int(fp32), "adam": int(adam)}


class Recorder:
    def __init__(self, run_dir: Path):
        self.run_dir, self.prev, self.rows, self.zero3_vs_plain = run_dir, None, [], None

    def __call__(self, trainer, metrics):
        if metrics is None:
            install_faults(trainer)
        else:
            poison_weights(trainer)
        now = {k: _local(m) for k, m in _modules(trainer).items()}
        if metrics is None and trainer.step == 0:  # fresh start: the partitioned model computes what a plain one does
            self.zero3_vs_plain = _zero3_vs_plain(trainer)
        if metrics is None:  # before the first step
            self.optimizers = {
                k: type(getattr(e.optimizer, "optimizer", e.optimizer)).__name__
                for k, e in (("generator", trainer.method.roles.generator), ("critic", trainer.method.roles.critic))
            }
            self.partition = {
                k: [getattr(p, "ds_tensor", p).numel() / getattr(p, "ds_numel", p.numel()) for p in m.parameters()]
                for k, m in _modules(trainer).items()
            }
        else:
            changed = {}
            for k in now:
                flag = torch.tensor([0.0 if torch.equal(now[k], self.prev[k]) else 1.0])
                changed[k] = bool(dist.all_reduce_sum(flag).item() > 0)
            losses = {k: float(v) for k, v in metrics.items() if k.startswith("loss")}
            ema = trainer.method.regression.ema.tolist()
            lr = {k: e.optimizer.param_groups[0]["lr"] for k, e in trainer.method.engines.items()}
            self.rows.append({"step": trainer.step, "changed": changed, "losses": losses, "reg_ema": ema, "lr": lr})
            if os.environ.get("RECORD_GENERATOR") and changed["generator"]:  # the full weights after each update
                full = _full(_modules(trainer)["generator"])
                if dist.is_main():
                    torch.save(full, self.run_dir / f"generator_step{trainer.step}.pt")
        self.prev = now
        if trainer.step == trainer.cfg.train.max_steps and metrics is not None:
            self.trained = {k: _optimizer_census(e) for k, e in trainer.method.engines.items()}
            full = {k: _full(m) for k, m in _modules(trainer).items() if k != "teacher"}
            if dist.is_main():
                torch.save(full, self.run_dir / "final_weights.pt")


def probe_sampler(cfg, world, device, *_):
    """Stands in for the sample-video writer: records the full weights the sampler is handed at each call."""
    run_dir = Path(cfg.logging.run_dir)

    def sampler(generator, step):
        full = _full(generator)  # collective, as the real sampler's forwards are
        if dist.is_main():
            torch.save(full, run_dir / f"sampled_step{step}.pt")

    return sampler


def recording(world_sampler):
    """The job's own sample-video writer, which first records the full weights it is handed (as probe_sampler)."""

    def build(cfg, world, device, *rest):
        write = world_sampler(cfg, world, device, *rest)
        if write is None:
            return None
        run_dir = Path(cfg.logging.run_dir)

        def sampler(generator, step):
            full = _full(generator)  # collective
            if dist.is_main():
                torch.save(full, run_dir / f"sampled_step{step}.pt")
            return write(generator, step)

        return sampler

    return build


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    run_dir = Path(cfg.logging.run_dir)
    rec = Recorder(run_dir)
    die_with_parent()  # as launcher/run.py does
    if os.environ.get("RECORD_GENERATOR"):
        job.world_sampler = recording(job.world_sampler) if os.environ.get("SAMPLE_VIDEOS") else probe_sampler
    try:
        summary = run_distillation(cfg, make_world, on_step=rec)
    except TrainingStopped as exc:  # as launcher/run.py reports it: one line, the exit status
        sys.exit(report_stop("ds_worker", exc))
    if dist.is_main():
        report = {
            "summary": summary,
            "rows": rec.rows,
            "partition": getattr(rec, "partition", None),  # None: the job built no model (it had finished)
            "zero3_vs_plain": rec.zero3_vs_plain,
            "optimizers": getattr(rec, "optimizers", None),  # the basic optimizer inside each DeepSpeed engine
            "trained": getattr(rec, "trained", None),  # what each trained engine's optimizer steps and holds
        }
        (run_dir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
