"""Ahead-of-time compilation of the Triton kernels for a GPU that is not there (sm_90 by default).

Triton compiles for whatever target its active driver reports. ``stand_in_driver()`` swaps in a driver that reports
``GPUTarget("cuda", 90, 32)`` and launches nothing, so ``kernel.warmup(...)`` runs the whole pipeline, TTIR -> TTGIR
-> LLIR -> PTX -> cubin, with the ptxas bundled in the triton wheel, on a machine without a GPU or CUDA driver.
``compile_kernel`` returns what matters for a launch: registers and spills per thread (the ptxas -v report), shared
memory per block (the compiled metadata) and whether the PTX uses Hopper's wgmma.

``record_launches()`` runs the project's own launchers (``_forward``/``_backward`` of each kernels/ module) on meta
tensors and records every launch instead of running it, so the block sizes, grids and argument dtypes compiled here are
the ones the engine uses; ``candidate_configs`` lists the autotune configs the dispatch can pick for a launch.

Needs real ``JITFunction``s: under ``TRITON_INTERPRET=1`` ``@triton.jit`` builds interpreter functions instead, so the
test suite runs this in a subprocess with the variable unset (tests/kernels/aot_sm90_worker.py). The process's JIT
caches then hold sm_90 binaries for device 0: do not launch on a real GPU in the same process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

SM90 = GPUTarget("cuda", 90, 32)
SM90_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one block may opt into on sm_90 (H100, H200)


class StandInDriver(DriverBase):
    """A Triton driver for a device that is not present: reports `target`, refuses to launch or benchmark."""

    def __init__(self, target: GPUTarget = SM90):
        super().__init__()
        self.target = target

    @classmethod
    def is_active(cls) -> bool:
        return False  # never chosen as the default driver

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")  # where record_launches allocates: shapes, strides and dtypes, no memory

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver compiles only: there is no GPU to benchmark on")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("the stand-in driver compiles only: there is no GPU to benchmark on")


@contextlib.contextmanager
def stand_in_driver(target: GPUTarget = SM90):
    """Make Triton compile for `target` inside the block; the previous active driver is restored afterwards.

    (`driver.reset_active()` would build the default driver, which raises on a machine without a GPU, so the previous
    value, possibly None = "not created yet", is put back as it was.)
    """
    previous = driver._active
    driver.set_active(StandInDriver(target))
    try:
        yield
    finally:
        driver.set_active(previous)


# ------------------------------------------------------------------------------------------------ compilation ---
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RESULTS: dict[tuple, dict] = {}  # compiled kernel hash -> resources (warmup returns cached kernels silently)


def _ptxas_report(ptx: str, arch: str) -> str:
    """ptxas -v on `ptx` with the flags Triton's nvidia backend uses; the report (stderr) as text."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(SM90.arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src]
        done = subprocess.run(cmd + ["-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    return done.stderr


def _parse_ptxas(report: str, name: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of entry `name` in a ptxas -v report."""
    part = report.split(f"Compiling entry function '{name}'", 1)[-1]
    regs = _PTXAS_REGS.search(part)
    spills = _PTXAS_SPILLS.search(part)
    if regs is None or spills is None:
        raise RuntimeError(f"no register/spill line for {name} in the ptxas report:\n{report[-2000:]}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_kernel(
    fn,
    args: tuple,
    constexprs: dict,
    num_warps: int,
    num_stages: int = 3,
    target: GPUTarget = SM90,
) -> dict:
    """Compile `fn` (a JITFunction) for `target` with these arguments (meta or other tensors stand for pointers:
    only their dtype and alignment matter) and return its resources:

    name, ok, error (the compiler's message when ok is False), registers (per thread), spills (spill store bytes per
    thread; loads in spill_loads), shared (bytes per block), wgmma (Hopper warpgroup MMA in the PTX).
    """
    name = getattr(fn, "__name__", repr(fn))
    out = {"name": name, "num_warps": num_warps, "num_stages": num_stages, "ok": False, "error": None}
    log = io.StringIO()
    try:
        with stand_in_driver(target), contextlib.redirect_stdout(log):
            knob = triton.knobs.nvidia.dump_ptxas_log
            triton.knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v and prints its report here
            try:
                kernel = fn.warmup(*args, grid=(1,), num_warps=num_warps, num_stages=num_stages, **constexprs)
            finally:
                triton.knobs.nvidia.dump_ptxas_log = knob
    except Exception as e:  # noqa: BLE001 - the message is the result
        message = f"{type(e).__name__}: {e}"
        out["error"] = message if len(message) <= 3000 else message[:1000] + "\n[...]\n" + message[-2000:]
        return out
    key = (kernel.hash, target.arch)
    if key not in _RESULTS:
        entry = kernel.metadata.name
        report = log.getvalue()
        if f"'{entry}'" not in report:  # served from Triton's cache: ptxas did not run, run it on the cached PTX
            report = _ptxas_report(
                kernel.asm["ptx"], f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
            )
        regs, spill_stores, spill_loads = _parse_ptxas(report, entry)
        _RESULTS[key] = {
            "registers": regs,
            "spills": spill_stores,
            "spill_loads": spill_loads,
            "shared": int(kernel.metadata.shared),
            "wgmma": "wgmma" in kernel.asm["ptx"],
        }
    out.update(_RESULTS[key], ok=True)
    return out


# ------------------------------------------------------------------------------------------- launch recording ---
@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher would issue it. tune_key None: launched directly with fixed `options`."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    tune_key: tuple | None
    options: dict
    tile: tuple = ()
    max_warps: int = 16


class _Recorder:
    """Stands in for a JITFunction in a module's globals: `proxy[grid](*args, **kw)` records the launch."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            self.log.append(Launch(self.kernel, tuple(grid), args, kwargs, None, options))

        return record


@contextlib.contextmanager
def record_launches():
    """Inside the block, kernels/ launchers record their launches into the yielded list instead of running them.

    Call the launchers (e.g. ``kernels.adaln._forward``) on meta tensors: they allocate outputs with torch ops (meta
    tensors carry shapes, strides and dtypes) and derive block sizes and grids exactly as on a GPU.
    """
    from kernels import _dispatch

    log: list[Launch] = []

    def record(kernel, grid, args, constexprs, tune_key, tile=(), max_warps=16):
        kernel = kernel.kernel if isinstance(kernel, _Recorder) else kernel
        log.append(Launch(kernel, tuple(grid), args, dict(constexprs), tuple(tune_key), {}, tuple(tile), max_warps))

    patched, real_launch = [], _dispatch.launch
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "kernels" or mod_name.startswith("kernels.")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is real_launch:
                patched.append((mod, attr, value))
                setattr(mod, attr, record)
            elif isinstance(value, triton.runtime.jit.JITFunction):
                patched.append((mod, attr, value))
                setattr(mod, attr, _Recorder(value, log))
    sm_count = _dispatch.sm_count
    _dispatch.sm_count = lambda device: 132  # H100 / H200 SXM: the backward kernels' programs per batch follow it
    try:
        yield log
    finally:
        _dispatch.sm_count = sm_count
        for mod, attr, value in patched:
            setattr(mod, attr, value)


def candidate_configs(launch: Launch) -> list[dict]:
    """The launch options the dispatch can run `launch` with: the autotune configs left after pruning, or the fixed
    options of a direct launch (Triton's default of 4 warps when none are given)."""
    from kernels import _dispatch

    if launch.tune_key is None:
        return [{"num_warps": launch.options.get("num_warps", 4), "num_stages": launch.options.get("num_stages", 3)}]
    configs = _dispatch.tune_configs(launch.constexprs, launch.tile, launch.max_warps)
    return [{"num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def all_configs(launch: Launch) -> list[dict]:
    """Every autotune config of the dispatch before pruning (for the resource table's "before" column)."""
    from kernels import _dispatch

    if launch.tune_key is None:
        return candidate_configs(launch)
    return [{"num_warps": c.num_warps, "num_stages": c.num_stages} for c in _dispatch._WARP_CONFIGS]
