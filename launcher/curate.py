"""Curate raw videos with the paper's appendix-6 filters; write the kept manifest and a per-video report.

    python -m launcher.curate raw_videos/ --out data/manifest.jsonl --report data/curation.jsonl --workers 16
    python -m launcher.curate raw.jsonl --out kept.jsonl --report report.jsonl min_width=640 min_height=360
    python -m launcher.curate raw/ --out kept.jsonl --report r.jsonl --config configs/wan2.1-1.3b-24gpu.yaml

Re-running the same command resumes. The report stores each video's measurements, so a re-run with other thresholds
decides again from them without decoding (a changed file is measured again). --config takes the minimum length from
a run config: a video must hold one training clip of data.num_frames frames at data.fps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap

from engine import console


def _parse_override(cfg, item: str):
    key, sep, value = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if not sep or key not in fields:
        raise SystemExit(f"override {item!r}: expected key=value with key in {sorted(fields)}")
    current = getattr(cfg, key)
    try:
        if isinstance(current, tuple):
            return key, tuple(int(v) for v in value.split(","))
        if current is None or isinstance(current, str):
            return key, value or None
        return key, type(current)(value)
    except ValueError:
        raise SystemExit(f"override {item!r}: expected a {type(current).__name__}") from None


def _keys_help() -> str:
    from engine.data.curation import describe_fields

    lines = ["override keys (key=value; unit, default):"]
    for key, default, unit, doc in describe_fields():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        lines.append(f"  {key}  [{unit}; default {shown}]")
        lines += textwrap.wrap(doc.replace("``", ""), 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a directory of videos, or a .jsonl/.csv manifest (caption optional)")
    parser.add_argument("--out", required=True, help="kept manifest (JSONL)")
    parser.add_argument("--report", required=True, help="per-video report (JSONL); resumes from it")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")
    parser.add_argument("--config", help="run config YAML: clip_frames and clip_fps from its data.num_frames, data.fps")
    parser.add_argument("--no-progress", action="store_true")
    console.add_verbose_flag(parser)
    parser.add_argument("overrides", nargs="*", help="CurationConfig fields, e.g. flow_min=0.3")
    args = parser.parse_intermixed_args(argv)
    console.install(verbose=args.verbose)
    console.setup_logging()

    from engine.config import ConfigError, load_config
    from engine.data.curation import CurationConfig, curate
    from engine.data.manifest import ManifestError

    try:
        cfg = CurationConfig()
        if args.config:
            data = load_config(args.config).data
            cfg = dataclasses.replace(cfg, clip_frames=data.num_frames, clip_fps=data.fps)
        cfg = dataclasses.replace(cfg, **dict(_parse_override(cfg, o) for o in args.overrides))
        if args.workers:
            cfg = dataclasses.replace(cfg, workers=args.workers)
        summary = curate(args.source, args.out, args.report, cfg, progress=not args.no_progress)
    except (ConfigError, ManifestError, ValueError) as exc:  # ManifestError is a ValueError; so are bad settings
        print(f"curate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if not summary["kept"]:  # an empty manifest is no result: say why, and fail the pipeline step
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.items() if k not in ("inputs", "kept")) or "no inputs"
        print(
            f"curate: error: no clip kept of {summary['inputs']} ({reasons}); see {args.report} for each video, and "
            "loosen the filters (key=value overrides) if they are too strict",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
