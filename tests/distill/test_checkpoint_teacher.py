"""A run resumes only against the teacher it was distilled from (checked from the checkpoint's trainer state)."""

import pytest
import torch

from engine.config import ConfigError
from engine.train import checkpoint as ckpt


def _fake_checkpoint(root, step, teacher):
    path = root / ckpt.step_name(step)
    (path / "trainer").mkdir(parents=True)
    torch.save({"step": step, "teacher": teacher}, path / "trainer" / "shared.pt")
    ckpt.write_manifest(path, [path / "trainer" / "shared.pt"], step=step)
    (path / ckpt.COMPLETE).write_text(f"{step}\n")
    (root / "latest").write_text(path.name + "\n")
    return path


def test_resume_against_another_teacher_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.check_teacher(root, "auto", "aaaa", "t")  # nothing to resume: nothing to check
    _fake_checkpoint(root, 6, "aaaa")
    ckpt.check_teacher(root, "auto", "aaaa", "t")  # same teacher
    ckpt.check_teacher(root, "never", "bbbb", "t")  # not resuming
    with pytest.raises(ConfigError, match=r"`model\.checkpoint`.*fingerprint aaaa.*teacher/dir holds now \(bbbb\)"):
        ckpt.check_teacher(root, "auto", "bbbb", "teacher/dir")
    old = _fake_checkpoint(tmp_path / "old", 3, None)  # written before fingerprints existed: not checked
    ckpt.check_teacher(tmp_path / "old", str(old), "bbbb", "t")


def test_resume_from_an_incomplete_directory_names_the_key(tmp_path):
    (tmp_path / "step_00000004").mkdir()
    with pytest.raises(ConfigError, match=r"`checkpoint\.resume`.*not a complete checkpoint"):
        ckpt.check_teacher(tmp_path, str(tmp_path / "step_00000004"), "aaaa", "t")
