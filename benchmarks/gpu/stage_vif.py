"""GPU check, stage "vif": full-rate 4-step sampling against VIF 4-step sampling (steps 1-2 at half frame rate, then
the interpolation U-Net, engine.diffusion.vif) with the Wan2.1-1.3B student shape: random weights, ``--layers``
blocks (30 = the real model, fewer when the budget is short), bf16, one 81x480x832 video (32,760 tokens; 11 latent
frames = 17,160 tokens at half rate), the interpolator at the paper's widths (configs/interp-wan.yaml).

The samplers run round-robin (full, VIF contiguous, VIF stride-2, ...) so that drift hits every case alike; next to
the measured speed-ups is the FLOP model's (benchmarks/test_bench_vif.py), and the paper's figure for the 1.3B model
on a GPU (10.8 s -> 7.8 s, 1.38x).
"""

from __future__ import annotations

import dataclasses

import torch
from common import LATENT, TEXT_LEN, Stage, median, stage_args, timed
from test_bench_vif import TIMESTEPS, flops

from engine.config import model_preset
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import sample_student
from engine.diffusion.vif import sample_vif
from engine.models.interp_unet import InterpUNet
from engine.models.wan import WanModel

PAPER_WIDTHS = (128, 256, 512)


def build(cfg, latent, text_len, widths, device, dtype):
    torch.manual_seed(0)
    with device:  # initialized where it runs: a 1.3B model's random init on the CPU takes longer than sampling
        model = WanModel(cfg)
    model = model.to(device, dtype).eval().requires_grad_(False)
    interp = InterpUNet(latent[0], widths)
    torch.nn.init.normal_(interp.out.weight, std=0.02)  # not the zero-initialized output of an untrained one
    interp = interp.to(device, dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, *latent, generator=g).to(device, dtype)
    ctx = torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype)
    return model, interp, noise, ctx


def samplers(model, interp, noise, ctx) -> dict:
    sched = FlowSchedule(shift=5.0)

    def gen():
        return torch.Generator(device=noise.device).manual_seed(2)

    return {
        "full": lambda: sample_student(model, noise, ctx, sched, TIMESTEPS, gen()),
        "vif_contiguous": lambda: sample_vif(model, interp, noise, ctx, sched, TIMESTEPS, gen(), 2, "contiguous"),
        "vif_stride2": lambda: sample_vif(model, interp, noise, ctx, sched, TIMESTEPS, gen(), 2, "stride2"),
        "interpolator": lambda: interp.interpolate(noise[:, :, ::2]),
    }


def main() -> None:
    args = stage_args(__doc__.split("\n\n")[0], lambda p: p.add_argument("--layers", type=int, default=30))
    with Stage("vif", args) as st:
        if args.dry_run:
            cfg, latent, text_len, widths = model_preset("tiny", in_dim=4, out_dim=4), (4, 5, 8, 8), 6, (8, 16, 32)
        else:
            cfg, latent, text_len, widths = (
                model_preset("wan2.1-1.3b", num_layers=args.layers),
                LATENT,
                TEXT_LEN,
                PAPER_WIDTHS,
            )
        cfg = dataclasses.replace(cfg, gradient_checkpointing=False)
        with torch.no_grad():
            # probe with 2 blocks: a full-rate sample's time per block sizes the depth to the budget
            fns = samplers(
                *build(dataclasses.replace(cfg, num_layers=2), latent, text_len, widths, st.device, st.dtype)
            )
            per_block = median(timed(fns["full"], repeats=1, warmup=1)) / 2
            # 1 warm-up + 3 rounds of (full + 2 VIF ~ 0.75 full each) = 10 full samples; 15 s for building
            layers = (
                cfg.num_layers
                if args.dry_run
                else max(2, min(cfg.num_layers, int((st.left() - 15) / (10 * per_block))))
            )
            st.note(f"probe: {per_block * 1e3:.0f} ms per block per full-rate sample; sampling with {layers} blocks")
            cfg = dataclasses.replace(cfg, num_layers=layers)
            model, interp, noise, ctx = build(cfg, latent, text_len, widths, st.device, st.dtype)
            fns = samplers(model, interp, noise, ctx)
            outs = {k: fns[k]() for k in ("full", "vif_contiguous", "vif_stride2")}  # warm-up, and the shapes
            if any(o.shape != noise.shape or not torch.isfinite(o).all() for o in outs.values()):
                raise RuntimeError(
                    f"sampler outputs { ({k: tuple(o.shape) for k, o in outs.items()}) } vs {tuple(noise.shape)}"
                )
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(1 if args.dry_run else 3):
                for k, fn in fns.items():
                    times[k] += timed(fn, repeats=1, warmup=0)
        med = {k: median(v) for k, v in times.items()}
        c, f, h, w = latent
        n_full, n_half = model.num_tokens((f, h, w)), model.num_tokens(((f + 1) // 2, h, w))
        fl_full, fl_half = flops(cfg, n_full, text_len), flops(cfg, n_half, text_len)
        st.set(
            blocks=layers, tokens_full=n_full, tokens_half=n_half, interp_widths=list(widths),
            **{f"{k}_s": v for k, v in med.items()},
            speedup_contiguous=med["full"] / med["vif_contiguous"], speedup_stride2=med["full"] / med["vif_stride2"],
            ideal_speedup_flops=4 * fl_full["total"] / (2 * fl_half["total"] + 2 * fl_full["total"]),
            interpolator_share_of_vif=med["interpolator"] / med["vif_contiguous"], paper_speedup_1_3b=10.8 / 7.8,
            times=times,
        )  # fmt: skip
        r = st.record
        speedups = f"{r['speedup_contiguous']:.2f}x; FLOP model {r['ideal_speedup_flops']:.2f}x, paper 1.38x"
        print(f"{layers} blocks: full {med['full']:.3f} s, VIF {med['vif_contiguous']:.3f} s ({speedups})", flush=True)


if __name__ == "__main__":
    main()
