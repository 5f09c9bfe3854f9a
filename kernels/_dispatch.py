"""Which implementation a public kernel function runs, and how its Triton launches are configured.

Every op in `kernels/` has a pure-torch reference and a Triton path. `use_triton(*tensors)` picks one:

- ``VIDISTILL_KERNELS=auto`` (default): Triton when every tensor is on CUDA, the reference otherwise.
- ``VIDISTILL_KERNELS=triton``: always Triton. On CPU tensors this only works under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported); that is how the tests run the kernels without a GPU.
- ``VIDISTILL_KERNELS=reference``: always the pure-torch reference (debugging, numerical bisection).

Launch configuration: block sizes follow from the shapes (fixed, no search). On a GPU the number of warps is
autotuned per shape; in the interpreter `@triton.autotune` fails (it needs a driver: docs/architecture.md#triton), so a
fixed `num_warps` is used there.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

ENV_VAR = "VIDISTILL_KERNELS"
_MODES = ("auto", "triton", "reference")
# Memory-bound row kernels: the useful range of warps per program; the autotuner picks per shape on the GPU.
_WARP_CONFIGS = tuple(triton.Config({}, num_warps=w) for w in (2, 4, 8, 16))


def kernel_mode() -> str:
    """The forced mode from the environment: 'auto', 'triton' or 'reference'."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {_MODES}")
    return mode


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the public function should take the Triton path for these input tensors."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported (tests/conftest.py does this), or move the tensors to CUDA."
        )
    return True


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; a small stand-in under the interpreter (programs run serially)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def split_rows(n_rows: int, block_r: int, n_batches: int, device: torch.device) -> tuple[int, int]:
    """(programs per batch, rows per program) for backward kernels that reduce over rows into partial sums.

    About 4 programs per SM in total: enough to fill the GPU, few enough that the partial-sum buffer
    (programs x D fp32) and its final torch.sum stay negligible next to the activations.
    """
    n_tiles = triton.cdiv(n_rows, block_r)
    per_batch = max(1, min(n_tiles, triton.cdiv(4 * sm_count(device), n_batches)))
    tiles_per_program = triton.cdiv(n_tiles, per_batch)
    return triton.cdiv(n_tiles, tiles_per_program), tiles_per_program * block_r


def row_block(n_cols: int, max_elems: int = 4096) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for a 2-D tile that holds whole rows of n_cols: several short rows or one long one."""
    block_d = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, max_elems // block_d))
    return block_r, block_d


# Fp32 elements of a program's largest tile per thread that a config may hold: fewer warps spill registers on sm_90
# (ptxas -v through kernels/aot.py, benchmarks/kernels/sm90_resources.md), so the autotuner never tries them.
MAX_TILE_PER_THREAD = 64


def _tile_elems(constexprs: dict, tile: tuple) -> int:
    elems = 1
    for factor in tile:  # constexpr names, and integers for tiles that hold several such tensors (x and dy, ...)
        elems *= factor if isinstance(factor, int) else int(constexprs[factor])
    return elems


def tune_configs(constexprs: dict, tile: tuple = (), max_warps: int = 16) -> list:
    """The autotune configs worth timing for a launch whose register tile is the product of `tile` (constexpr names
    and integer factors; or several such tiles, as a tuple of tuples, of which the largest counts):
    those whose threads hold at most MAX_TILE_PER_THREAD of its elements each (the widest config if none does),
    and at most `max_warps` warps (more threads cap each one's registers: 128 per thread at 16 warps)."""
    tiles = tile if tile and isinstance(tile[0], tuple) else (tile,)
    elems = max(_tile_elems(constexprs, t) for t in tiles)
    allowed = [c for c in _WARP_CONFIGS if c.num_warps <= max_warps]
    fit = [c for c in allowed if c.num_warps * 32 * MAX_TILE_PER_THREAD >= elems]
    return fit or [allowed[-1]]


@functools.cache
def _autotuned(kernel, key: tuple[str, ...], tile: tuple, max_warps: int):
    def prune(configs, named_args, **kwargs):
        keep = {c.num_warps for c in tune_configs(kwargs, tile, max_warps)}
        return [c for c in configs if c.num_warps in keep]

    prune_by = {"early_config_prune": prune} if tile or max_warps < 16 else None
    return triton.autotune(configs=list(_WARP_CONFIGS), key=list(key), prune_configs_by=prune_by)(kernel)


def launch(
    kernel, grid, args: tuple, constexprs: dict, tune_key: tuple[str, ...], tile: tuple = (), max_warps: int = 16
) -> None:
    """Launch `kernel[grid](*args, **constexprs)`: num_warps autotuned on the GPU (keyed on `tune_key` arguments and
    the dtypes), fixed under the interpreter, which ignores warps anyway.

    tile: the constexprs whose product is the program's largest register tile; configs with too few threads for it
    are pruned before timing (tune_configs), and so are configs of more than `max_warps` warps.
    Only num_warps is tuned, so the grid and every buffer size stay independent of the chosen config, and kernels
    that write partial sums may be re-run by the tuner safely (they overwrite, never accumulate).
    """
    if interpreting():
        kernel[grid](*args, **constexprs, num_warps=4)
    else:
        _autotuned(kernel, tuple(tune_key), tuple(tile), max_warps)[grid](*args, **constexprs)
