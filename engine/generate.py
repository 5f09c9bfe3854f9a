"""Text-to-video generation with the distilled student (4 steps, optionally VIF) or the teacher (Euler + CFG), and the
deployment directory generation reads:

    <deploy>/transformer/    the student DiT in the diffusers layout (safetensors + config.json)
    <deploy>/interpolator/   the frame-interpolation U-Net (model.safetensors + config.json)

``--student <deploy>/transformer`` (or ``<deploy>``) finds ``<deploy>/interpolator`` when no interpolator is named.
The student may also be a trainer checkpoint (``<run>/checkpoints/step_N``, DeepSpeed ZeRO partitions), consolidated
with DeepSpeed's ``zero_to_fp32``; ``export_student`` writes one as a deployment directory.

Order of work: ``plan_generation`` runs every check that needs only sizes (prompts, paths, the config.json of the DiT
and of the interpolator, the latent frame count, the world) before any weight is read; ``Generator`` then loads the
text encoder, the codec, the DiT and the interpolator once and generates batch after batch.

Several ranks: ``torchrun --nproc_per_node N launcher/generate.py ...`` splits every video's tokens over groups of
``parallel.sequence_parallel`` ranks (Ulysses sequence parallelism; 1, the default, means all N ranks in one group);
several groups take the batches in turn. Every rank loads the whole DiT; the first rank of each group writes its
group's files.

Determinism: every random draw of a video (its initial noise and each re-noise of the student schedule) comes from its
own CPU generator seeded with its seed, so a (prompt, seed) pair gives the same video whatever batch it lands in. The
library samplers (``sample_student``, ``sample_vif``) draw a whole batch from one generator; the rollouts below are the
same algorithms with one generator per sample, and agree with them exactly at batch size 1 (tests/generate).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError

from engine.config import ConfigError, ModelConfig, RunConfig, replace, resolve_dtype
from engine.console import progress
from engine.data.mp4 import to_frames, write_mp4, write_sidecar
from engine.deploy import (
    check_state,
    deploy_root,
    is_trainer_checkpoint,
    official_source,
    trainer_model_config,
    zero_state,
)
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import SampleNoise, sample_student, sample_teacher
from engine.diffusion.vif import check_vif, sample_vif
from engine.models.checkpoint import (
    CheckpointError,
    load_weights,
    read_model_config,
)
from engine.models.interp_unet import (
    InterpolatorError,
    check_channels,
    load_interpolator,
    read_interpolator_config,
)
from engine.models.sequence_parallel import SequenceParallel
from engine.models.wan import WanModel, build_model
from engine.train import dist
from engine.train.timer import PhaseTimer
from engine.worlds import VIEW_SCALE, build_world, kind_of, world_latent_shape
from kernels._dispatch import kernel_mode

log = logging.getLogger("engine.generate")
SAMPLERS = ("student", "vif", "teacher")
RUNTIME_FIELDS = ("attention_backend", "fused_kernels", "compile")  # how the DiT runs: from the run config


class GenerateError(ValueError):
    """Input that cannot work, found before any weight is read. The message names the option or config key."""


@dataclass
class GenerateSettings:
    """One generation request (launcher/generate.py fills it from the command line)."""

    out_dir: str
    """Where the mp4 files and their JSON sidecars go."""
    student: Optional[str] = None
    """Student DiT: a diffusers/official checkpoint (dir or file), a deployment root, or a trainer step directory."""
    prompts: list[str] = field(default_factory=list)
    """Prompts given directly."""
    prompts_file: Optional[str] = None
    """A UTF-8 text file with one prompt per line (blank lines ignored)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Every prompt is generated once per seed."""
    batch_size: int = 4
    """Videos per forward batch."""
    sampler: str = "student"
    """student (few-step), vif (first steps at half frame rate + interpolator) or teacher (Euler + CFG)."""
    interpolator: Optional[str] = None
    """Interpolator export for vif (default: ``<deploy>/interpolator`` next to the student)."""
    teacher: Optional[str] = None
    """DiT for the teacher sampler (default: the run config's model.checkpoint)."""
    timesteps: Optional[list[float]] = None
    """Student timesteps (default: diffusion.student_timesteps)."""
    teacher_steps: Optional[int] = None
    """Euler steps of the teacher sampler (default: diffusion.teacher_steps)."""
    half_rate_steps: Optional[int] = None
    """VIF: student steps at half frame rate (default: interp.half_rate_steps)."""
    rope_positions: Optional[str] = None
    """VIF: RoPE frame positions of the half-rate steps (default: interp.rope_positions)."""
    device: Optional[str] = None
    """cuda when available, else cpu."""
    view_scale: Optional[int] = None
    """Pixel repeat of the written mp4 (default: 4 in the toy world, whose clips are 32x32; 1 for Wan)."""
    progress: bool = True
    """tqdm bar over batches."""


@dataclass(frozen=True)
class Job:
    """One video: the prompt's index in the request, the prompt and the seed."""

    index: int
    prompt: str
    seed: int

    def stem(self, width: int) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48].rstrip("-") or "prompt"
        return f"{self.index:0{width}d}_{slug}_seed{self.seed}"


@dataclass
class ModelSource:
    """A DiT to load: where, its architecture (+ the run config's runtime fields), whether it is ZeRO partitions."""

    path: Path
    cfg: ModelConfig
    zero: bool = False


@dataclass
class Plan:
    """Everything checked before loading: what runs, on which sizes, written where."""

    cfg: RunConfig  # with the request's overrides applied (validated)
    settings: GenerateSettings
    world: str  # toy | wan
    jobs: list[Job]
    model: ModelSource
    interpolator: Optional[Path]
    latent_shape: tuple[int, int, int, int]  # (C, F, H, W)
    view_scale: int
    ranks: int = 1  # processes of the launch (torchrun's WORLD_SIZE)
    sequence_parallel: int = 1  # ranks that split each video's tokens


# ---------------------------------------------------------------------------------------------------------------------
# Checks before anything is loaded
# ---------------------------------------------------------------------------------------------------------------------


def read_prompts(settings: GenerateSettings) -> list[str]:
    """The prompts of a request; an empty or missing file, or no prompt at all, is an error."""
    if settings.prompts and settings.prompts_file:
        raise GenerateError("give prompts with --prompt or in a --prompts file, not both")
    if settings.prompts_file:
        path = Path(settings.prompts_file)
        if not path.is_file():
            raise GenerateError(f"--prompts: {path} is not a file (expected one prompt per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise GenerateError(
                f"--prompts: {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at line {line}); "
                "save it as UTF-8"
            ) from None
        except OSError as exc:
            raise GenerateError(f"--prompts: {path} cannot be read ({exc.strerror or exc})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise GenerateError(f"--prompts: {path} holds no prompt (one prompt per line; blank lines are ignored)")
        return prompts
    if not settings.prompts:
        raise GenerateError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    if any(not p.strip() for p in settings.prompts):
        raise GenerateError("--prompt: empty prompt (the unconditional prompt is text_encoder.negative_prompt)")
    return [p.strip() for p in settings.prompts]


def world_of(cfg: RunConfig) -> str:
    """toy or wan (engine.worlds); the Wan world's weights must be local paths that exist."""
    try:
        kind = kind_of(cfg)
    except ConfigError as exc:
        raise GenerateError(str(exc)) from exc
    if kind == "wan":
        for key, value in (("vae.path", cfg.vae.path), ("text_encoder.path", cfg.text_encoder.path)):
            if not value or not Path(value).exists():
                raise GenerateError(f"config key `{key}`: {value!r} does not exist (the Wan world loads local weights)")
    return kind


def resolve_model(path: str | None, option: str, cfg: RunConfig, run_config: str | None = None) -> ModelSource:
    """Architecture of a DiT from its config alone, checked against the run config's latent and text sizes."""
    if not path:
        raise GenerateError(f"{option}: a DiT checkpoint is required")
    p = Path(path)
    if not p.exists():
        raise GenerateError(f"{option}: checkpoint not found: {p}")
    zero = is_trainer_checkpoint(p)
    try:
        arch = trainer_model_config(p, run_config) if zero else read_model_config(p)
    except (CheckpointError, ValueError, KeyError, TypeError) as exc:
        raise GenerateError(f"{option}: {p} is not a Wan DiT checkpoint: {exc}") from exc
    runtime = {f: getattr(cfg.model, f) for f in RUNTIME_FIELDS}
    model_cfg = dataclasses.replace(arch, gradient_checkpointing=False, **runtime)
    for name in ("in_dim", "out_dim", "text_dim"):
        have, want = getattr(model_cfg, name), getattr(cfg.model, name)
        if have != want:
            raise GenerateError(f"{option}: {p} has {name}={have}, the run config's world needs model.{name}={want}")
    return ModelSource(p, model_cfg, zero)


def find_interpolator(settings: GenerateSettings, student: Path, in_dim: int) -> tuple[Path, dict]:
    """The interpolator directory and its config (named, or next to the student); channels checked."""
    path = Path(settings.interpolator) if settings.interpolator else deploy_root(student) / "interpolator"
    if not settings.interpolator and not path.is_dir():
        raise GenerateError(
            f"--sampler vif needs an interpolator: none at {path}; pass --interpolator DIR or export one next to the "
            f"student (python launcher/export.py --interpolator <trained dir> --out {deploy_root(student)})"
        )
    try:
        config = read_interpolator_config(path)
        check_channels(config["in_channels"], in_dim)
    except InterpolatorError as exc:
        raise GenerateError(f"--interpolator: {exc}") from exc
    return path, config


def plan_latent_shape(cfg: RunConfig, model_cfg: ModelConfig) -> tuple[int, int, int, int]:
    """The world's latent shape (engine.worlds) for this DiT's channels, divisible by the DiT's patch."""
    try:
        shape = world_latent_shape(cfg, model_cfg.in_dim)
    except ConfigError as exc:
        raise GenerateError(str(exc)) from exc
    for key, size, patch in zip(("num_frames", "height", "width"), shape[1:], model_cfg.patch_size):
        if size % patch:
            raise GenerateError(f"config key `data.{key}`: {size} latent cells are not divisible by the patch {patch}")
    return shape


def _with_overrides(cfg: RunConfig, s: GenerateSettings) -> RunConfig:
    """The run config with the request's schedule settings (re-validated: errors name the config key)."""
    if s.sampler not in SAMPLERS:
        raise GenerateError(f"--sampler: {s.sampler!r} is not one of {SAMPLERS}")
    if s.teacher_steps is not None and s.sampler != "teacher":
        raise GenerateError("--steps sets the teacher sampler's Euler steps; the student's are --timesteps")
    if s.timesteps is not None and s.sampler == "teacher":
        raise GenerateError("--timesteps sets the student schedule; the teacher sampler takes --steps")
    if s.interpolator and s.sampler != "vif":
        raise GenerateError(f"--interpolator is used by --sampler vif only (got --sampler {s.sampler})")
    if s.batch_size < 1 or not s.seeds or len(set(s.seeds)) != len(s.seeds):
        raise GenerateError(f"need --batch >= 1 and distinct seeds, got --batch {s.batch_size}, --seeds {s.seeds}")
    if s.view_scale is not None and s.view_scale < 1:
        raise GenerateError(f"--view-scale must be >= 1, got {s.view_scale}")
    diff, interp = cfg.diffusion, cfg.interp
    diff = dataclasses.replace(
        diff,
        student_timesteps=[float(t) for t in s.timesteps] if s.timesteps else diff.student_timesteps,
        teacher_steps=diff.teacher_steps if s.teacher_steps is None else s.teacher_steps,
    )
    k = interp.half_rate_steps if s.half_rate_steps is None else s.half_rate_steps
    interp = dataclasses.replace(interp, half_rate_steps=k, rope_positions=s.rope_positions or interp.rope_positions)
    try:
        return replace(cfg, diffusion=diff, interp=interp)
    except ConfigError as exc:
        raise GenerateError(str(exc)) from exc


def plan_generation(cfg: RunConfig, settings: GenerateSettings) -> Plan:
    """Every check that needs no weights, in the order a user would fix them. Raises GenerateError."""
    cfg = _with_overrides(cfg, settings)
    world = world_of(cfg)
    prompts = read_prompts(settings)
    jobs = [Job(i, p, int(seed)) for i, p in enumerate(prompts) for seed in settings.seeds]
    if settings.sampler == "teacher":
        model = resolve_model(settings.teacher or cfg.model.checkpoint, "--teacher (or model.checkpoint)", cfg)
    else:
        model = resolve_model(settings.student, "--student", cfg)
    shape = plan_latent_shape(cfg, model.cfg)
    interpolator = None
    if settings.sampler == "vif":
        interpolator, icfg = find_interpolator(settings, model.path, model.cfg.in_dim)
        i = cfg.interp
        n = len(cfg.diffusion.student_timesteps)
        try:
            check_vif(
                shape[1], icfg["in_channels"], shape[0], i.half_rate_steps, n, i.rope_positions, model.cfg.patch_size[0]
            )
        except ValueError as exc:  # InterpolatorError included
            raise GenerateError(f"--sampler vif with data.num_frames={cfg.data.num_frames}: {exc}") from exc
    scale = settings.view_scale or VIEW_SCALE[world]
    ranks, sp = launch_layout(cfg, model.cfg)
    return Plan(cfg, settings, world, jobs, model, interpolator, shape, scale, ranks, sp)


def launch_layout(cfg: RunConfig, model_cfg: ModelConfig) -> tuple[int, int]:
    """(ranks of the launch, sequence-parallel degree): alone 1 and 1; under torchrun WORLD_SIZE and
    ``parallel.sequence_parallel``, or all the ranks when it is 1. The degree must divide the ranks and the DiT's
    heads."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks <= 1:
        return 1, 1
    sp = cfg.parallel.sequence_parallel if cfg.parallel.sequence_parallel > 1 else ranks
    heads = model_cfg.num_heads
    if ranks % sp or heads % sp:
        ok = [k for k in range(1, ranks + 1) if ranks % k == 0 and heads % k == 0]
        raise GenerateError(
            f"config key `parallel.sequence_parallel`: {sp} ranks per video (1 = all {ranks}) must divide the {ranks} "
            f"ranks and the DiT's {heads} heads; set one of {ok}"
        )
    return ranks, sp


# ---------------------------------------------------------------------------------------------------------------------
# Sampling with one generator per video
# ---------------------------------------------------------------------------------------------------------------------


class TimedInterpolator:
    """An interpolator whose ``interpolate`` is timed under the clock's "interpolation" phase (in its own dtype)."""

    def __init__(self, model, clock):
        self.model, self.clock, self.in_channels = model, clock, model.in_channels

    def interpolate(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        with self.clock("interpolation"):
            return self.model.interpolate(latents.to(dtype)).to(latents.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Loading (after the plan) and generating
# ---------------------------------------------------------------------------------------------------------------------


def load_dit(source: ModelSource, device: torch.device, dtype: torch.dtype) -> WanModel:
    """The DiT in eval mode on ``device`` in ``dtype``; every key and shape checked."""
    model = build_model(source.cfg, device="meta")
    if source.zero:
        state = zero_state(source.path, lazy=False)
        check_state(state, source.cfg, source.path)
        names, get = official_source(source.cfg, list(state), state.__getitem__)  # a LoRA-trained one merged
        model.to_empty(device="cpu").load_state_dict({n: get(n) for n in names})
    else:
        load_weights(model, source.path)
    return model.to(device, dtype).eval().requires_grad_(False)


class Generator:
    """Loads the world and the models of a plan once; ``run(jobs)`` generates a batch and writes its files."""

    def __init__(self, plan: Plan, device: str | torch.device | None = None):
        self.plan, cfg = plan, plan.cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if plan.ranks > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = dist.device()  # this rank's GPU (LOCAL_RANK)
        self.writes = dist.is_data_leader()  # one rank per sequence-parallel group writes its videos
        self.dtype = resolve_dtype(cfg, cuda=self.device.type == "cuda")
        try:
            self.world = build_world(cfg, self.device)
        except ConfigError as exc:
            raise GenerateError(str(exc)) from exc
        codec, text = self.world.codec, self.world.text
        mc, v = plan.model.cfg, cfg.vae
        strides = (codec.temporal_stride, codec.spatial_stride)
        if strides != (v.temporal_stride, v.spatial_stride):
            raise GenerateError(
                f"config key `vae.temporal_stride`: the codec has strides {strides} (temporal, spatial), "
                f"the config says ({v.temporal_stride}, {v.spatial_stride}): the latent size would be wrong"
            )
        if (codec.z_dim, text.dim) != (mc.in_dim, mc.text_dim):
            raise GenerateError(
                f"the {plan.world} world's codec/text encoder give (z_dim {codec.z_dim}, text dim "
                f"{text.dim}); the DiT {plan.model.path} expects ({mc.in_dim}, {mc.text_dim})"
            )
        try:
            self.model = load_dit(plan.model, self.device, self.dtype)
            self.interpolator = None
            if plan.interpolator is not None:
                self.interpolator = load_interpolator(plan.interpolator, mc.in_dim, self.device)
        except SafetensorError as exc:  # a truncated or corrupt file: name it instead of a bare header error
            raise CheckpointError(f"cannot read weights ({plan.model.path}, {plan.interpolator}): {exc}") from exc
        self.model.set_sequence_parallel(SequenceParallel.of_layout(dist.sequence_layout()))
        d = cfg.diffusion
        self.schedule = FlowSchedule(d.num_train_timesteps, d.shift)

    def latents(self, context: torch.Tensor, seeds: list[int], clock: PhaseTimer) -> torch.Tensor:
        """(B, C, F, H, W) clean latents for the batch's text embeddings (B, L, D)."""
        cfg, s = self.plan.cfg, self.plan.settings
        noise = SampleNoise(seeds)
        x = noise((len(seeds), *self.plan.latent_shape), torch.float32, self.device)  # each video's first draw
        if s.sampler == "teacher":
            d, uncond = cfg.diffusion, self.world.unconditional().to(self.device).expand(len(seeds), -1, -1)
            with clock("sampling"):
                return sample_teacher(
                    self.model, x, context, uncond, self.schedule, d.teacher_steps, d.guidance_scale, d.guidance_form
                )
        ts = cfg.diffusion.student_timesteps
        if s.sampler == "student":
            with clock("sampling"):
                return sample_student(self.model, x, context, self.schedule, ts, noise)
        k, rope = cfg.interp.half_rate_steps, cfg.interp.rope_positions
        with clock("sampling"):  # includes the interpolation, which the clock also reports on its own
            return sample_vif(
                self.model, TimedInterpolator(self.interpolator, clock), x, context, self.schedule, ts, noise, k, rope
            )

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[dict]:
        """Generate and write one batch; returns the sidecars (none on the ranks of a sequence-parallel group that
        do not write: every rank of the group generates the batch, the first decodes and writes it)."""
        clock = PhaseTimer(sync=self.device.type == "cuda")
        with clock("text_encode"):
            context = self.world.encode_text([j.prompt for j in jobs]).to(self.device)  # (B, L, D)
        latents = self.latents(context, [j.seed for j in jobs], clock)
        if not self.writes:
            return []
        with clock("decode"):
            videos = self.world.decode(latents)  # (B, 3, T, H, W) in [-1, 1]
        with clock("write"):
            paths = [self._write(job, video) for job, video in zip(jobs, videos)]
        timings = {f"{k}_s": round(v, 4) for k, v in clock.seconds.items()}
        timings.setdefault("interpolation_s", 0.0)
        infos = []
        for job, path in zip(jobs, paths):
            info = self.describe(job, path, {**timings, "batch_videos": len(jobs)})
            write_sidecar(path.with_suffix(".json"), info)
            infos.append(info)
        return infos

    def _write(self, job: Job, video: torch.Tensor) -> Path:
        width = len(str(max(j.index for j in self.plan.jobs)))
        path = Path(self.plan.settings.out_dir) / f"{job.stem(width)}.mp4"
        return write_mp4(path, to_frames(video), fps=self.plan.cfg.data.fps, scale=self.plan.view_scale)

    def describe(self, job: Job, path: Path, timings: dict) -> dict:
        """The JSON sidecar of one video."""
        plan, s = self.plan, self.plan.settings
        d, i = plan.cfg.diffusion, plan.cfg.interp
        teacher, vif = s.sampler == "teacher", s.sampler == "vif"
        if teacher:
            timesteps = self.schedule.timestep(self.schedule.sampling_sigmas(d.teacher_steps)[:-1]).tolist()
        else:
            timesteps = list(d.student_timesteps)
        mode = kernel_mode()  # VIDISTILL_KERNELS can force either path
        on = mode == "triton" or (mode == "auto" and self.device.type == "cuda")
        triton = plan.model.cfg.fused_kernels and on
        return {
            "prompt": job.prompt,
            "seed": job.seed,
            "index": job.index,
            "video": str(path),
            "sampler": s.sampler,
            "steps": len(timesteps),
            "timesteps": [round(t, 3) for t in timesteps],
            "half_rate_steps": i.half_rate_steps if vif else 0,
            "rope_positions": i.rope_positions if vif else None,
            "guidance": {"scale": d.guidance_scale, "form": d.guidance_form} if teacher else None,
            "negative_prompt": plan.cfg.text_encoder.negative_prompt if teacher else None,
            "models": {"dit": str(plan.model.path), "interpolator": plan.interpolator and str(plan.interpolator)},
            "world": plan.world,
            "latent_shape": list(plan.latent_shape),
            "frames": plan.cfg.data.num_frames,
            "fps": plan.cfg.data.fps,
            "view_scale": plan.view_scale,
            "tokens_per_step": tokens_per_step(plan),
            "device": str(self.device),
            "sequence_parallel": plan.sequence_parallel,
            "dtype": str(self.dtype).removeprefix("torch."),
            "kernels": "triton" if triton else "reference",
            "timings": timings,
        }


def tokens_per_step(plan: Plan) -> list[int]:
    """DiT tokens per video at each step (the teacher's CFG counts both passes)."""
    _, f, h, w = plan.latent_shape
    pt, ph, pw = plan.model.cfg.patch_size
    full, half = (f // pt) * (h // ph) * (w // pw), ((f + 1) // 2 // pt) * (h // ph) * (w // pw)
    d, sampler = plan.cfg.diffusion, plan.settings.sampler
    if sampler == "teacher":
        passes = 1 if (d.guidance_scale == 0 and d.guidance_form == "standard") else 2  # guided_velocity's shortcut
        return [passes * full] * d.teacher_steps
    k = plan.cfg.interp.half_rate_steps if sampler == "vif" else 0
    return [half] * k + [full] * (len(d.student_timesteps) - k)


def generate(cfg: RunConfig, settings: GenerateSettings) -> list[dict]:
    """Check, load once, generate every (prompt, seed) in batches; returns the sidecars in request order (on every
    rank of a launch on several ranks, whose sequence-parallel groups take the batches in turn)."""
    plan = plan_generation(cfg, settings)
    if plan.ranks > 1:
        dist.init()
        dist.init_sequence_parallel(plan.sequence_parallel)
    main = dist.is_main()
    generator = Generator(plan, settings.device)
    size = settings.batch_size
    batches = [plan.jobs[i : i + size] for i in range(0, len(plan.jobs), size)]
    mine = batches[dist.data_rank() :: dist.data_world_size()]
    infos = []
    for batch in progress(mine, desc="generate", unit="batch", disable=not settings.progress or not main):
        infos.extend(generator.run(batch))
    if plan.ranks > 1:  # every group's sidecars, in request order
        order = {(j.index, j.seed): n for n, j in enumerate(plan.jobs)}
        gathered = [i for part in dist.all_gather_object(infos) for i in part]
        infos = sorted(gathered, key=lambda i: order[i["index"], i["seed"]])
        dist.shutdown()
    if main:
        log.info("wrote %d videos to %s", len(infos), settings.out_dir)
    return infos
