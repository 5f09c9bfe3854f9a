"""How a worker ends (engine/train/dist.py:exit_process): with the code it was given, its process groups left, every
atexit handler run and its output flushed, and without interpreter teardown."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    import torch.distributed
    from engine.train import dist

    dist.init()  # a lone process: rank 0 of 1 on gloo
    assert torch.distributed.is_initialized()
    def handler():  # runs after the groups are gone
        open(sys.argv[1], "w").write(f"initialized={torch.distributed.is_initialized()}")
    atexit.register(handler)
    print("written", end="")  # no newline: only a flush delivers it
    sys.stderr.write("a warning")
    dist.exit_process(None if sys.argv[2] == "none" else int(sys.argv[2]))
    raise AssertionError("exit_process returned")
    """
)


def run(tmp_path, code: str):
    out = tmp_path / "atexit.txt"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), code], capture_output=True, text=True, timeout=300)
    return proc, out


def test_exit_process_exits_with_the_code_after_the_atexit_handlers_and_flushes(tmp_path):
    proc, out = run(tmp_path, "3")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.endswith("written") and proc.stderr.endswith("a warning")
    assert out.read_text() == "initialized=False"  # the handler ran, after the process group was destroyed


def test_exit_process_with_no_code_is_success(tmp_path):  # a worker whose main() returns None
    proc, out = run(tmp_path, "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()


def test_exit_process_waits_for_unfinished_threads_and_not_for_idle_executors(tmp_path):
    """A non-daemon thread still writing finishes its file (what the interpreter would wait for); an executor nobody
    shut down does not hold the exit."""
    out = tmp_path / "late.txt"
    script = textwrap.dedent(
        """
        import concurrent.futures, sys, threading, time
        from engine.train.dist import exit_process

        pool = concurrent.futures.ThreadPoolExecutor(2)
        pool.submit(int).result()  # idle workers, never shut down
        def late():
            time.sleep(0.5)
            open(sys.argv[1], "w").write("written")
        threading.Thread(target=late).start()
        exit_process(4)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert out.read_text() == "written"
