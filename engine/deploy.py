"""Deployment directories: a distilled student (diffusers layout) with its interpolator next to it.

    <deploy>/transformer/     the generator, consolidated (WanTransformer3DModel loads it); its EMA if the run kept one
    <deploy>/transformer_raw/ the trained generator beside its EMA (runs with ``method.ema``)
    <deploy>/interpolator/    the frame-interpolation U-Net (safetensors + config.json)

The student comes from a trainer step directory (the generator's ZeRO partitions, consolidated with DeepSpeed's
zero_to_fp32, its file reads made weights-only: engine/safe_load.py) or from any DiT checkpoint; names, shapes and
channel counts are checked before anything is written.

The other formats users deploy (docs/deploy.md): the directory completed into a diffusers WanPipeline
(``export_pipeline``), the student as one official-key safetensors file, optionally scaled fp8
(``export_single_file``), and a LoRA of the student over its teacher (``export_lora``); ``--merge-lora`` merges one
back into a model (``student_tensors(..., lora=)``). A step directory of a LoRA-trained run (``model.lora``) holds the
frozen base and the adapters under peft's names: every export of it is the merged student (``official_source``), and
``export_trained_lora`` writes its adapters as they are.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine import safe_load
from engine.config import ARCH_FIELDS, ConfigError, ModelConfig, RunConfig, load_config
from engine.fsutil import atomic_write_text
from engine.models.adapters import adapter_layers, merged_source, parameter_shapes
from engine.models.checkpoint import (
    CheckpointError,
    checkpoint_keys,
    convert_checkpoint,
    detect_layout,
    is_block_linear,
    read_model_config,
    save_weights,
    tensor_getter,
    to_official_key,
    weight_files,
)
from engine.models.interp_unet import (
    check_channels,
    load_interpolator,
    read_interpolator_config,
    save_interpolator,
)
from engine.models.lora import LAYOUTS as LORA_LAYOUTS
from engine.models.lora import extract_lora, merge_lora, read_lora, save_lora
from engine.models.single_file import save_single_file
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

    try:
        with safe_load.deepspeed_loads():  # zero_to_fp32's torch.load calls become weights-only
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=role, lazy_mode=lazy)
    except safe_load.UnsafeFileError as exc:
        raise CheckpointError(str(exc)) from None


def ema_state(step_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The generator EMA of a trainer step directory, whole, or None when the run kept none (``method.ema``). Each
    rank's trainer file holds its part: under ZeRO-3 its partition of every parameter (the flattened parameter padded
    to a multiple of the world size, rank r holding the r-th slice), so the parts in rank order concatenate to the
    parameter; at stages 0-2 every rank holds it whole."""
    files = sorted((step_dir / "trainer").glob("rank_*.pt"))
    parts = [torch.load(f, weights_only=True, mmap=True)["method"].get("generator_ema") for f in files]
    if not parts or parts[0] is None:
        return None
    shapes = {k: torch.Size(v) for k, v in parameter_shapes(cfg)[0].items()}
    out = {}
    for name, first in parts[0].items():
        shape = shapes.get(name, first.shape)
        if tuple(first.shape) == tuple(shape):
            out[name] = first
        else:
            out[name] = torch.cat([part[name].flatten() for part in parts])[: shape.numel()].view(shape)
    return out


def check_state(state: dict, cfg: ModelConfig, where: Path, trained_only: bool = False) -> None:
    """Names and shapes of a state dict against the model a run with ``cfg`` trains (from the DiT on the meta device:
    official names, or under ``model.lora`` the DiT with its adapters, peft's names); ``trained_only``: its trained
    parameters alone (what the generator EMA holds)."""
    shapes, trained = parameter_shapes(cfg)
    expected = {k: v for k, v in shapes.items() if not trained_only or k in trained}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    bad = [f"{k} {got[k]} != {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    if missing or unexpected or bad:
        lora = f"model.lora.rank {cfg.lora.rank}" if cfg.lora.enabled else "full weights, model.lora.rank 0"
        raise CheckpointError(
            f"{where}: does not fit the configured model ({cfg.num_layers} blocks of dim {cfg.dim}, {lora}): "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}, shapes (got != expected) {bad[:5]}"
        )


def official_source(cfg: ModelConfig, names: list[str], get: Callable) -> tuple[list[str], Callable]:
    """The official names and a name -> tensor getter of a trained model's parameters (``names``, ``get``); those
    of a LoRA-trained one merged: W + alpha / r B A (engine/models/adapters.py)."""
    if not cfg.lora.enabled:
        return names, get
    return merged_source(names, get, cfg.lora.scale)


class _Pairs:
    """``items()`` over (name, tensor) pairs, cast to ``dtype`` one at a time (what ``save_weights`` iterates)."""

    def __init__(self, named: Iterator, dtype: torch.dtype):
        self.named, self.dtype = named, dtype

    def items(self):
        for name, tensor in self.named:
            yield name, tensor.to(self.dtype)


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
    lora: str | Path | None = None,
) -> Path:
    """Write ``<deploy_dir>/transformer`` (diffusers layout) from a trainer step directory (the generator's ZeRO
    partitions, consolidated by DeepSpeed's zero_to_fp32, cast to ``dtype``) or from any DiT checkpoint (converted,
    dtypes kept). Names and shapes are checked against the architecture before anything is written. ``lora``: a LoRA
    file merged in first (then cast to ``dtype``). A run that kept a generator EMA exports the EMA as the student and
    the trained weights as ``<deploy_dir>/transformer_raw``."""
    src, out = Path(src), Path(deploy_dir) / "transformer"
    model_cfg = _architecture(src, run_config)
    if lora is not None:
        cfg, named = student_tensors(src, run_config, lora)
        return save_weights(_Pairs(named, dtype), cfg, out, max_shard_bytes=max_shard_bytes)
    if not is_trainer_checkpoint(src):
        convert_checkpoint(src, out, "diffusers", max_shard_bytes=max_shard_bytes)
        return out
    state = zero_state(src)
    check_state(state, model_cfg, src)
    get = lambda name: state[name].contiguous()  # noqa: E731 (one tensor gathered at a time)
    ema = ema_state(src, model_cfg)
    if ema is not None:
        check_state(ema, model_cfg, src / "trainer", trained_only=True)
        raw = Path(deploy_dir) / "transformer_raw"
        names, raw_get = official_source(model_cfg, list(state), get)
        save_weights(_Pairs(((n, raw_get(n)) for n in names), dtype), model_cfg, raw, max_shard_bytes=max_shard_bytes)
        get = lambda name: ema[name] if name in ema else state[name].contiguous()  # noqa: E731 (frozen: as trained)
    names, get = official_source(model_cfg, list(state), get)
    return save_weights(_Pairs(((n, get(n)) for n in names), dtype), model_cfg, out, max_shard_bytes=max_shard_bytes)


def _checked_source(src: Path, run_config: str | Path | None) -> tuple[ModelConfig, list[str], Callable]:
    """Architecture, official names and a name -> tensor getter of a trainer step directory (ZeRO partitions,
    consolidated lazily) or a DiT checkpoint (either layout, scaled fp8 dequantized); names and shapes checked
    against the architecture before any tensor is read."""
    cfg = _architecture(src, run_config)
    if is_trainer_checkpoint(src):
        state = zero_state(src)
        check_state(state, cfg, src)
        return cfg, *official_source(cfg, list(state), lambda name: state[name].contiguous())
    keys = checkpoint_keys(src)
    layout = detect_layout(keys)
    unknown = [k for k in keys if to_official_key(k, layout) is None]
    if unknown:
        raise CheckpointError(f"{src}: keys that are not part of a Wan2.1 T2V DiT ({len(unknown)}): {unknown[:10]}")
    shapes = {}
    for file in weight_files(src):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({to_official_key(k, layout): f.get_slice(k).get_shape() for k in keys if k in f.keys()})  # noqa: SIM118
    check_state({k: torch.empty(v, device="meta") for k, v in shapes.items()}, cfg, src)
    return cfg, list(shapes), tensor_getter(src, layout)


def student_tensors(
    src: str | Path, run_config: str | Path | None = None, lora: str | Path | None = None
) -> tuple[ModelConfig, Iterator]:
    """The architecture of a student and its (official name, tensor) pairs, one tensor at a time (see
    ``_checked_source``); with ``lora`` (a LoRA file in either layout) merged in, its layers checked first."""
    cfg, names, get = _checked_source(Path(src), run_config)
    named = ((name, get(name)) for name in names)
    if lora is None:
        return cfg, named
    layers = read_lora(lora)
    check_lora(layers, cfg, lora)
    return cfg, merge_lora(named, layers, lora)


def _same_architecture(a: ModelConfig, b: ModelConfig, what: str) -> None:
    for f in ARCH_FIELDS:
        if getattr(a, f) != getattr(b, f):
            raise CheckpointError(f"{what}: model.{f} is {getattr(b, f)}, the student's is {getattr(a, f)}")


def check_lora(layers: dict, cfg: ModelConfig, where: str | Path) -> None:
    """Every LoRA layer against the architecture's linear layers (built on the meta device), before any merge."""
    shapes = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    for layer, a in sorted(layers.items()):
        want = shapes.get(layer + ".weight")
        if want is None or len(want) != 2:
            raise CheckpointError(f"{where}: LoRA layer {layer} is not a linear layer of this model "
                                  f"({cfg.num_layers} blocks): a LoRA of another architecture")  # fmt: skip
        if a.up.shape[0] != want[0] or a.down.shape[1] != want[1]:
            raise CheckpointError(
                f"{where}: LoRA layer {layer} has up {tuple(a.up.shape)} and down {tuple(a.down.shape)}; the "
                f"model's weight is {want}, expected up ({want[0]}, r) and down (r, {want[1]}): a LoRA of another "
                "architecture"
            )


def export_lora(
    student: str | Path,
    teacher: str | Path,
    path: str | Path,
    rank: int,
    *,
    layout: str = "comfy",
    dtype: torch.dtype = torch.bfloat16,
    run_config: str | Path | None = None,
) -> dict:
    """Extract a rank-``rank`` LoRA of ``student`` over ``teacher`` (engine.models.lora), write it in ``layout`` with
    ``<path>.report.json`` (per-layer reconstruction error); returns the report."""
    if layout not in LORA_LAYOUTS:
        raise CheckpointError(f"--lora-format {layout!r}: expected one of {LORA_LAYOUTS}")
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(f"--lora: {path} must end in .safetensors")
    cfg, names, get_student = _checked_source(Path(student), run_config)
    tcfg, _, get_teacher = _checked_source(Path(teacher), None)
    _same_architecture(cfg, tcfg, f"--teacher {teacher}")
    for name, meta in build_model(cfg, device="meta").state_dict().items():  # the rank, before any SVD
        out_dim, in_dim = meta.shape[0], meta.shape[-1]
        if name.endswith(".weight") and is_block_linear(name[: -len(".weight")]) and rank > min(out_dim, in_dim):
            raise CheckpointError(f"--rank {rank}: layer {name} is {out_dim} x {in_dim}; the rank must be at most "
                                  f"{min(out_dim, in_dim)}")  # fmt: skip
    extraction = extract_lora(((n, get_student(n)) for n in names), get_teacher, rank)
    extraction.report.update(student=str(student), teacher=str(teacher), layout=layout)
    save_lora(extraction.layers, path, layout, dtype, extraction.report)
    return extraction.report


def export_trained_lora(
    src: str | Path,
    path: str | Path,
    *,
    layout: str = "comfy",
    dtype: torch.dtype = torch.bfloat16,
    run_config: str | Path | None = None,
    rank: int | None = None,
) -> dict:
    """The adapters of a LoRA-trained run's trainer checkpoint (``model.lora``), written as they are (no SVD) as a
    LoRA file in ``layout``, with ``<path>.report.json``; the generator EMA's adapters when the run kept one (the
    student ``export_student`` writes). Returns the report."""
    if layout not in LORA_LAYOUTS:
        raise CheckpointError(f"--lora-format {layout!r}: expected one of {LORA_LAYOUTS}")
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(f"--lora: {path} must end in .safetensors")
    src = Path(src)
    cfg = _architecture(src, run_config)
    if not (is_trainer_checkpoint(src) and cfg.lora.enabled):
        raise CheckpointError(
            f"--lora without --teacher writes the trained adapters of a LoRA run; {src} is not a trainer checkpoint "
            "of one (model.lora.rank > 0): give --teacher and --rank to extract a LoRA by SVD"
        )
    if rank is not None and rank != cfg.lora.rank:
        raise CheckpointError(
            f"--rank {rank}: the adapters of {src} have rank {cfg.lora.rank} (model.lora.rank); omit --rank to write "
            "them as trained, or give --teacher to extract a LoRA of another rank by SVD"
        )
    state = zero_state(src)
    check_state(state, cfg, src)
    ema = ema_state(src, cfg)
    if ema is not None:
        check_state(ema, cfg, src / "trainer", trained_only=True)
    source = state if ema is None else ema
    layers = adapter_layers(list(state), lambda name: source[name].contiguous(), cfg.lora.scale)
    report = {"rank": cfg.lora.rank, "alpha": cfg.lora.rank * cfg.lora.scale, "layout": layout, "student": str(src),
              "ema": ema is not None, "layers": sorted(layers)}  # fmt: skip
    save_lora(layers, path, layout, dtype, report)
    return report


def export_single_file(
    src: str | Path,
    path: str | Path,
    *,
    run_config: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    lora: str | Path | None = None,
) -> Path:
    """The student as one safetensors file in the official key layout (ComfyUI's diffusion-model loader), cast to
    ``dtype``; with ``fp8`` the blocks' linear weights in scaled float8_e4m3fn (engine.models.single_file); with
    ``lora`` that LoRA merged in first."""
    cfg, named = student_tensors(src, run_config, lora)
    return save_single_file(named, cfg, path, dtype, fp8)


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
    lora: str | Path | None = None,
) -> dict:
    """Check both parts from their configs (architecture, interpolator config, channel counts), then write them.
    Returns what the directory holds."""
    if student is not None:
        in_dim = _architecture(Path(student), run_config).in_dim
        if interpolator is not None:
            check_channels(read_interpolator_config(interpolator_dir(interpolator))["in_channels"], in_dim)
        export_student(student, deploy_dir, run_config=run_config, dtype=dtype, lora=lora)
    if interpolator is not None:
        export_interpolator(interpolator, deploy_dir)
    return describe_deploy(deploy_dir)


# <pipeline>/scheduler/vidistill_scheduler.py is a copy of engine/diffusion/student_scheduler.py
SCHEDULER_MODULE = "vidistill_scheduler"
SCHEDULER_CLASS = "VidistillStudentScheduler"


def pipeline_run_config(student: str | Path | None, run_config: str | Path | None) -> RunConfig:
    """The run config a pipeline export reads (its VAE, text encoder and student timesteps): ``--config``, or the
    trainer checkpoint's ``<run>/config.yaml``. Its Wan world paths must exist."""
    if run_config is None and student is not None and is_trainer_checkpoint(Path(student)):
        run_config = Path(student).resolve().parent.parent / "config.yaml"
    if run_config is None:
        raise CheckpointError("--pipeline needs the run config (--config): its vae.path, text_encoder.path and "
                              "diffusion.student_timesteps go into the pipeline")  # fmt: skip
    try:
        cfg = load_config(run_config)
    except ConfigError as exc:
        raise CheckpointError(f"--pipeline: the run config {run_config}: {exc}") from exc
    for key, kind, want in (("vae", cfg.vae.kind, "wan"), ("text_encoder", cfg.text_encoder.kind, "umt5")):
        if kind != want:
            raise CheckpointError(f"--pipeline: config key `{key}.kind` is {kind!r}; a diffusers WanPipeline needs "
                                  f"{want}")  # fmt: skip
    for key, value in (("vae.path", cfg.vae.path), ("text_encoder.path", cfg.text_encoder.path)):
        if not value or not Path(value).exists():
            raise CheckpointError(f"--pipeline: config key `{key}`: {value!r} does not exist")
    return cfg


def _copy_files(src: Path, dst: Path) -> None:
    """The files (not the subdirectories) of ``src`` into a fresh ``dst``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def export_pipeline(deploy_dir: str | Path, cfg: RunConfig) -> Path:
    """Complete ``<deploy_dir>`` (which holds ``transformer/``) into a diffusers WanPipeline directory: the VAE
    (copied, or converted from the official .pth), the umT5 encoder and tokenizer (copied), the student scheduler
    (its code and config with ``diffusion.student_timesteps``) and ``model_index.json``, written last."""
    from diffusers import __version__ as diffusers_version
    from transformers import AutoTokenizer

    from engine.data.text import _locate
    from engine.data.vae import load_official_vae

    root = Path(deploy_dir)
    if not (root / "transformer" / "config.json").is_file():
        raise CheckpointError(f"{root}: no transformer/ to build a pipeline around (export the student first)")
    vae = Path(cfg.vae.path)
    if vae.is_dir():
        _copy_files(vae / "vae" if (vae / "vae" / "config.json").is_file() else vae, root / "vae")
    else:
        load_official_vae(str(vae)).save_pretrained(root / "vae")
    enc_dir, tok_dir = _locate(Path(cfg.text_encoder.path))
    _copy_files(enc_dir, root / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    tokenizer.save_pretrained(root / "tokenizer")
    sched = root / "scheduler"
    sched.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__).parent / "diffusion" / "student_scheduler.py", sched / f"{SCHEDULER_MODULE}.py")
    d = cfg.diffusion
    sched_config = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": diffusers_version,
                    "num_train_timesteps": d.num_train_timesteps, "shift": 1.0,
                    "student_timesteps": [float(t) for t in d.student_timesteps]}  # fmt: skip
    atomic_write_text(sched / "scheduler_config.json", json.dumps(sched_config, indent=2))
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers_version,
        "boundary_ratio": None,
        "expand_timesteps": False,
        "scheduler": [SCHEDULER_MODULE, SCHEDULER_CLASS],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    atomic_write_text(root / "model_index.json", json.dumps(index, indent=2))
    return root


def describe_deploy(deploy_dir: str | Path) -> dict:
    """Files and sizes of a deployment directory's student, and its interpolator's config."""
    root, info = Path(deploy_dir), {"transformer": None, "interpolator": None}
    if (root / "transformer").is_dir():
        files = weight_files(root / "transformer")
        info["transformer"] = {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files)}
    if (root / "interpolator").is_dir():
        info["interpolator"] = read_interpolator_config(root / "interpolator")
    return info
