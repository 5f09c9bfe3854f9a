"""Tiny toy-world models for the generation tests: a random DiT with the toy preset (in_dim 16 = the toy codec's
channels, text_dim 32 = the toy text encoder's width) and a random interpolation U-Net, saved as a deployment
directory (``<deploy>/transformer`` + ``<deploy>/interpolator``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.config import load_config, model_preset
from engine.models.checkpoint import save_weights
from engine.models.interp_unet import InterpUNet, save_interpolator
from engine.models.wan import WanModel

ROOT = Path(__file__).resolve().parents[2]
TOY_YAML = ROOT / "configs" / "toy.yaml"


def toy_config(*overrides: str):
    return load_config(TOY_YAML, list(overrides))


def save_student(path: Path, seed: int = 0, **overrides) -> Path:
    """A random toy-preset DiT (1.25 M parameters; torch's default init: the head is not zero), diffusers layout."""
    torch.manual_seed(seed)
    cfg = model_preset("toy", **overrides)  # dim 128, 4 layers (1.3B: 1536, 30)
    save_weights(WanModel(cfg), cfg, path)
    return path


def save_interp(path: Path, in_channels: int = 16, seed: int = 1) -> Path:
    """A random interpolator (not residual: an untrained residual net would be exactly the linear blend)."""
    torch.manual_seed(seed)
    return save_interpolator(InterpUNet(in_channels, (4, 8, 8), residual=False), path)  # (64, 128, 256) by default


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Where the trainers would leave their outputs: a student export and an interpolator run directory."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "student": save_student(root / "distill" / "export" / "transformer"),
        "interp_run": save_interp(root / "interp" / "interpolator").parent,
        "teacher": save_student(root / "teacher" / "transformer", seed=7),
    }


@pytest.fixture(scope="session")
def deploy(tmp_path_factory, trained) -> Path:
    """A deployment directory assembled by the export CLI (student + interpolator)."""
    from launcher import export as export_cli

    out = tmp_path_factory.mktemp("deploy") / "toy"
    assert export_cli.main(["--checkpoint", str(trained["student"]), "--interpolator", str(trained["interp_run"]),
                            "--out", str(out)]) == 0  # fmt: skip
    return out


@pytest.fixture
def corrupt_deploy(tmp_path, deploy) -> Path:
    """A copy of the deployment directory whose weight files are garbage (their config.json files are intact)."""
    out = tmp_path / "corrupt"
    shutil.copytree(deploy, out)
    for file in out.rglob("*.safetensors"):
        file.write_bytes(b"\x00not a safetensors file" * 64)
    return out
