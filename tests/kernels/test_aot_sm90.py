"""The kernels compile for sm_90 (H100 / H200) on this GPU-less machine, at the engine's shapes and launch parameters.

kernels/aot.py swaps Triton's driver for a stand-in reporting GPUTarget("cuda", 90, 32), so kernel.warmup runs the
real pipeline down to a cubin with the wheel's ptxas; the interpreter (which the rest of the suite uses) would hide
type errors such as a bf16 pooled load promoted to fp32 by tl.maximum. It needs real @triton.jit functions, so the
compiles run in a subprocess with TRITON_INTERPRET unset (aot_sm90_worker.py).

Asserted for every launch and config the dispatch can pick: it compiles, its shared memory fits one sm_90 block
(227 KB), and it does not spill registers (SPILL_TOLERANCE = 0 bytes per thread). The default run compiles one
representative per kernel module; the full matrix (every launch, dtype, shape and config) is marked slow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("aot_sm90_worker.py")
SHARED_LIMIT = 227 * 1024
SPILL_TOLERANCE = 0  # bytes of spill stores per thread: none at a config the dispatch can pick


def _compile(matrix: str, tmp_path: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(WORKER), "--matrix", matrix, "--json", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, f"worker failed:\n{done.stderr[-4000:]}"
    return json.loads(out.read_text())


def _label(row: dict) -> str:
    consts = {k: v for k, v in row["constexprs"].items()}
    return f"{row['kernel']} [{row['case']} {row['dtype']} {row['shape']}] {consts} num_warps={row['num_warps']}"


def _check(rows: list[dict]) -> None:
    assert rows, "no launch was recorded"
    failed = [f"{_label(r)}:\n{r['error']}" for r in rows if not r["ok"]]
    assert not failed, "does not compile for sm_90:\n\n" + "\n\n".join(failed)
    big = [f"{_label(r)}: {r['shared']} B" for r in rows if r["shared"] > SHARED_LIMIT]
    assert not big, f"shared memory over {SHARED_LIMIT} B per block:\n" + "\n".join(big)
    spills = [f"{_label(r)}: {r['spills']} B" for r in rows if r["chosen"] and r["spills"] > SPILL_TOLERANCE]
    assert not spills, "spills at a config the dispatch can pick:\n" + "\n".join(spills)


def test_one_launch_per_kernel_compiles_for_sm90(tmp_path):
    rows = _compile("default", tmp_path)
    assert {r["case"] for r in rows} == {"adaln", "gated_residual", "qk_norm_rope", "temporal_variance", "interp_unet"}
    pooled = [r for r in rows if r["case"] == "interp_unet"]
    assert pooled and pooled[0]["constexprs"]["POOL"] and pooled[0]["dtype"] == "bf16"  # the bf16 max-pool on load
    assert pooled[0]["wgmma"], "the bf16 implicit GEMM should use Hopper's wgmma"
    _check(rows)


@pytest.mark.slow
def test_every_launch_dtype_shape_and_config_compiles_for_sm90(tmp_path):
    _check(_compile("full", tmp_path))


def test_stand_in_driver_is_restored():
    """The context manager puts the previous driver back (here: none created yet, the interpreter's process)."""
    from triton.runtime.driver import driver

    from kernels.aot import SM90, stand_in_driver

    before = driver._active
    with stand_in_driver():
        assert driver.active.get_current_target() == SM90
    assert driver._active is before


def test_dispatch_prunes_warps_that_spill():
    """2 warps spilled 0.6-10.8 KB per thread at D=5120 and 60-120 KB on the convolutions; never tried now."""
    from kernels._dispatch import tune_configs

    def warps(consts, tile):
        return [c.num_warps for c in tune_configs(consts, tile)]

    assert warps({"BLOCK_R": 1, "BLOCK_D": 8192}, ("BLOCK_R", "BLOCK_D")) == [4, 8, 16]  # D=5120 forward
    assert warps({"BLOCK_R": 1, "BLOCK_D": 8192}, ("BLOCK_R", "BLOCK_D", 2)) == [8, 16]  # D=5120 backward
    assert warps({"BLOCK_M": 64, "BLOCK_N": 256}, ("BLOCK_M", "BLOCK_N")) == [8, 16]  # the convolutions
    assert warps({"BLOCK_R": 1, "BLOCK_D": 1 << 20}, ("BLOCK_R", "BLOCK_D")) == [16]  # nothing fits: the widest


def test_convolution_tiles_and_warps_the_dispatch_allows(monkeypatch):
    """The U-Net's tiles on a GPU: 16-channel chunks (32-channel ones spilled at 8 and 16 warps, bf16 and fp32), half
    the tile for fp32 operands and the input tile for pooled loads; at least 8 warps for a 128 x 16 input tile (4
    spilled 388-464 B) and for fp32 (4 spilled), at most 8 for fp32 (16 spilled the pooled loads)."""
    from kernels import interp_unet as ki
    from kernels._dispatch import tune_configs

    monkeypatch.setattr(ki, "interpreting", lambda: False)  # the GPU's choices, not the interpreter's

    def tiles_and_warps(c_in, c_out, dtype, pool=False):
        consts = {**ki._blocks(c_in, c_out, dtype, pool), "POOL": pool, **ki._dot_mode(dtype)}
        tuning = ki._tuning(consts)
        warps = [c.num_warps for c in tune_configs(consts, tuning["tile"], tuning["max_warps"])]
        return (consts["BLOCK_M"], consts["BLOCK_K"], consts["BLOCK_N"]), warps

    bf16, fp32 = torch.bfloat16, torch.float32
    assert tiles_and_warps(64, 64, bf16) == ((128, 16, 64), [8, 16])
    assert tiles_and_warps(128, 128, bf16) == ((128, 16, 128), [8, 16])
    assert tiles_and_warps(256, 256, bf16) == ((64, 16, 256), [8, 16])
    assert tiles_and_warps(512, 512, bf16) == ((32, 16, 512), [8, 16])
    assert tiles_and_warps(128, 128, fp32) == ((64, 16, 128), [8])
    assert tiles_and_warps(512, 512, fp32) == ((16, 16, 512), [8])
    assert tiles_and_warps(16, 16, bf16) == ((128, 16, 16), [8, 16])  # the input tile, not the accumulators, decides
    assert tiles_and_warps(64, 128, bf16, pool=True) == ((64, 16, 128), [8, 16])  # 128 x 16 pooled spilled 36-60 B
    assert tiles_and_warps(64, 64, fp32) == ((64, 16, 64), [8])
