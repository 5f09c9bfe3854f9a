"""Trainer checkpoints: step-numbered directories, written atomically, verified before they are trusted, keep-last-k,
exact resume.

    <run_dir>/checkpoints/
        step_00000012/              complete checkpoint (renamed from .partial-step_00000012 when every rank is done)
            generator/  critic/     DeepSpeed engine states (ZeRO-3 partitions, optimizer included)
            trainer/shared.pt       step, method state (EMA cache), shared RNG, counters
            trainer/rank_00001.pt   per-rank RNG and data position
            manifest/rank_00001.json  size and blake2b checksum of every file rank 1 wrote, the world size
            COMPLETE
        latest                      the name of the newest complete checkpoint, replaced atomically (for people and
                                    tools: resume checks it but does not trust it)

Every rank hashes the files it wrote right after writing them and writes its manifest; rank 0 adds every file no rank
claimed (DeepSpeed's recovery scripts), writes ``COMPLETE`` once all manifests exist, and renames the directory. On
resume every rank verifies its own files (sizes and checksums) and the ranks agree: a checkpoint with a missing,
truncated or corrupt file is named in one log line and skipped for the next newest one that verifies; when none
does, resume fails with the list of what is wrong (it never starts over silently). A ``COMPLETE`` marker alone is not
trusted, and pruning only removes checkpoints older than the newest verified one.

A job killed at any moment (also mid-save) resumes from the newest complete checkpoint; partial directories are
removed before anything is written. A save first checks the free space against the size of the previous checkpoint,
and a save that runs out of space removes what it wrote: the last complete checkpoint stays usable either way. On
several nodes the run directory must be on a shared filesystem (as DeepSpeed requires).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from engine import safe_load
from engine.config import ConfigError
from engine.fsutil import atomic_write_text
from engine.train import dist
from engine.train.errors import TrainingStopped

COMPLETE = "COMPLETE"
MANIFEST_DIR = "manifest"
SHARED = "trainer/shared.pt"
_STEP_DIR = re.compile(r"step_\d{8}")

log = logging.getLogger("vidistill.train")
Note = Callable[[str], None]


class TrainCheckpointError(TrainingStopped):
    """A checkpoint could not be written (disk full), or none of the existing ones can be resumed."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return Path(path) / "trainer" / f"rank_{rank:05d}.pt"


def manifest_file(path: Path, rank: int) -> Path:
    return Path(path) / MANIFEST_DIR / f"rank_{rank:05d}.json"


def _fault(point: str, step: int) -> None:
    """Fault injection for tests: VIDISTILL_FAULT=<point>:<step> SIGKILLs this process there; the point ``enospc``
    raises OSError(ENOSPC) instead (a disk that fills up in the middle of a save). At the start of a step,
    ``sigterm:<step>`` (or ``sigint:``) has rank 0 send that signal to the job's launcher (torchrun, which forwards it
    to every worker; a lone process: to itself), and ``sigterm:<step>:<rank>`` sends it to that rank only."""
    fault = os.environ.get("VIDISTILL_FAULT", "")
    if point == "step" and fault.startswith(("sigterm:", "sigint:")):
        kind, at, *rank = fault.split(":")
        if int(at) == step and dist.rank() == (int(rank[0]) if rank else 0):
            launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ and not rank else os.getpid()
            os.kill(launcher, signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
        return
    if fault != f"{point}:{step}":
        return
    if point == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "injected by VIDISTILL_FAULT")
    os.kill(os.getpid(), 9)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=True)


def _warn(msg: str) -> None:
    log.warning(msg)


# ---------------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """blake2b (256 bits) of the file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


def _describe(root: Path, files: Iterable[Path]) -> dict[str, dict]:
    out = {}
    for f in files:
        f = Path(f)
        out[f.relative_to(root).as_posix()] = {"size": f.stat().st_size, "blake2b": file_digest(f)}
    return out


def write_manifest(path: Path, files: Iterable[Path], *, rank: int = 0, world_size: int = 1, step: int = 0) -> None:
    """``manifest/rank_XXXXX.json`` of checkpoint ``path``: size and checksum of ``files`` (inside ``path``)."""
    _write_entries(Path(path), _describe(Path(path), files), rank, world_size, step)


def _write_entries(path: Path, entries: dict[str, dict], rank: int, world_size: int, step: int) -> None:
    body = {"rank": rank, "world_size": world_size, "step": step, "files": entries}
    _atomic_write_text(manifest_file(path, rank), json.dumps(body, indent=1, sort_keys=True) + "\n")


class _Unreadable(Exception):
    pass


def _read_manifest(path: Path, rank: int) -> dict:
    f = manifest_file(path, rank)
    if not f.is_file():
        raise _Unreadable(f"{f} is missing")
    try:
        body = json.loads(f.read_text(encoding="utf-8"))
        files = body["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("blake2b"), str)
            for v in files.values()
        ):
            raise ValueError("bad file entries")
        body["world_size"] = int(body["world_size"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise _Unreadable(f"{f} is unreadable ({exc.__class__.__name__})") from None
    return body


def _check_files(path: Path, files: dict[str, dict], checksums: bool) -> list[str]:
    problems = []
    for rel, want in sorted(files.items()):
        try:  # names read from a manifest stay inside the checkpoint
            f = safe_load.inside(path, rel, f"the manifest of {path}")
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if not f.is_file():
            problems.append(f"{f} is missing")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            kind = "truncated" if size < want["size"] else "wrong size"
            problems.append(f"{f} is {kind}: {size} bytes, {want['size']} written")
        elif checksums and file_digest(f) != want["blake2b"]:
            problems.append(f"{f} is corrupt: its checksum differs from the one written")
    return problems


def quick_check(path: Path) -> list[str]:
    """What is wrong with checkpoint ``path`` as one process sees it without reading the engine states: the
    marker, every rank's manifest, every file's size, the checksum of the shared trainer state. Empty when fine."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return [f"{path} has no {COMPLETE} marker"]
    try:
        head = _read_manifest(path, 0)
    except _Unreadable as exc:
        return [str(exc)]
    problems = []
    for r in range(head["world_size"]):
        try:
            m = head if r == 0 else _read_manifest(path, r)
        except _Unreadable as exc:
            problems.append(str(exc))
            continue
        problems += _check_files(path, m["files"], checksums=False)
    if not problems and SHARED in head["files"]:
        problems += _check_files(path, {SHARED: head["files"][SHARED]}, checksums=True)
    return problems


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _world_size_error(path: Path, saved: int) -> TrainCheckpointError:
    return TrainCheckpointError(
        f"checkpoint {path} was written by {saved} rank(s), this run has {dist.world_size()}: ZeRO states are "
        f"partitioned per rank, so resume with {saved} rank(s), or start a new logging.run_dir"
    )


def _verify_everywhere(path: Path) -> list[str]:
    """Collective: every rank checks the sizes and checksums of the files it wrote; the problems of all ranks."""
    head: int | str
    if dist.is_main():
        try:
            if not (path / COMPLETE).is_file():
                raise _Unreadable(f"{path} has no {COMPLETE} marker")
            head = _read_manifest(path, 0)["world_size"]
        except _Unreadable as exc:
            head = str(exc)
    else:
        head = 0
    head = dist.broadcast_object(head)
    if isinstance(head, str):
        return [head]
    if head != dist.world_size():
        raise _world_size_error(path, head)
    try:
        mine = _check_files(path, _read_manifest(path, dist.rank())["files"], checksums=True)
    except _Unreadable as exc:
        mine = [str(exc)]
    return [p for rank_problems in dist.all_gather_object(mine) for p in rank_problems]


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def _engine_files(engine, root: Path, tag: str) -> list[Path]:
    """The files this rank's ``save_checkpoint`` wrote for ``engine``. DeepSpeed (engine.save_checkpoint): the
    ranks with ``save_non_zero_checkpoint`` write the model states (rank 0 ``mp_rank_00_model_states.pt`` at ZeRO
    stage 0-2, every rank its ``zero_pp_rank_R_mp_rank_00_model_states.pt`` at stage 3), the ranks with
    ``save_zero_checkpoint`` their ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` (stages 1-3)."""
    if hasattr(engine, "checkpoint_files"):
        files = engine.checkpoint_files(str(root), tag)
    else:
        files = []
        if getattr(engine, "save_non_zero_checkpoint", False):
            files.append(engine._get_ckpt_name(str(root), tag))
        if getattr(engine, "save_zero_checkpoint", False):
            files.append(engine._get_zero_ckpt_name(str(root), tag))
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise TrainCheckpointError(f"the {tag} engine did not write {f}")
    return files


def _free_bytes(root: Path) -> int:
    return shutil.disk_usage(root).free


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _space_problem(root: Path, name: str) -> str | None:
    previous = newest_verified(root)
    if previous is None:
        return None
    need, free = size_on_disk(previous), _free_bytes(root)
    if free >= need:
        return None
    return (
        f"not enough free space to save checkpoint {name}: {root} has {_gib(free)} free, the previous checkpoint "
        f"{previous.name} takes {_gib(need)}; nothing was saved and {previous.name} is still the newest complete "
        "checkpoint (free some space, lower checkpoint.keep_last, or move logging.run_dir)"
    )


def remove_stale(root: Path, note: Note = _warn) -> None:
    """Remove partial saves of interrupted runs and step directories without their completion marker."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.glob(".partial-*")):
        shutil.rmtree(p, ignore_errors=True)
        note(f"removed {p.name}, the partial save of an interrupted run")
    for p in sorted(root.glob("step_*")):
        if p.is_dir() and not (p / COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)
            note(f"removed {p.name}: it has no {COMPLETE} marker")


def _write(partial: Path, step: int, engines: dict, shared_state: dict, rank_state: dict) -> None:
    rank, world = dist.rank(), dist.world_size()
    mine: list[Path] = []
    for tag, engine in engines.items():
        engine.save_checkpoint(str(partial), tag=tag, save_latest=False)
        mine += _engine_files(engine, partial, tag)
    _fault("enospc", step)
    torch.save(rank_state, rank_file(partial, rank))
    mine.append(rank_file(partial, rank))
    if dist.is_main():
        torch.save(shared_state, partial / SHARED)
        mine.append(partial / SHARED)
    entries = _describe(partial, mine)  # each rank hashes what it wrote, all ranks at once
    if not dist.is_main():
        _write_entries(partial, entries, rank, world, step)
    _fault("save", step)
    dist.barrier()  # every rank's files and manifest are on disk
    if dist.is_main():
        claimed = set(entries)
        for r in range(1, world):
            try:
                claimed |= set(_read_manifest(partial, r)["files"])
            except _Unreadable as exc:
                raise TrainCheckpointError(f"checkpoint {partial.name} is incomplete: {exc}") from None
        rest = [
            f
            for f in sorted(partial.rglob("*"))
            if f.is_file()
            and f.relative_to(partial).parts[0] != MANIFEST_DIR
            and f.relative_to(partial).as_posix() not in claimed
        ]  # the recovery scripts DeepSpeed copies, anything else written
        _write_entries(partial, {**entries, **_describe(partial, rest)}, 0, world, step)
        _atomic_write_text(partial / COMPLETE, f"{step}\n")


def save(root: Path, step: int, engines: dict, shared_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory. Raises TrainCheckpointError, having written
    nothing, when the disk has less free space than the previous checkpoint takes, and, having removed what it
    wrote, when the disk fills up during the save."""
    root = Path(root)
    name = step_name(step)
    partial, final = root / f".partial-{name}", root / name
    problem = None
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        problem = _space_problem(root, name)
        if problem is None:
            (partial / "trainer").mkdir(parents=True)
            (partial / MANIFEST_DIR).mkdir()
    problem = dist.broadcast_object(problem)  # also the barrier before anything is written
    if problem is not None:
        raise TrainCheckpointError(problem)
    try:
        _write(partial, step, engines, shared_state, rank_state)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        previous = newest_verified(root)
        keep = f"{previous.name} is still the newest complete checkpoint" if previous else "no checkpoint exists yet"
        raise TrainCheckpointError(
            f"no space left on device while saving checkpoint {name} in {root}: the partial save was removed; {keep}"
        ) from None
    if dist.is_main():
        shutil.rmtree(final, ignore_errors=True)
        partial.replace(final)
        _atomic_write_text(root / "latest", name + "\n")
        prune(root, keep_last)
    dist.barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Step directories with their completion marker (verified or not), oldest first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def newest_verified(root: Path) -> Path | None:
    for p in reversed(complete_checkpoints(root)):
        if not quick_check(p):
            return p
    return None


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints that verify; delete the older ones (and partial leftovers). Never
    deletes anything when none verifies, nor a checkpoint newer than the newest one that does."""
    done = complete_checkpoints(root)
    good = [p for p in done if not quick_check(p)]
    keep = good[-keep_last:]
    if keep:
        for p in done:
            if p not in keep and p.name < keep[-1].name:
                shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(".partial-*"):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------------


def _check_latest(root: Path, note: Note) -> None:
    """Warn about a ``latest`` pointer that is not the name of a complete checkpoint in ``root``."""
    latest = Path(root) / "latest"
    if not latest.is_file():
        return
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        problem = "it is not text"
    else:
        if not _STEP_DIR.fullmatch(name):
            problem = f"{name[:80]!r} is not a checkpoint name in {root}"
        elif not (Path(root) / name / COMPLETE).is_file():
            problem = f"{name} is not a complete checkpoint"
        else:
            return
    note(f"ignoring {latest}: {problem}; resuming from the newest complete checkpoint that verifies")


def _candidates(root: Path, resume: str, note: Note) -> list[Path]:
    """Where to resume from, newest first: none ('never'), the given checkpoint, or every complete one in root."""
    if resume == "never":
        return []
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise ConfigError(f"config key `checkpoint.resume`: {resume} is not a complete checkpoint (no {COMPLETE})")
        return [path]
    _check_latest(root, note)
    return complete_checkpoints(root)[::-1]


def _none_verifies(root: Path, failed: list[str]) -> TrainCheckpointError:
    return TrainCheckpointError(
        f"no checkpoint in {root} verifies: {' | '.join(failed)}; restore the files, or resume elsewhere "
        "(checkpoint.resume=never, or a new logging.run_dir)"
    )


def find_resume(root: Path, resume: str, note: Note | None = None) -> Path | None:
    """The checkpoint a run would resume from, as one process sees it (:func:`quick_check`; no collective, no
    engine state read): resume='never' -> None; 'auto' -> the newest complete one under root that checks out (None
    if there is none); otherwise the given directory. Raises when checkpoints exist and none checks out."""
    note = note or (lambda msg: None)
    failed = []
    for path in _candidates(Path(root), resume, note):
        problems = quick_check(path)
        if not problems:
            return path
        failed.append(f"{path.name}: {'; '.join(problems)}")
    if failed:
        raise _none_verifies(root if resume == "auto" else resume, failed)
    return None


def select(root: Path, resume: str, note: Note = _warn) -> Path | None:
    """Collective: the checkpoint to resume from, every rank having verified its own files in it (sizes and
    checksums). A checkpoint that does not verify is named with its problems in one ``note`` line and the next
    newest is tried; raises TrainCheckpointError when checkpoints exist and none verifies. Rank 0 first removes
    partial saves and step directories without a completion marker."""
    root = Path(root)
    found: list[str] | Exception = []
    if dist.is_main():
        try:
            found = [str(p) for p in _candidates(root, resume, note)]
            remove_stale(root, note)
        except Exception as exc:  # raised on every rank below
            found = exc
    found = dist.broadcast_object(found)
    if isinstance(found, Exception):
        raise found
    failed = []
    for c in map(Path, found):
        problems = _verify_everywhere(c)
        if not problems:
            if failed:
                note(f"resuming from {c.name}, the newest checkpoint that verifies")
            return c
        note(f"checkpoint {c.name} does not verify, skipped: {'; '.join(problems)}")
        failed.append(f"{c.name}: {'; '.join(problems)}")
    if failed:
        raise _none_verifies(root if resume == "auto" else resume, failed)
    return None


def read_shared(path: Path) -> dict:
    """The trainer state every rank shares (step, method state, teacher fingerprint, ...), without the engines."""
    return _torch_load(Path(path) / SHARED)


def _torch_load(f: Path):
    if not f.is_file():
        raise TrainCheckpointError(f"{f} is missing")
    try:
        return safe_load.load(f)  # weights only: a crafted file cannot run code
    except safe_load.UnsafeFileError as exc:
        raise TrainCheckpointError(str(exc)) from None
    except Exception as exc:
        raise TrainCheckpointError(f"{f} cannot be read ({exc.__class__.__name__}: {exc})") from None


def load(path: Path, engines: dict) -> tuple[dict, dict]:
    """Collective: load engine states; return (shared_state, this rank's state). ``path`` comes from
    :func:`select` (verified); every failure here still names the file or directory."""
    path = Path(path)
    for tag, engine in engines.items():
        try:
            with safe_load.deepspeed_loads():  # DeepSpeed's own torch.load calls become weights-only
                load_path, _ = engine.load_checkpoint(str(path), tag=tag)
        except safe_load.UnsafeFileError as exc:
            raise TrainCheckpointError(str(exc)) from None
        except Exception as exc:
            raise TrainCheckpointError(
                f"cannot load the {tag} engine state from {path / tag} ({exc.__class__.__name__}: {exc})"
            ) from exc
        if load_path is None:
            raise TrainCheckpointError(f"cannot load the {tag} engine state: {path / tag} holds none")
    return read_shared(path), _torch_load(rank_file(path, dist.rank()))


def finished(root: Path, resume: str, max_steps: int) -> dict | None:
    """The shared state of the checkpoint a run would resume from when it already reached ``max_steps`` (a re-run of
    a finished job has nothing to train), else None. Reads small files only: nothing is built or loaded."""
    path = find_resume(root, resume)
    if path is None:
        return None
    shared = read_shared(path)
    return shared if int(shared["step"]) >= max_steps else None


def check_sequence_degree(root: Path, resume: str, degree: int) -> None:
    """A run resumes with the sequence-parallel degree it was written with: each rank's data position and noise
    generator follow its data-parallel rank, which the degree decides. Checked before any model is built."""
    check_meta(
        root, resume, "sequence_parallel", degree, "parallel.sequence_parallel", default=1,
        why="the ranks' data positions and noise follow the sequence-parallel groups",
    )  # fmt: skip


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


def check_meta(root: Path, resume: str, key: str, value, config_key: str, default=None, why: str = "") -> None:
    """A run resumes only with the setting ``value`` its checkpoint recorded under ``key`` (missing: ``default``),
    e.g. ``model.lora``: adapters of one rank and targets do not load into another's, nor into full weights. Checked
    before any model is built; a mismatch is a ConfigError naming ``config_key``, both values and ``why``."""
    path = find_resume(root, resume)
    if path is None:
        return
    saved = read_shared(path).get(key, default)
    if saved != value:
        raise ConfigError(
            f"config key `{config_key}`: {value}, but {path} was written with {saved}"
            + (f" ({why})" if why else "")
            + f"; resume with {config_key} = {saved}, or start a new logging.run_dir"
        )
