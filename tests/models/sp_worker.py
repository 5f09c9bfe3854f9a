"""Worker of the sequence-parallel model tests (tests/models/test_sequence_parallel.py), on 2 gloo ranks.

    torchrun --nproc_per_node 2 tests/models/sp_worker.py OUT.json

Both ranks build the same tiny fp32 DiT. For each case every rank runs the plain model (whole sequences) and the same
model split over the 2 ranks with Ulysses sequence parallelism, forward and backward of one loss, and rank 0 writes
how far apart they are: the output, and the gradients as ZeRO would see them (each rank's gradient averaged over the
world: what the optimizer steps with).
"""

import json
import sys
from pathlib import Path

import torch

from engine.config import model_preset
from engine.models.sequence_parallel import SequenceParallel
from engine.models.wan import WanModel
from engine.train import dist

# (name, latent (F, H, W), tokens after the (1, 2, 2) patch, overrides of the tiny preset, frame positions)
CASES = [
    ("even", (3, 4, 4), 12, {}, None),
    ("odd", (3, 2, 6), 9, {}, None),  # 9 tokens: the second rank's shard holds 4 real tokens and one pad
    ("fewer_than_ranks_per_frame", (1, 2, 2), 1, {}, None),  # 1 token: the second shard is all padding
    ("checkpointed_odd", (5, 2, 2), 5, {"gradient_checkpointing": True}, None),
    ("stride2_positions", (3, 2, 6), 9, {}, torch.tensor([0, 2, 4])),  # VIF's half-rate positions
]


def _mean_over_world(t: torch.Tensor) -> torch.Tensor:
    return dist.all_reduce_sum(t.clone()) / dist.world_size()


def run_case(latent, overrides, positions, seed=0):
    cfg = model_preset("tiny", **{"gradient_checkpointing": False, **overrides})
    torch.manual_seed(seed)
    model = WanModel(cfg)
    with torch.no_grad():
        for p in model.parameters():  # all ranks: the same random weights (no zero head)
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, cfg.in_dim, *latent, generator=g)
    t = torch.tensor([900.0, 250.0])
    ctx = torch.randn(2, 5, cfg.text_dim, generator=g)
    weight = torch.randn(2, cfg.out_dim, *latent, generator=g)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_(True)
        out = model(xin, t, ctx, frame_positions=positions)
        (out * weight).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), xin.grad.clone(), grads

    model.set_sequence_parallel(None)
    ref_out, ref_dx, ref_grads = forward_backward()
    layout = dist.sequence_layout()
    model.set_sequence_parallel(SequenceParallel(layout.group, layout.size, layout.rank))
    out, dx, grads = forward_backward()
    with torch.no_grad():
        model.eval()
        no_grad_out = model(x, t, ctx, frame_positions=positions)
    out_other = dist.all_gather(out)[1 - dist.rank()]
    grad_diff = max(float((_mean_over_world(grads[n]) - ref_grads[n]).abs().max()) for n in ref_grads)
    grad_rel = max(
        float((_mean_over_world(grads[n]) - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12))
        for n in ref_grads
    )
    grad_scale = max(float(ref_grads[n].abs().max()) for n in ref_grads)
    own_share = max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads)  # one rank's is not the whole
    return {
        "out_diff": float((out - ref_out).abs().max()),
        "no_grad_out_diff": float((no_grad_out - ref_out).abs().max()),
        "ranks_agree": bool(torch.equal(out, out_other)),
        "dx_diff": float((_mean_over_world(dx) - ref_dx).abs().max()),
        "grad_diff": grad_diff,
        "grad_rel": grad_rel,
        "grad_scale": grad_scale,
        "own_share_diff": own_share,
        "shape": list(out.shape),
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init()
    dist.init_sequence_parallel(2)
    report = {"world": dist.world_size()}
    for name, latent, tokens, overrides, positions in CASES:
        report[name] = {**run_case(latent, overrides, positions), "tokens": tokens}
    if dist.is_main():
        out.write_text(json.dumps(report, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    from engine.train.dist import exit_process

    exit_process(main())  # not a plain exit: engine/train/dist.py:exit_process
