"""Our Wan DiT vs diffusers' WanTransformer3DModel at the same weights: forward and forward+backward.

    python benchmarks/test_bench_dit.py     # side-by-side table with ratios, rows to benchmarks/results/dit.jsonl
    pytest benchmarks/test_bench_dit.py --benchmark-only   # the same cases under pytest-benchmark

Configs: tiny (unit-test size) and medium (dim 512, 4 layers, 3 latent frames of 30x52 = 1170 tokens). On CPU this
measures framework overhead and the attention/linear mix; GPU numbers need CUDA (same script, bf16).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import median_time, write_rows  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.models.checkpoint import diffusers_config, official_to_diffusers  # noqa: E402
from engine.models.wan import WanModel  # noqa: E402

CONFIGS = {
    "tiny": (dict(dim=24, num_heads=2, ffn_dim=32, num_layers=2, in_dim=4, out_dim=4, text_dim=16),
             (2, 4, 3, 16, 16), 12),
    "medium": (dict(dim=512, num_heads=4, ffn_dim=2048, num_layers=4, in_dim=16, out_dim=16, text_dim=512),
               (1, 16, 3, 30, 52), 64),
}  # fmt: skip


def build(name: str):
    """Both models with identical weights, plus inputs."""
    arch, shape, ctx_len = CONFIGS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = ModelConfig(**arch, gradient_checkpointing=False)
    torch.manual_seed(0)
    ours = WanModel(cfg)
    theirs = WanTransformer3DModel(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})
    theirs.load_state_dict({official_to_diffusers(k): v for k, v in ours.state_dict().items()})
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(device, dtype)
    t = torch.full((shape[0],), 500.0, device=device)
    ctx = torch.randn(shape[0], ctx_len, cfg.text_dim, generator=g).to(device, dtype)
    return ours, theirs, (x, t, ctx)


def forward(model, inputs, ours: bool):
    with torch.no_grad():
        return model(*inputs) if ours else model(*inputs, return_dict=False)[0]


def forward_backward(model, inputs, ours: bool):
    out = model(*inputs) if ours else model(*inputs, return_dict=False)[0]
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ["ours", "diffusers"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_dit(benchmark, config, impl, mode):
    ours, theirs, inputs = build(config)
    fn = forward if mode == "forward" else forward_backward
    model = ours if impl == "ours" else theirs
    benchmark.group = f"dit-{config}-{mode}"
    benchmark(fn, model, inputs, impl == "ours")


def _time_pair(fn, ours, theirs, inputs) -> tuple[float, float]:
    t_ours = median_time(lambda: fn(ours, inputs, True), repeats=7, warmup=2)
    t_ref = median_time(lambda: fn(theirs, inputs, False), repeats=7, warmup=2)
    return t_ours, t_ref


def main() -> None:
    rows = []
    print(f"{'config':8} {'mode':17} {'ours ms':>9} {'diffusers ms':>13} {'speed-up':>9}")
    for config in CONFIGS:
        ours, theirs, inputs = build(config)
        for mode, fn in (("forward", forward), ("forward_backward", forward_backward)):
            t_ours, t_ref = _time_pair(fn, ours, theirs, inputs)
            rows.append(dict(config=config, mode=mode, ours_s=t_ours, diffusers_s=t_ref, speedup=t_ref / t_ours))
            print(f"{config:8} {mode:17} {t_ours * 1e3:9.2f} {t_ref * 1e3:13.2f} {t_ref / t_ours:8.2f}x")
    print("written to", write_rows("dit", rows))


if __name__ == "__main__":
    main()
