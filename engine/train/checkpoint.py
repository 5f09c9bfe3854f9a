"""Trainer checkpoints: step-numbered directories, written atomically, keep-last-k, exact resume.

    <run_dir>/checkpoints/
        step_00000012/              complete checkpoint (renamed from .partial-step_00000012 when every rank is done)
            generator/  critic/     DeepSpeed engine states (ZeRO-3 partitions, optimizer included)
            trainer/shared.pt       step, method state (EMA cache), shared RNG, counters
            trainer/rank_00001.pt   per-rank RNG and data position
            COMPLETE
        latest                      the name of the newest complete checkpoint, replaced atomically

A job killed at any moment (also mid-save) resumes from the newest complete checkpoint; partial directories are
ignored and removed. On several nodes the run directory must be on a shared filesystem (as DeepSpeed requires).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from engine.config import ConfigError
from engine.fsutil import atomic_write_text
from engine.train import dist

COMPLETE = "COMPLETE"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fault(point: str, step: int) -> None:
    """Fault injection for tests: VIDISTILL_FAULT=<point>:<step> SIGKILLs this process there."""
    spec = os.environ.get("VIDISTILL_FAULT", "")
    if spec == f"{point}:{step}":
        os.kill(os.getpid(), 9)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=True)


def save(root: Path, step: int, engines: dict, shared_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    name = step_name(step)
    partial, final = root / f".partial-{name}", root / name
    if dist.is_main():
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "trainer").mkdir(parents=True)
    dist.barrier()
    for tag, engine in engines.items():
        engine.save_checkpoint(str(partial), tag=tag, save_latest=False)
    torch.save(rank_state, partial / "trainer" / f"rank_{dist.rank():05d}.pt")
    if dist.is_main():
        torch.save(shared_state, partial / "trainer" / "shared.pt")
    _fault("save", step)
    dist.barrier()  # every rank's files are on disk
    if dist.is_main():
        _atomic_write_text(partial / COMPLETE, f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.replace(final)
        _atomic_write_text(root / "latest", name + "\n")
        prune(root, keep_last)
    dist.barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints and any partial leftovers."""
    for p in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(".partial-*"):
        shutil.rmtree(p, ignore_errors=True)


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: resume='never' -> None; 'auto' -> latest complete under root (None if none);
    otherwise the given directory, which must be complete."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise ConfigError(f"config key `checkpoint.resume`: {resume} is not a complete checkpoint (no {COMPLETE})")
        return path
    latest = Path(root) / "latest"
    if latest.is_file():
        candidate = Path(root) / latest.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    done = complete_checkpoints(root)  # `latest` missing or stale (killed between rename and pointer update)
    return done[-1] if done else None


def read_shared(path: Path) -> dict:
    """The trainer state every rank shares (step, method state, teacher fingerprint, ...), without the engines."""
    return torch.load(Path(path) / "trainer" / "shared.pt", weights_only=True)


def load(path: Path, engines: dict) -> tuple[dict, dict]:
    """Collective: load engine states; return (shared_state, this rank's state)."""
    for tag, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(path), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {tag} from {path}")
    shared = read_shared(path)
    rank_file = path / "trainer" / f"rank_{dist.rank():05d}.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"{rank_file} missing: the checkpoint was written by a run with a different world size")
    return shared, torch.load(rank_file, weights_only=True)


def finished(root: Path, resume: str, max_steps: int) -> dict | None:
    """The shared state of the checkpoint a run would resume from when it already reached ``max_steps`` (a re-run of
    a finished job has nothing to train), else None. Reads one small file: nothing is built or loaded."""
    path = find_resume(root, resume)
    if path is None:
        return None
    shared = read_shared(path)
    return shared if int(shared["step"]) >= max_steps else None


def check_teacher(root: Path, resume: str, teacher_id: str | None, teacher_path: str | None) -> None:
    """A run resumes only against the teacher it was trained with: the generator and critic in its checkpoint were
    initialized from, and distilled against, those weights. Checked before any model is built."""
    path = find_resume(root, resume)
    if path is None or teacher_id is None:
        return
    saved = read_shared(path).get("teacher")
    if saved is not None and saved != teacher_id:
        raise ConfigError(
            f"config key `model.checkpoint`: {path} was distilled from other teacher weights (fingerprint {saved}) "
            f"than {teacher_path} holds now ({teacher_id}); restore that teacher, or start a new logging.run_dir"
        )
