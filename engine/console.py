"""Console output: the one place that hides known-harmless library noise, and progress that suits its stream.

Every launcher calls :func:`install` at import, before anything imports DeepSpeed (some of its messages print at
import time), and again with ``verbose=args.verbose`` once its arguments are parsed. What it hides, each matched
precisely (category + message + module for warnings, logger + file + message for log records, the exact line for
prints), never a whole library:

* ``FutureWarning: torch.distributed.all_gather_into_tensor / reduce_scatter_tensor is deprecated`` raised inside
  DeepSpeed's ZeRO-3 collectives: several per step and rank (about 1,800 lines in a demo run), nothing we can fix;
* DeepSpeed's ``Setting accelerator to CPU ...`` warning, one per process on a CPU-only machine;
* DeepSpeed's ``DeepSpeed deepspeed.ops.comm.<op> built successfully`` print, one per rank.

``--verbose`` (every launcher) or ``VIDISTILL_VERBOSE=1`` turns the filter off; ``--verbose`` also exports the
variable, so child ranks and worker processes show everything too. Anything not listed above is untouched.

:func:`progress` is a tqdm-compatible bar: tqdm on a terminal; on a log file or CI it prints a plain line every
``every_s`` seconds or every ``every_pct`` percent (``distill 120/600 (20%) 3.10 step/s eta 2m35s``) instead of
carriage-return spam. ``VIDISTILL_PROGRESS=plain`` or ``=tty`` forces either.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

VERBOSE_ENV = "VIDISTILL_VERBOSE"
PROGRESS_ENV = "VIDISTILL_PROGRESS"

log = logging.getLogger("vidistill.console")

# (category, message regex (matched at the start), module regex (the whole name), why it is harmless)
WARNING_NOISE: tuple[tuple[type[Warning], str, str, str], ...] = (
    (
        FutureWarning,
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger",
        "raised inside DeepSpeed ZeRO-3's collectives on every step; not our call to change",
    ),
)

# (logger name, source file name of the call, message regex (matched at the start))
LOG_NOISE: tuple[tuple[str, str, str], ...] = (("DeepSpeed", "real_accelerator.py", r"Setting accelerator to CPU\b"),)

# (module, function, regex of a whole line the function prints): the line goes to the debug log instead
PRINT_NOISE: tuple[tuple[str, str, str], ...] = (
    ("deepspeed.comm.torch", "build_shm_op", r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully"),
    ("deepspeed.comm.ccl", "build_ccl_op", r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully"),
)

_TRUE = {"1", "true", "yes", "on"}


class _State:
    active = False
    warning_filters: list[tuple] = []
    log_filter: Optional[logging.Filter] = None
    finder: Optional[importlib.abc.MetaPathFinder] = None


_state = _State()


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in _TRUE


def is_quiet() -> bool:
    """Whether the noise filter is on in this process."""
    return _state.active


def add_verbose_flag(parser) -> None:
    """The launchers' ``--verbose``: pass ``args.verbose`` to :func:`install`."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show the library warnings and messages hidden by default (also {VERBOSE_ENV}=1)",
    )


def install(verbose: bool = False) -> bool:
    """Hide the known noise (idempotent); with ``verbose`` or ``VIDISTILL_VERBOSE=1`` show everything instead.

    ``verbose=True`` exports ``VIDISTILL_VERBOSE=1`` so that processes started from here inherit it. Returns whether
    the filter is on."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose or verbose_from_env():
        uninstall()
        return False
    _install_warning_filters()
    _install_log_filter()
    _install_print_patches()
    _state.active = True
    return True


def uninstall() -> None:
    """Show everything again (the patched functions stay wrapped but pass their output through)."""
    _state.active = False
    for entry in _state.warning_filters:
        with contextlib.suppress(ValueError):
            warnings.filters.remove(entry)
    _state.warning_filters = []
    mutated = getattr(warnings, "_filters_mutated", None)  # what filterwarnings calls: drop the 'already shown' caches
    if mutated is not None:
        mutated()
    if _state.log_filter is not None:
        for name in {n for n, _, _ in LOG_NOISE}:
            logging.getLogger(name).removeFilter(_state.log_filter)
        _state.log_filter = None


def _install_warning_filters() -> None:
    for category, message, module, _why in WARNING_NOISE:
        # the same tuple warnings.filterwarnings builds (module anchored at both ends, like python -W does)
        entry = ("ignore", re.compile(message, re.I), category, re.compile(module + r"\Z"), 0)
        if not any(_same_filter(entry, f) for f in warnings.filters):
            warnings.filterwarnings("ignore", message=message, category=category, module=module + r"\Z")
            _state.warning_filters.append(warnings.filters[0])


def _same_filter(a: tuple, b: tuple) -> bool:
    def key(f):
        return tuple(getattr(x, "pattern", x) for x in f)

    return key(a) == key(b)


class _LogNoiseFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.rules = [(name, filename, re.compile(rx)) for name, filename, rx in LOG_NOISE]

    def filter(self, record: logging.LogRecord) -> bool:
        if not _state.active:
            return True
        for name, filename, rx in self.rules:
            if record.name == name and record.filename == filename and rx.match(record.getMessage()):
                return False
        return True


def _install_log_filter() -> None:
    # a filter on the logger object itself: DeepSpeed's create_logger resets the level and adds a handler when it is
    # imported, but keeps the filters of the logger getLogger already returned
    if _state.log_filter is None:
        _state.log_filter = _LogNoiseFilter()
        for name in {n for n, _, _ in LOG_NOISE}:
            logging.getLogger(name).addFilter(_state.log_filter)


def _quiet_prints(func: Callable, line_rx: re.Pattern) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not _state.active:
            return func(*args, **kwargs)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                return func(*args, **kwargs)
        finally:
            for line in buf.getvalue().splitlines():
                if line_rx.fullmatch(line):
                    log.debug("%s", line)
                else:  # anything else it printed is passed on
                    print(line, flush=True)

    wrapper._vidistill_quiet = True  # type: ignore[attr-defined]
    return wrapper


def _patch_module(module) -> None:
    for mod_name, func_name, rx in PRINT_NOISE:
        if module.__name__ != mod_name:
            continue
        func = getattr(module, func_name, None)
        if callable(func) and not getattr(func, "_vidistill_quiet", False):
            setattr(module, func_name, _quiet_prints(func, re.compile(rx)))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps the noisy functions of a PRINT_NOISE module right after the module is executed (first import)."""

    targets = frozenset(m for m, _, _ in PRINT_NOISE)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_module(module)

        loader.exec_module = exec_and_patch  # the loader instance belongs to this spec only
        return spec


def _install_print_patches() -> None:
    for mod_name, _, _ in PRINT_NOISE:
        if mod_name in sys.modules:
            _patch_module(sys.modules[mod_name])
    if _state.finder is None:
        _state.finder = _PatchOnImport()
        sys.meta_path.insert(0, _state.finder)


def setup_logging(level: int = logging.INFO) -> None:
    """The launchers' log format: time, level, logger, message; ``[rank N]`` in front on ranks other than 0."""
    rank = os.environ.get("RANK", "0")
    prefix = f"[rank {rank}] " if rank not in ("", "0") else ""
    logging.basicConfig(
        level=level, format=f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------------


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


PLAIN_KEYS = ("total", "initial", "desc", "unit", "disable", "every_s", "every_pct")
"""The keywords :class:`PlainProgress` takes; the others (``position``, ``dynamic_ncols``, ...) only matter to tqdm."""


def progress(iterable: Optional[Iterable] = None, *, file=None, tty: Optional[bool] = None, **kwargs: Any):
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`PlainProgress` writing a line every
    ``every_s`` seconds or ``every_pct`` percent. Same use as tqdm: iterate over it, or ``update``/``set_postfix``/
    ``write``/``close`` it. ``tty`` forces one or the other (default: ``VIDISTILL_PROGRESS``, then ``isatty``);
    keywords: tqdm's (``total``, ``initial``, ``desc``, ``unit``, ``disable``, ...) and ``every_s``/``every_pct``."""
    stream = file if file is not None else sys.stderr
    if tty is None:
        forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
        tty = {"tty": True, "plain": False}.get(forced, _isatty(stream))
    if tty:
        from tqdm.auto import tqdm

        return tqdm(iterable, file=file, **{k: v for k, v in kwargs.items() if k not in ("every_s", "every_pct")})
    return PlainProgress(iterable, file=file, **{k: v for k, v in kwargs.items() if k in PLAIN_KEYS})


def format_seconds(s: float) -> str:
    """``42s``, ``2m35s``, ``1h02m``."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class PlainProgress:
    """tqdm's interface, for a stream that is not a terminal: one complete line per report, no carriage returns."""

    def __init__(
        self,
        iterable: Optional[Iterable] = None,
        *,
        total: Optional[float] = None,
        initial: float = 0,
        desc: Optional[str] = None,
        unit: str = "it",
        disable: bool = False,
        file=None,
        every_s: float = 60.0,
        every_pct: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is None and iterable is not None:
            with contextlib.suppress(TypeError, AttributeError):
                total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.n = self.initial = initial
        self.desc = desc or ""
        self.unit = unit
        self.disable = disable
        self.file = file
        self.every_s, self.every_pct = every_s, every_pct
        self.postfix = ""
        self._clock = clock
        self.start_t = self._last_t = clock()
        self._last_n = initial
        self._closed = False

    # -- tqdm interface ------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("PlainProgress: nothing to iterate over (no iterable given)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is not None:
            return int(self.total)
        return len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        if self.disable or self._closed:
            return
        self.n += n
        now = self._clock()
        if self._due(now):
            self._emit(now)

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={_format_value(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = (desc or "").rstrip(": ")

    set_description_str = set_description

    @classmethod
    def write(cls, s: str, file=None, end: str = "\n", nolock: bool = False) -> None:
        out = file if file is not None else sys.stdout
        out.write(s + end)
        out.flush()

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        if not self.disable and not self._closed:
            self._emit(self._clock())

    def clear(self, *args: Any, **kwargs: Any) -> None:
        pass

    def reset(self, total: Optional[float] = None) -> None:
        self.n = self._last_n = self.initial = 0
        if total is not None:
            self.total = total
        self.start_t = self._last_t = self._clock()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._last_n:
            self._emit(self._clock())

    # -- lines ---------------------------------------------------------------------------------------------------------

    def _due(self, now: float) -> bool:
        if self.n == self._last_n:
            return False
        if now - self._last_t >= self.every_s:
            return True
        if self.total and self.every_pct > 0:
            step = self.total * self.every_pct / 100.0
            return int(self.n / step) > int(self._last_n / step)
        return False

    def format_line(self, now: Optional[float] = None) -> str:
        now = self._clock() if now is None else now
        elapsed = max(now - self.start_t, 1e-9)
        rate = (self.n - self.initial) / elapsed
        n = f"{self.n:g}"
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{n}/{self.total:g} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{n} {self.unit}")
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {format_seconds((self.total - self.n) / rate)}")
        else:
            parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return " ".join(parts)

    def _emit(self, now: float) -> None:
        out = self.file if self.file is not None else sys.stderr
        out.write(self.format_line(now) + "\n")
        out.flush()
        self._last_t, self._last_n = now, self.n
