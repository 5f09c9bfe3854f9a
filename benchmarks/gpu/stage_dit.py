"""GPU check, stage "dit": our Wan DiT at the 1.3B width (dim 1536, 12 heads, FFN 8960, umT5 context 512 x 4096) on
32,760 tokens (81 frames at 832x480), bf16, forward and forward+backward with gradient checkpointing as training runs
it, with as many blocks as the budget allows (a 2-block probe sizes it; up to the real 30).

TFLOP/s use the FLOP model of docs/wan.md#flops (benchmarks/test_bench_vif.py: linear layers and attention, 2 x
MAC); forward+backward counts 3x the forward (the recomputation of checkpointing is not counted as useful work). The
per-block time extrapolates to the full 30-block model.
"""

from __future__ import annotations

import dataclasses

import torch
from common import LATENT, TEXT_LEN, Stage, median, stage_args, sync, timed
from test_bench_vif import flops

from engine.config import model_preset
from engine.models.attention import resolve_backend
from engine.models.wan import WanModel

FULL_DEPTH = 30


def _inputs(cfg, latent, text_len, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *latent, generator=g).to(device, dtype)
    ctx = torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype)
    return x, torch.tensor([500.0], device=device), ctx


def measure(cfg, latent, text_len, device, dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    with device:  # initialized on the GPU: faster than on the CPU at this size
        model = WanModel(cfg)
    model = model.to(device, dtype)
    x, t, ctx = _inputs(cfg, latent, text_len, device, dtype)

    def forward():
        with torch.no_grad():
            model(x, t, ctx)

    def forward_backward():
        model(x, t, ctx).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd = median(timed(forward, repeats=repeats, warmup=1))
    fwd_bwd = median(timed(forward_backward, repeats=repeats, warmup=1))
    sync()
    tokens = model.num_tokens(latent[1:])
    fl = flops(cfg, tokens, text_len)
    row = {
        "blocks": cfg.num_layers,
        "tokens": tokens,
        "attention_backend": resolve_backend(cfg.attention_backend, x.new_empty(1, 1, cfg.num_heads, cfg.head_dim)),
        "fused_kernels": cfg.fused_kernels,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "forward_ms": fwd * 1e3,
        "forward_backward_ms": fwd_bwd * 1e3,
        "forward_tflops": fl["total"] / fwd / 1e12,
        "forward_backward_tflops": 3 * fl["total"] / fwd_bwd / 1e12,
        "attention_share_flops": fl["attention"] / fl["total"],
        "per_block_forward_backward_ms": fwd_bwd * 1e3 / cfg.num_layers,
        "projected_30_blocks_forward_backward_s": fwd_bwd * FULL_DEPTH / cfg.num_layers,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    return row  # the model goes with this frame


def main() -> None:
    args = stage_args(__doc__.split("\n\n")[0])
    with Stage("dit", args) as st:
        if args.dry_run:
            cfg, latent, text_len = model_preset("tiny", num_layers=1), (4, 3, 8, 8), 6
        else:
            cfg, latent, text_len = model_preset("wan2.1-1.3b", num_layers=2), LATENT, TEXT_LEN
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
        probe = measure(cfg, latent, text_len, st.device, st.dtype, repeats=2)
        st.add({"probe": True, **probe})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        peak = st.record["device"]["peak_tflops"]
        # time of one measure() at N blocks ~ N * per-block * (1 warm-up + 2 repeats) * (fwd + fwd_bwd), plus set-up
        per_block = (probe["forward_ms"] + probe["forward_backward_ms"]) / 1e3 / cfg.num_layers
        fits = int((st.left() - 8) / max(per_block * 4, 1e-6))  # 8 s: building the model, a margin
        blocks = 1 if args.dry_run else max(cfg.num_layers, min(FULL_DEPTH, fits))
        st.note(f"probe: {per_block * 1e3:.0f} ms per block (fwd + fwd/bwd); measuring {blocks} blocks")
        if blocks > cfg.num_layers or args.dry_run:
            row = measure(dataclasses.replace(cfg, num_layers=blocks), latent, text_len, st.device, st.dtype, 3)
            row["peak_fraction"] = row["forward_backward_tflops"] / peak if peak else None
            st.add(row)
        print(st.record["rows"][-1], flush=True)


if __name__ == "__main__":
    main()
