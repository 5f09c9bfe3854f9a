"""Worker of the golden-loss test: the toy distillation job through the engine's entry point, per-step losses out.

    torchrun --nproc_per_node 2 tests/train/golden_worker.py OUT.json [overrides of configs/toy.yaml...]

Rank r writes OUT.rank<r>.json with its per-step loss values (Python floats, repr-exact).
"""

import json
import sys
from pathlib import Path

from engine.config import load_config
from engine.distill.job import run_distillation

TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(TOY, overrides)
    losses = []

    def record(loop, metrics):
        if metrics is not None:
            losses.append({k: float(v) for k, v in metrics.items() if k.startswith("loss")})

    summary = run_distillation(cfg, on_step=record)
    path = out.with_name(f"{out.stem}.rank{summary['rank']}.json")
    path.write_text(json.dumps({"step": summary["step"], "losses": losses}, indent=1))


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
