"""Worker of the sequence-parallel distillation tests (tests/distill/test_sequence_parallel.py): the toy distillation
job (configs/toy.yaml) through the engine's entry point.

    torchrun --nproc_per_node N tests/distill/sp_worker.py OUT_DIR [overrides of configs/toy.yaml...]

Rank r writes OUT_DIR/rank<r>.json: per step its losses, gradient norms and regression EMA, and a fingerprint of the
batch it read; at the end the data-parallel layout it ran with. Rank 0 also writes OUT_DIR/initial.pt and
OUT_DIR/final.pt (the gathered generator and critic before the first step of a fresh run and after the last) and
OUT_DIR/samples.pt (the sample-video latents rank 0 decoded).
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from engine.config import load_config
from engine.distill.job import run_distillation, training_world
from engine.train import dist
from engine.train.errors import TrainingStopped
from engine.train.errors import report as report_stop

TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"


def _full(module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(TOY, overrides)
    rows, batches, decoded = [], [], []

    def world(cfg, device):
        w = training_world(cfg, device)
        source, decode = w.source, w.decode

        class Recorded:  # the world's source, with a fingerprint of every batch it hands out
            def next_batch(self):
                b = source.next_batch()
                batches.append([float(b.real_latents.double().sum()), float(b.prompts.double().sum())])
                return b

            def state_dict(self):
                return source.state_dict()

            def load_state_dict(self, state):
                source.load_state_dict(state)

        def recording_decode(latents, *a, **kw):
            decoded.append(latents.detach().clone())
            return decode(latents, *a, **kw)

        w.source, w.decode = Recorded(), recording_decode
        return w

    def on_step(loop, metrics):
        roles = loop.method.roles
        if metrics is None:
            if loop.step == 0:  # a fresh start: the weights every role starts from
                full = {"generator": _full(roles.generator.module), "critic": _full(roles.critic.module)}
                if dist.is_main():
                    torch.save(full, out_dir / "initial.pt")
            return
        row = {k: float(v) for k, v in metrics.items() if k.startswith(("loss", "grad_norm"))}
        rows.append({"step": loop.step, **row, "reg_ema": loop.method.regression.ema.tolist()})
        if loop.step == cfg.train.max_steps:
            full = {"generator": _full(roles.generator.module), "critic": _full(roles.critic.module)}
            if dist.is_main():
                torch.save(full, out_dir / "final.pt")

    try:
        summary = run_distillation(cfg, world, on_step=on_step)
    except TrainingStopped as exc:
        sys.exit(report_stop("sp_worker", exc))
    layout = {"sp": dist.sequence_parallel_size(), "data_rank": dist.data_rank(), "data_world": dist.data_world_size()}
    doc = {"summary": summary, "rows": rows, "batches": batches, "layout": layout}
    (out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(doc, indent=1))
    if dist.is_main() and decoded:
        torch.save(torch.cat(decoded), out_dir / "samples.pt")
    dist.shutdown()


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
