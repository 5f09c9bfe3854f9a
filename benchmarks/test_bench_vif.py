"""Full-rate 4-step sampling vs VIF 4-step sampling (steps 1-2 at half frame rate) for the same random-weight WanModel.

    python benchmarks/test_bench_vif.py                  # attention-dominated config, table + rows to results/vif.jsonl
    python benchmarks/test_bench_vif.py --config small   # a quick look
    pytest benchmarks/test_bench_vif.py --benchmark-only # the small config under pytest-benchmark

The "attn" config is chosen so attention is ~70% of the FLOPs, as in Wan2.1-1.3B at 832x480x81 (71%,
docs/wan.md#flops): dim 256, 2 layers, 21 latent frames of 16x48 with patch (1, 2, 2) = 4032 tokens (11 frames: 2112).
Printed next to the measured speed-up is the FLOP model's: a half-rate step costs a (11/21)^2 + (1 - a) 11/21 of a
full one. The interpolator's share of the VIF time is measured on the same latent (default widths 64/128/256).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import median_time, write_rows  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.diffusion.flow import FlowSchedule  # noqa: E402
from engine.diffusion.samplers import sample_student  # noqa: E402
from engine.diffusion.vif import sample_vif  # noqa: E402
from engine.models.interp_unet import InterpUNet  # noqa: E402
from engine.models.wan import WanModel  # noqa: E402

TIMESTEPS = [1000.0, 900.0, 757.0, 522.0]
TEXT_LEN = 64  # 512 in Wan2.1
CONFIGS = {
    # (model fields, latent (C, F, H, W))
    "attn": (dict(dim=256, num_heads=4, ffn_dim=1024, num_layers=2, text_dim=256), (16, 21, 16, 48)),
    "small": (dict(dim=128, num_heads=2, ffn_dim=512, num_layers=1, text_dim=128), (16, 21, 8, 16)),
}


def flops(cfg: ModelConfig, tokens: int, text_len: int = TEXT_LEN) -> dict[str, float]:
    """Forward FLOPs by docs/wan.md#flops (2 x MAC; norms, softmax and element-wise ops excluded)."""
    n, d, L, patch = tokens, cfg.dim, text_len, cfg.in_dim * 4
    linear = cfg.num_layers * (8 * n * d * d + 4 * n * d * d + 4 * L * d * d + 4 * n * d * cfg.ffn_dim)
    attention = cfg.num_layers * (4 * n * n * d + 4 * n * L * d)
    outside = 2 * n * d * patch * 2 + 2 * L * (cfg.text_dim * d + d * d)
    return {"linear": linear, "attention": attention, "total": linear + attention + outside}


def build(name: str):
    arch, (c, f, h, w) = CONFIGS[name]
    cfg = ModelConfig(**arch, in_dim=c, out_dim=c, fused_kernels=False, gradient_checkpointing=False)
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    interp = InterpUNet(c).eval()  # default widths (64, 128, 256)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, c, f, h, w, generator=g)
    ctx = torch.randn(1, TEXT_LEN, cfg.text_dim, generator=g)
    return model, interp, noise, ctx


def samplers(model, interp, noise, ctx) -> dict:
    sched = FlowSchedule(shift=5.0)
    gen = lambda: torch.Generator().manual_seed(2)
    return {
        "full": lambda: sample_student(model, noise, ctx, sched, TIMESTEPS, gen()),
        "vif-contiguous": lambda: sample_vif(model, interp, noise, ctx, sched, TIMESTEPS, gen(), 2, "contiguous"),
        "vif-stride2": lambda: sample_vif(model, interp, noise, ctx, sched, TIMESTEPS, gen(), 2, "stride2"),
        "interpolator": lambda: interp.interpolate(noise[:, :, ::2]),
    }


def forwards(model, noise, ctx) -> dict:
    """One DiT forward at full and at half frame rate: the per-step costs behind the sampler times."""
    t = torch.full((noise.shape[0],), 900.0)
    return {"fwd-full": lambda: model(noise, t, ctx), "fwd-half": lambda: model(noise[:, :, ::2], t, ctx)}


@pytest.mark.parametrize("case", ["full", "vif-contiguous", "vif-stride2", "interpolator"])
def test_vif(benchmark, case):
    fns = samplers(*build("small"))
    benchmark.group = "vif-small"
    with torch.no_grad():
        benchmark(fns[case])


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call, measured round-robin (A B C A B C ...) so drifting machine load hits every case alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(median_time(fn, repeats=1, warmup=0))
    return times


def measure(name: str, rounds: int) -> dict:
    model, interp, noise, ctx = build(name)
    c, f, h, w = noise.shape[1:]
    n_full, n_half = model.num_tokens((f, h, w)), model.num_tokens(((f + 1) // 2, h, w))
    fl_full, fl_half = flops(model.cfg, n_full), flops(model.cfg, n_half)
    runs = interleaved({**samplers(model, interp, noise, ctx), **forwards(model, noise, ctx)}, rounds)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}  # least disturbed by other processes on a shared machine
    return {
        "suite": "vif",
        "config": name,
        "latent": [c, f, h, w],
        "tokens_full": n_full,
        "tokens_half": n_half,
        "attention_share_flops": fl_full["attention"] / fl_full["total"],
        "ideal_speedup_flops": 4 * fl_full["total"] / (2 * fl_half["total"] + 2 * fl_full["total"]),
        "half_over_full_forward_flops": fl_half["total"] / fl_full["total"],
        **{f"t_{k.replace('-', '_')}_s": v for k, v in med.items()},
        **{f"t_{k.replace('-', '_')}_min_s": v for k, v in best.items()},
        "speedup_contiguous": med["full"] / med["vif-contiguous"],
        "speedup_stride2": med["full"] / med["vif-stride2"],
        "speedup_contiguous_min": best["full"] / best["vif-contiguous"],
        "speedup_stride2_min": best["full"] / best["vif-stride2"],
        "half_over_full_forward": med["fwd-half"] / med["fwd-full"],
        # the sampler speed-up composed from the shortest single-call times (2 half + 2 full steps + interpolation)
        "speedup_composed_min": 4
        * best["fwd-full"]
        / (2 * best["fwd-half"] + 2 * best["fwd-full"] + best["interpolator"]),
        "interpolator_share_of_vif": med["interpolator"] / med["vif-contiguous"],
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "loadavg_1m_after": os.getloadavg()[0],  # other processes on a shared machine distort the times
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="attn")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    row = measure(args.config, args.rounds)
    print(
        f"config {row['config']}: latent {row['latent']}, tokens {row['tokens_full']} full / {row['tokens_half']} "
        f"half-rate, attention {100 * row['attention_share_flops']:.0f}% of FLOPs, {row['threads']} threads"
    )
    print(f"{'sampler':22} {'median s':>9} {'speed-up':>9} {'min s':>8} {'speed-up':>9}")
    for label, key in (
        ("full-rate 4-step", "full"),
        ("VIF 4-step contiguous", "vif_contiguous"),
        ("VIF 4-step stride2", "vif_stride2"),
    ):
        t, t_min = row[f"t_{key}_s"], row[f"t_{key}_min_s"]
        print(f"{label:22} {t:9.3f} {row['t_full_s'] / t:9.2f} {t_min:8.3f} {row['t_full_min_s'] / t_min:9.2f}")
    print(
        f"one forward: full {row['t_fwd_full_s']:.3f} s, half-rate {row['t_fwd_half_s']:.3f} s = "
        f"{row['half_over_full_forward']:.3f} of full (FLOP model {row['half_over_full_forward_flops']:.3f})"
    )
    print(f"speed-up composed from the fastest single calls: {row['speedup_composed_min']:.2f}")
    print(f"FLOP-model ideal speed-up {row['ideal_speedup_flops']:.2f} (paper, 1.3B on GPU: 10.8 s -> 7.8 s = 1.38)")
    print(
        f"interpolator {row['t_interpolator_s'] * 1e3:.1f} ms = {100 * row['interpolator_share_of_vif']:.1f}% "
        f"of VIF time"
    )
    print(f"rows appended to {write_rows('vif', [row])}")


if __name__ == "__main__":
    main()
