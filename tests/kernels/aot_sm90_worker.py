"""Compile the kernels for sm_90 at the engine's shapes, without a GPU (kernels/aot.py); print one JSON row per compile.

Run as a script, with TRITON_INTERPRET unset (the interpreter replaces @triton.jit; tests/kernels/test_aot_sm90.py
starts this in a subprocess for that reason):

    python tests/kernels/aot_sm90_worker.py [--matrix default|full] [--all-configs] [--only CASE ...] [--json OUT]

Each case runs the project's own launcher (the `_forward` / `_backward` of a kernels/ module, or the U-Net walk of
engine.models.interp_unet.fused_interpolate) on meta tensors, records its launches and compiles each one for every
config the dispatch can pick (--all-configs: every autotune config, before pruning). The default matrix compiles one
launch per module (DEFAULT_PICK) at the fewest warps the dispatch allows; full: every launch and config. Row
fields: case, kernel, dtype, shape, constexprs, num_warps, chosen (the dispatch can pick this config), ok, error,
registers, spills, spill_loads, shared, wgmma, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_sm90_worker.py needs real @triton.jit functions: run it with TRITON_INTERPRET unset")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from kernels import adaln, aot, gated_residual, interp_unet, qk_norm_rope, temporal_variance  # noqa: E402

META = torch.device("meta")
TOKENS = 32760  # 21 latent frames x 30 x 52 patches: Wan2.1 at 81 x 480 x 832
HEAD_DIM = 128
DIMS = (1536, 5120)  # Wan2.1 1.3B and 14B
LATENT = (16, 60, 104)  # channels, height, width of a 480 x 832 latent
INTERP_WIDTHS = (
    (64, 128, 256),
    (128, 256, 512),
)  # the default and configs/interp-wan.yaml's (the widest one tile holds)
# The default matrix's launch per module: the one with the most register pressure (or the known defect's).
DEFAULT_PICK = {
    "adaln": "_adaln_bwd_kernel",
    "gated_residual": "_gated_bwd_kernel",
    "qk_norm_rope": "_norm_rope_bwd_kernel",
    "temporal_variance": "_backward_kernel",
    "interp_unet": "_conv_norm_act_kernel",  # the first one recorded with POOL is picked below
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _t(*shape, dtype=torch.float32):
    return torch.empty(shape, device=META, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ cases ---
def _adaln(batch, dim, dtype):
    x = _t(batch, TOKENS, dim, dtype=dtype)
    mod = _t(batch, 6, dim)  # the (B, 6, D) fp32 modulation, chunked: shift and scale keep its batch stride
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    _, mean, rstd = adaln._forward(x, shift, scale, 1e-6)
    adaln._backward(x, x, scale, mean, rstd)


def _gated(batch, dim, dtype, y_dtype):
    x, y = _t(batch, TOKENS, dim, dtype=dtype), _t(batch, TOKENS, dim, dtype=y_dtype)
    gate = _t(batch, 6, dim)[:, 2:3]
    gated_residual._forward(x, y, gate)
    gated_residual._backward(x, y, gate)


def _qk(batch, dim, dtype):
    x = _t(batch, TOKENS, dim, dtype=dtype)
    w = _t(dim, dtype=dtype)
    cos = sin = _t(TOKENS, HEAD_DIM // 2)
    _, rstd = qk_norm_rope._forward_one(x, w, cos, sin, 1e-6)
    qk_norm_rope._backward_one(x, x, w, cos, sin, rstd)


def _temporal(batch, frames, dtype):
    c, h, w = LATENT
    x = _t(batch, c, frames, h, w, dtype=dtype)
    temporal_variance._forward(x, 1e-6, 1.0, 0.0)
    scalar = _t()
    temporal_variance._backward(scalar, x, scalar, scalar, 1e-6, 1.0)


def _interp(batch, widths, dtype):
    from engine.models import interp_unet as model_mod

    c, h, w = LATENT
    model = model_mod.InterpUNet(c, widths).to(device=META, dtype=dtype)
    latents = _t(batch, c, 21, h, w, dtype=dtype)[:, :, ::2]  # 11 frames, a strided view as generation passes it
    patches = {
        "use_triton": lambda *t: True,
        "pair_conv_norm_act": lambda lat, *p: interp_unet._conv_forward(lat, *p, None, False, pairs_of=lat.shape[2]),
        "conv_norm_act": lambda x, *p, skip=None, pool=False: interp_unet._conv_forward(x, *p, skip, pool),
        "interp_head": interp_unet._head_forward,
    }
    saved = {k: getattr(model_mod, k) for k in patches}
    try:
        for k, v in patches.items():
            setattr(model_mod, k, v)
        with torch.no_grad():
            model_mod.fused_interpolate(model, latents)
    finally:
        for k, v in saved.items():
            setattr(model_mod, k, v)


def cases(matrix: str) -> list[tuple[str, str, str, object]]:
    """(case, dtype name, shape, thunk). default: one representative per kernel module (the largest shapes)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if matrix == "default":
        return [
            ("adaln", "bf16", f"B=1 N={TOKENS} D=5120", lambda: _adaln(1, 5120, bf16)),
            ("gated_residual", "bf16", f"B=1 N={TOKENS} D=5120", lambda: _gated(1, 5120, bf16, bf16)),
            ("qk_norm_rope", "bf16", f"B=1 N={TOKENS} D=5120 Dh={HEAD_DIM}", lambda: _qk(1, 5120, bf16)),
            ("temporal_variance", "bf16", "B=1 C=16 F=41 60x104", lambda: _temporal(1, 41, bf16)),
            ("interp_unet", "bf16", "B=1 C=16 F=11 (::2 of 21) 60x104 widths=128/256/512",
             lambda: _interp(1, (128, 256, 512), bf16)),
        ]  # fmt: skip
    out = []
    for batch in (1, 2):  # the convolutions first: the slowest to compile and the most likely to fail
        for widths in INTERP_WIDTHS[::-1]:
            for dt in (bf16, fp32):
                shape = f"B={batch} C=16 F=11 (::2 of 21) 60x104 widths={'/'.join(map(str, widths))}"
                out.append(("interp_unet", DTYPE_NAMES[dt], shape, lambda b=batch, w=widths, t=dt: _interp(b, w, t)))
        for dim in DIMS[::-1]:
            shape = f"B={batch} N={TOKENS} D={dim}"
            for dt in (bf16, fp32):
                name = DTYPE_NAMES[dt]
                out.append(("adaln", name, shape, lambda b=batch, d=dim, t=dt: _adaln(b, d, t)))
                out.append(("qk_norm_rope", name, shape + f" Dh={HEAD_DIM}", lambda b=batch, d=dim, t=dt: _qk(b, d, t)))
            for dt, yt in ((bf16, bf16), (fp32, bf16), (fp32, fp32)):
                name = DTYPE_NAMES[dt] if dt == yt else f"{DTYPE_NAMES[dt]}+{DTYPE_NAMES[yt]}"
                out.append(("gated_residual", name, shape, lambda b=batch, d=dim, t=dt, u=yt: _gated(b, d, t, u)))
        for frames in (21, 41):
            for dt in (bf16, fp32):
                shape = f"B={batch} C=16 F={frames} 60x104"
                out.append(
                    ("temporal_variance", DTYPE_NAMES[dt], shape, lambda b=batch, f=frames, t=dt: _temporal(b, f, t))
                )
    return out  # fmt: skip


def _launch_label(launch: aot.Launch) -> dict:
    consts = {k: (v if isinstance(v, (int, bool, str, float)) else str(v)) for k, v in launch.constexprs.items()}
    return {"kernel": launch.kernel.__name__, "constexprs": consts}


def run(matrix: str, every_config: bool, only: tuple[str, ...] = ()):
    seen = set()
    for case, dtype, shape, thunk in cases(matrix):
        if only and case not in only:
            continue
        with aot.record_launches() as launches:
            try:
                thunk()
            except Exception as e:  # noqa: BLE001 - a launcher that fails on these shapes is a finding
                error = f"{type(e).__name__}: {e}"[:3000]
                yield {"case": case, "dtype": dtype, "shape": shape, "kernel": "(launcher)", "ok": False,
                       "error": error, "constexprs": {}, "num_warps": None, "chosen": True}  # fmt: skip
                continue
        if matrix == "default":  # one representative: the heaviest launch of the module, at its fewest warps
            pick = [la for la in launches if la.kernel.__name__ == DEFAULT_PICK[case]]
            launches = [next((la for la in pick if la.constexprs.get("POOL")), pick[0])]
        for launch in launches:
            chosen = {c["num_warps"] for c in aot.candidate_configs(launch)}
            configs = aot.all_configs(launch) if every_config else aot.candidate_configs(launch)
            if matrix == "default" and not every_config:
                configs = configs[:1]
            for config in configs:
                label = _launch_label(launch)
                sig = tuple(
                    f"{a.dtype}{tuple(a.stride()) if a.dim() else ''}" if isinstance(a, torch.Tensor) else type(a)
                    for a in launch.args
                )  # fmt: skip
                key = (case, dtype, label["kernel"], json.dumps(label["constexprs"]), sig, config["num_warps"])
                if key in seen and matrix == "default":
                    continue
                seen.add(key)
                start = time.perf_counter()
                res = aot.compile_kernel(launch.kernel, launch.args, launch.constexprs, **config)
                yield {"case": case, "dtype": dtype, "shape": shape, **label, "chosen": config["num_warps"] in chosen,
                       **res, "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--matrix", choices=("default", "full"), default="default")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the unpruned ones")
    parser.add_argument("--only", nargs="+", default=(), help="these cases (kernel modules) only, e.g. interp_unet")
    parser.add_argument("--json", type=Path, help="write the rows here (JSON list) instead of one per line to stdout")
    args = parser.parse_args(argv)
    rows = []
    for row in run(args.matrix, args.all_configs, tuple(args.only)):
        rows.append(row)
        if args.json is None:
            print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
