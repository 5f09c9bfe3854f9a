"""Deployment directories: a distilled student (diffusers layout) with its interpolator next to it.

    <deploy>/transformer/     the generator, consolidated (WanTransformer3DModel loads it); its EMA if the run kept one
    <deploy>/transformer_raw/ the trained generator beside its EMA (runs with ``method.ema``)
    <deploy>/interpolator/    the frame-interpolation U-Net (safetensors + config.json)

The student comes from a trainer step directory (the generator's ZeRO partitions, consolidated with DeepSpeed's
zero_to_fp32) or from any DiT checkpoint; names, shapes and channel counts are checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ConfigError, ModelConfig, load_config
from engine.models.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    read_model_config,
    save_weights,
    weight_files,
)
from engine.models.interp_unet import (
    check_channels,
    load_interpolator,
    read_interpolator_config,
    save_interpolator,
)
from engine.models.wan import build_model


def is_trainer_checkpoint(path: Path) -> bool:
    """A distillation step directory: ``generator/`` holding DeepSpeed model states."""
    return (path / "generator").is_dir()


def trainer_model_config(step_dir: Path, run_config: str | Path | None = None) -> ModelConfig:
    """The generator's architecture from the run's resolved config (``<run>/config.yaml``, written by the trainer)."""
    if not any((step_dir / "generator").glob("*model_states.pt")):
        raise CheckpointError(f"{step_dir / 'generator'} holds no DeepSpeed *model_states.pt")
    path = Path(run_config) if run_config else step_dir.resolve().parent.parent / "config.yaml"
    try:
        return load_config(path).model
    except ConfigError as exc:
        raise CheckpointError(f"the run config of {step_dir} ({path}): {exc}") from exc


def deploy_root(student: str | Path) -> Path:
    """The deployment directory of a student path: a root holding transformer/, or the parent of the weights."""
    p = Path(student)
    if p.is_dir() and ((p / "transformer").is_dir() or is_trainer_checkpoint(p)):
        return p
    return p.parent if p.is_dir() else p.parent.parent


def zero_state(step_dir: Path, role: str = "generator", lazy: bool = True) -> dict:
    """The consolidated fp32 state of a role from ZeRO partitions (lazy: tensors gathered on ``.contiguous()``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=role, lazy_mode=lazy)


def ema_state(step_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The generator EMA of a trainer step directory, whole, or None when the run kept none (``method.ema``). Each
    rank's trainer file holds its part: under ZeRO-3 its partition of every parameter (the flattened parameter padded
    to a multiple of the world size, rank r holding the r-th slice), so the parts in rank order concatenate to the
    parameter; at stages 0-2 every rank holds it whole."""
    files = sorted((step_dir / "trainer").glob("rank_*.pt"))
    parts = [torch.load(f, weights_only=True, mmap=True)["method"].get("generator_ema") for f in files]
    if not parts or parts[0] is None:
        return None
    shapes = {k: v.shape for k, v in build_model(cfg, device="meta").state_dict().items()}
    out = {}
    for name, first in parts[0].items():
        shape = shapes.get(name, first.shape)
        if tuple(first.shape) == tuple(shape):
            out[name] = first
        else:
            out[name] = torch.cat([part[name].flatten() for part in parts])[: shape.numel()].view(shape)
    return out


def check_state(state: dict, cfg: ModelConfig, where: Path) -> None:
    """Names and shapes of an official-named state dict against the architecture (built on the meta device)."""
    expected = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    bad = [f"{k} {got[k]} != {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    if missing or unexpected or bad:
        raise CheckpointError(f"{where}: missing {missing[:10]}, unexpected {unexpected[:10]}, shapes {bad[:5]}")


class _Materialized:
    """``items()`` of a lazy ZeRO state dict, one tensor gathered at a time (what ``save_weights`` iterates)."""

    def __init__(self, state: dict, dtype: torch.dtype):
        self.state, self.dtype = state, dtype

    def items(self):
        for name, lazy in self.state.items():
            yield name, lazy.contiguous().to(self.dtype)


def interpolator_dir(src: str | Path) -> Path:
    """An interpolator export, or a run/step directory holding one as ``interpolator/``."""
    src = Path(src)
    if not (src / "config.json").is_file() and (src / "interpolator").is_dir():
        return src / "interpolator"
    return src


def _architecture(src: Path, run_config: str | Path | None) -> ModelConfig:
    if not src.exists():
        raise CheckpointError(f"checkpoint not found: {src}")
    return trainer_model_config(src, run_config) if is_trainer_checkpoint(src) else read_model_config(src)


def export_student(
    src: str | Path,
    deploy_dir: str | Path,
    *,
    run_config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write ``<deploy_dir>/transformer`` (diffusers layout) from a trainer step directory (the generator's ZeRO
    partitions, consolidated by DeepSpeed's zero_to_fp32, cast to ``dtype``) or from any DiT checkpoint (converted,
    dtypes kept). Names and shapes are checked against the architecture before anything is written. A run that kept
    a generator EMA exports the EMA as the student and the trained weights as ``<deploy_dir>/transformer_raw``."""
    src, out = Path(src), Path(deploy_dir) / "transformer"
    model_cfg = _architecture(src, run_config)
    if not is_trainer_checkpoint(src):
        convert_checkpoint(src, out, "diffusers", max_shard_bytes=max_shard_bytes)
        return out
    state = zero_state(src)
    check_state(state, model_cfg, src)
    ema = ema_state(src, model_cfg)
    if ema is not None:
        check_state(ema, model_cfg, src / "trainer")
        raw = Path(deploy_dir) / "transformer_raw"
        save_weights(_Materialized(state, dtype), model_cfg, raw, max_shard_bytes=max_shard_bytes)
        state = ema
    return save_weights(_Materialized(state, dtype), model_cfg, out, max_shard_bytes=max_shard_bytes)


def export_interpolator(src: str | Path, deploy_dir: str | Path) -> Path:
    """Validate a trained interpolator (keys, shapes, channels against a student already in ``deploy_dir``) and save
    it as ``<deploy_dir>/interpolator``."""
    src, out = interpolator_dir(src), Path(deploy_dir) / "interpolator"
    config = read_interpolator_config(src)
    if (Path(deploy_dir) / "transformer").is_dir():
        check_channels(config["in_channels"], read_model_config(Path(deploy_dir) / "transformer").in_dim)
    if out.resolve() == src.resolve():
        return out
    return save_interpolator(load_interpolator(src), out)


def export_deploy(
    deploy_dir: str | Path,
    *,
    student: str | Path | None = None,
    interpolator: str | Path | None = None,
    run_config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Check both parts from their configs (architecture, interpolator config, channel counts), then write them.
    Returns what the directory holds."""
    if student is not None:
        in_dim = _architecture(Path(student), run_config).in_dim
        if interpolator is not None:
            check_channels(read_interpolator_config(interpolator_dir(interpolator))["in_channels"], in_dim)
        export_student(student, deploy_dir, run_config=run_config, dtype=dtype)
    if interpolator is not None:
        export_interpolator(interpolator, deploy_dir)
    return describe_deploy(deploy_dir)


def describe_deploy(deploy_dir: str | Path) -> dict:
    """Files and sizes of a deployment directory's student, and its interpolator's config."""
    root, info = Path(deploy_dir), {"transformer": None, "interpolator": None}
    if (root / "transformer").is_dir():
        files = weight_files(root / "transformer")
        info["transformer"] = {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files)}
    if (root / "interpolator").is_dir():
        info["interpolator"] = read_interpolator_config(root / "interpolator")
    return info
