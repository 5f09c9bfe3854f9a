"""Worker of the sequence-parallel generation test (tests/generate/test_generate_sp.py), under torchrun.

    torchrun --nproc_per_node 2 tests/generate/sp_worker.py OUT.json DEPLOY TEACHER CLI_OUT [overrides of toy.yaml]

For the student, VIF and teacher samplers every rank generates the same videos with the DiT split over the ranks (as
one batch, and one video per batch), then again with the whole DiT on its own; rank 0 writes how far apart the
latents are and whether the ranks agree. Then the ranks run the generation CLI (launcher/generate.py's ``main``, as
``torchrun ... launcher/generate.py`` does) with ``CLI_ARGS`` into CLI_OUT.
"""

import json
import sys
from pathlib import Path

import torch

from engine.config import load_config
from engine.generate import GenerateSettings, Generator, plan_generation
from engine.train import dist
from engine.train.timer import PhaseTimer
from launcher import generate as generate_cli

TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"
PROMPTS = ["a red circle moves left", "a blue square moves up"]
SEEDS = [3, 4]
CLI_ARGS = ["--sampler", "vif", "--prompt", "a red circle", "--prompt", "a blue square moves up", "--seed", "1"]
CLI_ARGS += ["--batch", "1", "--no-progress"]


def main() -> None:
    out, deploy, teacher, cli_out, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    cfg = load_config(TOY, overrides)
    report = {}
    for sampler in ("student", "vif", "teacher"):
        steps = 3 if sampler == "teacher" else None
        settings = GenerateSettings(
            out_dir="unused", student=deploy, teacher=teacher, prompts=PROMPTS, sampler=sampler, teacher_steps=steps
        )
        plan = plan_generation(cfg, settings)
        if not dist.sequence_layout():
            dist.init()
            dist.init_sequence_parallel(plan.sequence_parallel)
        gen = Generator(plan, "cpu")
        ctx = gen.world.encode_text(PROMPTS)
        with torch.no_grad():
            split = gen.latents(ctx, SEEDS, PhaseTimer())
            one_by_one = torch.cat([gen.latents(ctx[i : i + 1], SEEDS[i : i + 1], PhaseTimer()) for i in range(2)])
            gen.model.set_sequence_parallel(None)
            whole = gen.latents(ctx, SEEDS, PhaseTimer())
        report[sampler] = {
            "sequence_parallel": plan.sequence_parallel,
            "ranks": plan.ranks,
            "diff": float((split - whole).abs().max()),
            "one_by_one_diff": float((one_by_one - whole).abs().max()),
            "scale": float(whole.abs().max()),
            "ranks_agree": bool(torch.equal(*dist.all_gather(split))),
            "writes": gen.writes,
        }
        report[sampler]["writers"] = dist.all_gather_object(gen.writes)
    if dist.is_main():
        out.write_text(json.dumps(report, indent=1))
    cli = ["--config", str(TOY), "--student", deploy, "--out", cli_out, *CLI_ARGS, *overrides]
    sys.exit(generate_cli.main(cli))  # collective; it leaves the process group at the end


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
