"""engine.console: the noise filter (hides exactly the known noise, --verbose / VIDISTILL_VERBOSE=1 show it) and the
progress factory (tqdm on a terminal, plain lines elsewhere)."""

from __future__ import annotations

import ast
import io
import logging
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from engine import console

ROOT = Path(__file__).resolve().parents[1]
DS_MESSAGE = (
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single`"
)
LAUNCHERS = sorted(p for p in (ROOT / "launcher").glob("*.py") if p.name != "__init__.py")


@pytest.fixture(autouse=True)
def _clean_console(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    console.uninstall()
    yield
    console.uninstall()


def _warn(message: str, module: str, category=FutureWarning) -> list[str]:
    """Raise a warning attributed to ``module`` (as torch's c10d_logger wrapper is) under the current filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the filters installed below go in front of this one
        console.install(verbose=os.environ.get(console.VERBOSE_ENV) == "force")
        warnings.warn_explicit(message, category, "c10d_logger.py", 83, module=module, registry={})
    return [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------------------------------------


def test_filter_hides_deepspeeds_deprecation_warnings():
    assert _warn(DS_MESSAGE, "torch.distributed.c10d_logger") == []
    assert _warn("`torch.distributed.reduce_scatter_tensor` is deprecated.", "torch.distributed.c10d_logger") == []
    assert console.is_quiet()


def test_env_var_reveals_them(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert _warn(DS_MESSAGE, "torch.distributed.c10d_logger") == [DS_MESSAGE]
    assert not console.is_quiet()


def test_verbose_flag_reveals_them_and_is_inherited(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "force")  # _warn passes verbose=True
    assert _warn(DS_MESSAGE, "torch.distributed.c10d_logger") == [DS_MESSAGE]
    assert os.environ[console.VERBOSE_ENV] == "1"  # child ranks and workers started from here see everything too


def test_unrelated_warnings_still_show():
    other = "`torch.distributed.all_reduce_coalesced` will be deprecated."
    assert _warn(other, "torch.distributed.c10d_logger") == [other]  # same module, other message
    assert _warn(DS_MESSAGE, "engine.train.dist") == [DS_MESSAGE]  # same message, raised from our code
    assert _warn(DS_MESSAGE, "torch.distributed.c10d_logger_x") == [DS_MESSAGE]  # the module name is anchored
    assert _warn(DS_MESSAGE, "torch.distributed.c10d_logger", UserWarning) == [DS_MESSAGE]  # other category


def test_install_is_idempotent_and_uninstall_removes_the_filters():
    before = len(warnings.filters)
    console.install()
    console.install()
    assert len(warnings.filters) == before + len(console.WARNING_NOISE)
    console.uninstall()
    assert len(warnings.filters) == before


# ---------------------------------------------------------------------------------------------------------------------
# Log records and prints
# ---------------------------------------------------------------------------------------------------------------------


def _deepspeed_log(msg: str, pathname: str) -> list[str]:
    logger = logging.getLogger("DeepSpeed")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.handle(logger.makeRecord("DeepSpeed", logging.WARNING, pathname, 213, msg, None, None))
    finally:
        logger.removeHandler(handler)
    return seen


def test_deepspeed_accelerator_message_is_hidden_other_records_are_not(monkeypatch):
    accel = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    console.install()
    assert _deepspeed_log(accel, "/x/deepspeed/accelerator/real_accelerator.py") == []
    assert _deepspeed_log("Setting accelerator to cuda (auto detect)", "/x/real_accelerator.py") != []
    assert _deepspeed_log(accel, "/x/deepspeed/runtime/engine.py") != []  # the same words from elsewhere
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.install()
    assert _deepspeed_log(accel, "/x/deepspeed/accelerator/real_accelerator.py") == [accel]


def test_op_build_print_is_hidden_other_prints_pass(capsys, monkeypatch):
    module = types.ModuleType("deepspeed.comm.torch")

    def build_shm_op():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else")
        return "op"

    module.build_shm_op = build_shm_op
    console.install()
    console._patch_module(module)
    assert module.build_shm_op() == "op"
    assert capsys.readouterr().out == "something else\n"
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.install()
    assert module.build_shm_op() == "op"
    assert "built successfully" in capsys.readouterr().out


def _python(code: str, **env) -> str:
    env = {k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}.items() if v}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_real_deepspeed_import_is_quiet_unless_verbose():
    code = (
        "from engine import console; console.install()\n"
        "import importlib, deepspeed\n"
        "t = importlib.import_module('deepspeed.comm.torch')\n"
        "print('patched', getattr(t.build_shm_op, '_vidistill_quiet', False))\n"
    )
    quiet = _python(code, **{console.VERBOSE_ENV: ""})
    assert "Setting accelerator to CPU" not in quiet
    assert "patched True" in quiet
    loud = _python(code, **{console.VERBOSE_ENV: "1"})
    assert "Setting accelerator to CPU" in loud


def test_launchers_install_the_filter_and_import_no_deepspeed_before():
    """Each launcher's main() calls console.install(verbose=args.verbose) and has --verbose; importing a launcher
    module does not import DeepSpeed (so the install in main() comes before DeepSpeed's import-time messages)."""
    for path in LAUNCHERS:
        tree = ast.parse(path.read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        calls = [ast.unparse(n) for n in ast.walk(main) if isinstance(n, ast.Call)]
        assert "console.install(verbose=args.verbose)" in calls, path.name
        assert "console.add_verbose_flag" in path.read_text(), path.name
    mods = ", ".join(f"launcher.{p.stem}" for p in LAUNCHERS)
    out = _python(f"import sys, {mods}\nprint('deepspeed' in sys.modules)")
    assert out.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_on_a_terminal_is_tqdm():
    from tqdm import tqdm

    bar = console.progress(total=5, desc="x", tty=True, file=io.StringIO())
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.set_postfix(loss=0.5)
    bar.close()


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_picks_the_mode_from_the_stream_and_the_env(monkeypatch):
    from tqdm import tqdm

    assert isinstance(console.progress(total=1, file=_FakeTTY()), tqdm)
    assert isinstance(console.progress(total=1, file=io.StringIO()), console.PlainProgress)
    monkeypatch.setenv(console.PROGRESS_ENV, "plain")
    assert isinstance(console.progress(total=1, file=_FakeTTY()), console.PlainProgress)


def test_plain_progress_writes_lines_every_k_percent():
    out, clock = io.StringIO(), _Clock()
    bar = console.PlainProgress(total=600, desc="distill", unit="step", file=out, every_pct=20, clock=clock)
    for _ in range(119):
        clock.t += 0.25
        bar.update(1)
    assert out.getvalue() == ""  # 119/600: not yet 20%
    clock.t += 0.25
    bar.set_postfix({"critic": 0.30471, "dmd": "0.22"}, refresh=False)
    bar.update(1)
    assert out.getvalue() == "distill 120/600 (20%) 4 step/s eta 2m00s critic=0.3047, dmd=0.22\n"
    bar.update(480)
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("distill 600/600 (100%)") and "elapsed" in lines[-1]
    assert len(lines) == 2 and "\r" not in out.getvalue()


def test_plain_progress_writes_lines_every_n_seconds_and_resumes():
    out, clock = io.StringIO(), _Clock()
    bar = console.PlainProgress(total=None, initial=10, desc="latent cache r0", unit="clip", file=out, every_s=30,
                                clock=clock)  # fmt: skip
    for _ in range(5):
        clock.t += 10
        bar.update(2)
    assert out.getvalue().splitlines() == ["latent cache r0 16 clip 5 s/clip elapsed 30s"]
    clock.t += 10
    bar.close()  # nothing new since that line at 16, then 2 more
    assert out.getvalue().splitlines()[-1] == "latent cache r0 20 clip 6 s/clip elapsed 1m00s"
    slow = console.PlainProgress(total=4, desc="teacher", unit="step", file=io.StringIO(), every_pct=50, clock=clock)
    clock.t += 150
    slow.update(2)
    assert slow.file.getvalue() == "teacher 2/4 (50%) 75 s/step eta 2m30s\n"


def test_plain_progress_wraps_iterables_and_can_be_disabled(capsys):
    out = io.StringIO()
    assert list(console.progress(range(5), desc="toy clips", tty=False, file=out, every_pct=50)) == list(range(5))
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["toy clips 3/5", "toy clips 5/5"]
    off = io.StringIO()
    bar = console.progress(range(3), total=3, disable=True, tty=False, file=off)
    assert list(bar) == [0, 1, 2]
    bar.update(3)
    bar.close()
    assert off.getvalue() == ""
    with console.progress(total=2, tty=False, file=io.StringIO()) as b:
        b.write("a log line")  # like tqdm.write: to stdout, whole lines
        b.set_description("renamed")
        b.update(2)
    assert capsys.readouterr().out == "a log line\n"
    assert b.file.getvalue().startswith("renamed 2/2 (100%)")


def test_format_seconds():
    assert [console.format_seconds(s) for s in (0, 42.4, 155, 3725)] == ["0s", "42s", "2m35s", "1h02m"]
