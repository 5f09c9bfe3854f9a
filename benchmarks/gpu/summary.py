"""GPU check, last step: the stage records (and the exit status run_all.sh kept of each) into ``summary.json`` and
``summary.md`` in the results directory. Exit 0 when every stage succeeded, 1 otherwise.

A stage's status: ``ok`` / ``dry-run ok``; ``failed`` (its error line); ``cut off`` (its time budget ran out: what it
had measured is kept); ``missing`` (no record: it did not start).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import STAGES

CUT_OFF = (124, 137)  # timeout(1): TERM, then KILL


def _status(record: dict | None, rc: int | None) -> str:
    if record is None:
        return "missing"
    if rc in CUT_OFF or (record["status"] == "running" and rc is None):
        return "cut off"
    if record["status"] == "running":  # exited without finishing its record
        return "failed"
    return record["status"]


def load(results: Path) -> dict:
    stages = {}
    for name in STAGES:
        path, rc_path = results / f"{name}.json", results / f"{name}.rc"
        record = json.loads(path.read_text()) if path.is_file() else None
        rc = int(rc_path.read_text()) if rc_path.is_file() else None
        stages[name] = {"status": _status(record, rc), "exit": rc, **({"record": record} if record else {})}
    return stages


def _f(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def kernels_md(rec: dict) -> list[str]:
    rows = [r for r in rec["rows"] if "ms" in r]
    if not rows:
        return [f"{len(rec['rows'])} kernel paths ran once each (dry run: not timed)."]
    eager = {(r["kernel"], r["passes"]): r["ms"] for r in rows if r["provider"] == "torch_eager"}
    cells = []
    for r in sorted(rows, key=lambda r: (r["kernel"], r["passes"], r["provider"])):
        base = eager.get((r["kernel"], r["passes"]))
        cells.append([r["kernel"], r["passes"], r["provider"], f"{r['ms']:.3f}", f"{r['gbps']:.0f}",
                      f"{r['gflops'] / 1e3:.1f}", f"{_pct(r['peak_fraction'])} ({r['roof']})",
                      f"{_f(base / r['ms'] if base else None)}x"])  # fmt: skip
    return _table(["kernel", "passes", "provider", "ms", "GB/s", "TFLOP/s", "% of peak", "vs eager"], cells)


def dit_md(rec: dict) -> list[str]:
    cells = [[f"{r['blocks']}{' (probe)' if r.get('probe') else ''}", str(r["tokens"]), r["attention_backend"],
              f"{r['forward_ms']:.1f}", f"{r['forward_backward_ms']:.1f}", f"{r['forward_backward_tflops']:.1f}",
              _pct(r.get("peak_fraction")), f"{r['projected_30_blocks_forward_backward_s']:.2f}"]
             for r in rec["rows"]]  # fmt: skip
    header = ["blocks", "tokens", "attention", "fwd ms", "fwd+bwd ms", "fwd+bwd TFLOP/s", "% of peak",
              "30 blocks fwd+bwd s"]  # fmt: skip
    return _table(header, cells)


def distill_md(rec: dict) -> list[str]:
    if "cycle_s" not in rec:
        return [f"steps timed: {[r['step'] for r in rec['rows']]}"]
    return [
        f"{rec['model']['num_layers']} blocks of the 1.3B width, latent {rec['latent']}: 5:1 cycle (steps 2-6) "
        f"**{rec['cycle_s']:.2f} s** (critic step {rec['critic_step_s']:.2f} s, generator step "
        f"{rec['generator_step_s']:.2f} s); warm-up step {rec['warmup_step_s']:.2f} s; set-up {rec['setup_s']:.1f} s; "
        f"peak memory {_f(rec.get('peak_memory_gib'), '.1f')} GiB",
    ]


def vif_md(rec: dict) -> list[str]:
    if "full_s" not in rec:
        return ["no sampler timed"]
    return [
        f"{rec['blocks']} blocks, {rec['tokens_full']} tokens ({rec['tokens_half']} at half rate): full-rate "
        f"{rec['full_s']:.3f} s, VIF contiguous {rec['vif_contiguous_s']:.3f} s "
        f"(**{rec['speedup_contiguous']:.2f}x**), "
        f"VIF stride-2 {rec['vif_stride2_s']:.3f} s ({rec['speedup_stride2']:.2f}x); FLOP model "
        f"{rec['ideal_speedup_flops']:.2f}x, paper (1.3B) {rec['paper_speedup_1_3b']:.2f}x; interpolator "
        f"{_pct(rec['interpolator_share_of_vif'])} of the VIF time",
    ]


def tests_md(rec: dict) -> list[str]:
    if rec.get("dry_run"):
        return [f"{rec.get('collected', 0)} gpu tests collected in {len(rec.get('files', []))} files (not run)"]
    out = [f"{rec.get('passed', 0)} passed, {rec.get('failures', 0)} failed, {rec.get('errors', 0)} errors, "
           f"{rec.get('skipped', 0)} skipped"]  # fmt: skip
    out += [f"- failed: `{t}`" for t in rec.get("failed_tests", [])]
    out += [f"- skipped: `{t}` ({why})" for t, why in rec.get("skipped_tests", {}).items()]
    return out


SECTIONS = {"gpu_tests": ("gpu-marked tests", tests_md), "kernels": ("Kernels: fused vs eager vs torch.compile",
            kernels_md), "dit": ("DiT forward+backward, 1.3B width, 32,760 tokens", dit_md),
            "distill": ("One 5:1 distillation cycle on one GPU", distill_md),
            "vif": ("VIF vs full-rate 4-step sampling", vif_md)}  # fmt: skip


def markdown(stages: dict, device: dict, dry_run: bool) -> str:
    lines = ["# GPU check" + (" (dry run on CPU: paths checked, nothing measured)" if dry_run else ""), ""]
    d = device.get
    lines.append(f"Device: {d('name')} (peak {d('peak_gbps')} GB/s, {d('peak_tflops')} bf16 TFLOP/s); "
                 f"torch {d('torch')}, CUDA {d('cuda')}, Triton {d('triton')}")  # fmt: skip
    cells = []
    for name, s in stages.items():
        rec = s.get("record", {})
        err = f": {rec['error']}" if rec.get("error") else ""
        cells.append([name, f"{s['status']}{err}", _f(rec.get("seconds"), ".0f", "")])
    lines += ["", *_table(["stage", "status", "seconds"], cells)]
    for name, s in stages.items():
        title, section = SECTIONS[name]
        lines += ["", f"## {title}", ""]
        rec = s.get("record")
        try:
            lines += section(rec) if rec else [f"({s['status']})"]
        except (KeyError, TypeError) as exc:  # a record cut off mid-way: say so rather than fail the summary
            lines.append(f"(incomplete record: missing {exc})")
        for note in (rec or {}).get("notes", []):
            lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    stages = load(results)
    device = next((s["record"]["device"] for s in stages.values() if "record" in s), {})
    want = "dry-run ok" if args.dry_run else "ok"
    ok = all(s["status"] == want for s in stages.values())
    summary = {"ok": ok, "dry_run": args.dry_run, "device": device, "stages": stages}
    (results / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (results / "summary.md").write_text(markdown(stages, device, args.dry_run))
    for name, s in stages.items():
        print(f"  {name:10} {s['status']}")
    print(f"summary: {results / 'summary.md'}, {results / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
