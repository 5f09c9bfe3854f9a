"""engine.fsutil: atomic writes whose files get the umask's mode (mkstemp and safetensors would leave 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import fsutil


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert fsutil.current_umask() == mask
    text = fsutil.atomic_write_text(tmp_path / "a" / "index.json", '{"k": 1}')
    data = fsutil.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    tensors = fsutil.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.ones(2)}, str(tmp)))
    pt = fsutil.atomic_write(tmp_path / "s.pt", lambda tmp: torch.save({"step": 3}, tmp))
    for path in (text, data, tensors, pt):
        assert _mode(path) == mode, path
    assert text.read_text() == '{"k": 1}' and data.read_bytes() == b"\x00\x01"
    assert torch.equal(load_file(str(tensors))["x"], torch.ones(2))
    assert torch.load(pt) == {"step": 3}
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_safetensors_alone_would_write_0600(tmp_path, umask):
    """Why fix_mode exists (safetensors 0.8): if this starts failing, safetensors honours the umask by itself."""
    save_file({"x": torch.ones(1)}, str(tmp_path / "raw.safetensors"))
    assert _mode(tmp_path / "raw.safetensors") == 0o600
    fsutil.fix_mode(tmp_path / "raw.safetensors")
    assert _mode(tmp_path / "raw.safetensors") == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = fsutil.atomic_write_text(tmp_path / "manifest.jsonl", "old\n")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fsutil.atomic_write(target, broken)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.jsonl"]


def test_fsync_and_replace(tmp_path):
    target = tmp_path / "latest"
    fsutil.atomic_write_text(target, "step_1\n", fsync=True)
    fsutil.atomic_write_text(target, "step_2\n", fsync=True)
    assert target.read_text() == "step_2\n"


def test_temp_names_do_not_look_like_the_real_file(tmp_path):
    seen = []
    fsutil.atomic_write(tmp_path / "shard-00000.safetensors", lambda tmp: seen.append(tmp) or tmp.write_bytes(b""))
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith("shard-00000.safetensors.") and tmp.suffix == ".tmp"
