"""GPU check, stage "gpu_tests": the test suite's ``gpu``-marked tests (DALI NVDEC decoding, BT.709 routing, the text
encoder and VAE on CUDA, attention backends), run by pytest with a JUnit report that the record summarizes.

Only the test files that carry the mark are collected (every other file would be imported for nothing). A dry run
collects them without running (on a CPU they would all be skipped), which proves they import and are found. Tests
of optional backends that are not installed (flash-attn, xformers: the ``[gpu]`` extra) skip themselves; the record
lists each skip with its reason.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

from common import ROOT, Stage, stage_args

MARK = "mark.gpu"


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if MARK in p.read_text())


def junit_counts(path) -> dict:
    """Totals and the failing tests' ids from a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        if (skip := case.find("skipped")) is not None:
            skipped[name] = skip.get("message", "")
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_tests": failed, "skipped_tests": skipped}  # fmt: skip


def main() -> None:
    args = stage_args(__doc__.split("\n\n")[0])
    with Stage("gpu_tests", args) as st:
        files = gpu_test_files()
        if not files:
            raise RuntimeError(f"no test file under tests/ carries {MARK}")
        report = st.path.with_name("gpu_tests.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and not slow",
               f"--junitxml={report}", f"--timeout={max(30, int(args.budget))}", *files]  # fmt: skip
        if args.dry_run:
            cmd.append("--collect-only")
        st.set(command=cmd[2:], files=files)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.budget + 30)
        tail = proc.stdout.strip().splitlines()[-15:]
        print("\n".join(tail), flush=True)
        if args.dry_run:
            collected = [ln for ln in proc.stdout.splitlines() if "::" in ln]
            st.set(collected=len(collected), pytest_rc=proc.returncode)
            if proc.returncode != 0 or not collected:
                raise RuntimeError(
                    f"collecting the gpu tests failed (rc {proc.returncode}): {tail[-1:] or proc.stderr[-300:]}"
                )
            return
        counts = junit_counts(report) if report.is_file() else {}
        st.set(pytest_rc=proc.returncode, output_tail=tail, **counts)
        if proc.returncode != 0:
            raise RuntimeError(f"pytest exited {proc.returncode}: {counts.get('failed_tests') or tail[-1:]}")


if __name__ == "__main__":
    main()
