"""The run configuration: one typed tree, loaded from YAML, overridden from the command line, validated up front.

Merge order (later wins): dataclass defaults < model preset (``model.preset``) < YAML file < dotted CLI overrides
(``optim.lr=1e-6``). Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key, before
any model is built. The DeepSpeed JSON is derived from this tree (:func:`deepspeed_config`), so batch size, dtype and
ZeRO stage have a single source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.toy_words import FILTER_VOCABULARY


class CheckpointError(ValueError):
    """A checkpoint that does not fit: wrong layout, missing/unexpected keys, shape mismatch."""


class ConfigError(ValueError):
    """A configuration that cannot work. The message names the offending key."""


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


LORA_TARGETS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)  # fmt: skip
"""Every linear layer of a transformer block (the layers the LoRA file layouts carry)."""


@dataclass
class LoraConfig:
    """LoRA distillation (docs/method.md#lora-distillation): the generator and the critic train low-rank adapters on a
    frozen copy of the teacher's weights instead of their full weights."""

    rank: int = 0
    """Adapter rank r; 0 trains the full weights (no adapters)."""
    alpha: Optional[float] = None
    """The adapter's output is scaled by alpha / rank; null: alpha = rank (scale 1)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Block linears that get an adapter: an entry matches the layers named by it or ending in "." + it (``q``: both
    attentions' q; ``blocks.0.ffn.2``: one layer)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@dataclass
class ModelConfig:
    """Wan2.1 DiT architecture (docs/wan.md#sizes) and how it runs."""

    preset: Optional[str] = None
    """Architecture preset applied under the YAML values: wan2.1-1.3b, wan2.1-14b, toy, tiny (see MODEL_PRESETS)."""
    dim: int = 1536
    """Hidden size (heads x head_dim)."""
    ffn_dim: int = 8960
    """Feed-forward inner size."""
    num_heads: int = 12
    """Attention heads; must divide dim."""
    num_layers: int = 30
    """Transformer blocks."""
    in_dim: int = 16
    """Latent channels in (VAE z_dim)."""
    out_dim: int = 16
    """Latent channels out."""
    text_dim: int = 4096
    """Text-encoder width (umT5-XXL: 4096)."""
    freq_dim: int = 256
    """Sinusoidal timestep embedding size."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(frames, height, width) patch of the latent."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm/RMSNorm."""
    cross_attn_norm: bool = True
    """Affine LayerNorm before cross-attention (True in every Wan2.1 T2V checkpoint)."""
    rope_max_seq_len: int = 1024
    """Positions covered by the 3D RoPE tables along each axis."""
    checkpoint: Optional[str] = None
    """Teacher weights: official Wan2.1 file/dir or a diffusers `transformer/` dir. Generator and critic start here."""
    attention_backend: Literal["auto", "flash3", "flash2", "xformers", "sdpa"] = "auto"
    """Attention kernel; auto picks flash3 > flash2 > xformers > sdpa by availability and device."""
    gradient_checkpointing: bool = True
    """Recompute each block in backward (activation memory of one block instead of all)."""
    fused_kernels: bool = True
    """Triton element-wise fusions (adaLN, gated residual, qk-norm+RoPE) on CUDA tensors; False = pure torch.
    VIDISTILL_KERNELS=triton|reference forces either path (kernels/_dispatch.py)."""
    compile: bool = False
    """``torch.compile`` each transformer block's forward (one graph per block, compiled once and reused by every
    block; the first steps pay the compile time). Under ZeRO-3 each block is a DeepSpeed leaf module: its parameters
    are gathered together before the block runs, so no ZeRO hook runs inside the compiled graph."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA distillation (rank 0: full weights)."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class TextEncoderConfig:
    kind: Literal["umt5", "toy"] = "umt5"
    """umT5-XXL encoder from a local directory, or the deterministic toy encoder."""
    path: Optional[str] = None
    """Local directory with the encoder weights and tokenizer (no hub downloads)."""
    max_length: int = 512
    """Tokens per prompt; embeddings are trimmed to the true length and zero-padded to this."""
    negative_prompt: str = ""
    """Unconditional prompt for classifier-free guidance."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Encoder precision; auto = bf16 on CUDA (the released weights are bf16), fp32 on CPU."""


@dataclass
class VAEConfig:
    kind: Literal["wan", "toy"] = "wan"
    """diffusers AutoencoderKLWan from a local directory, or the toy codec."""
    path: Optional[str] = None
    """Local directory (diffusers layout) or the official Wan2.1_VAE.pth."""
    temporal_stride: int = 4
    """Pixel frames per latent frame after the first (Wan: 4)."""
    spatial_stride: int = 8
    """Pixels per latent cell along height and width (Wan: 8)."""
    tiling: bool = True
    """Spatial tiling (diffusers enable_tiling) to bound activation memory; time is already chunked by diffusers."""
    tile_size: int = 256
    """Tile side in pixels when tiling (diffusers default 256)."""
    tile_stride: int = 192
    """Distance between tile starts in pixels (tile_size - stride pixels are blended)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """VAE precision; auto = fp32 (the official WanVAE runs in fp32)."""


@dataclass
class DiffusionConfig:
    """Flow matching (docs/wan.md#flow-matching) and the student schedule (docs/method.md#student-schedule)."""

    num_train_timesteps: int = 1000
    """Model timestep input is t = num_train_timesteps * sigma."""
    shift: float = 5.0
    """Timestep shift s' = shift s / (1 + (shift - 1) s)."""
    student_timesteps: list[float] = field(default_factory=lambda: [1000.0, 900.0, 757.0, 522.0])
    """The 4-step student's timesteps, strictly decreasing (released recipe)."""
    teacher_steps: int = 50
    """Euler steps of the teacher sampler."""
    guidance_scale: float = 5.0
    """Teacher CFG scale."""
    guidance_form: Literal["standard", "dmd2"] = "standard"
    """standard: u + w (c - u); dmd2: c + w (c - u) (= standard with w + 1)."""
    dmd_timestep_min: float = 0.02
    """Clamp of the shifted sigma drawn for DMD and critic noise."""
    dmd_timestep_max: float = 0.98
    """Upper clamp of the shifted sigma drawn for DMD and critic noise."""


@dataclass
class DMDLossConfig:
    enabled: bool = True
    """Distribution matching gradient (Eq. 4)."""
    weight: float = 1.0
    """Multiplier of L_DMD in the generator loss."""


@dataclass
class RegressionLossConfig:
    enabled: bool = True
    """Regression on real latents (Eqs. 5-7)."""
    adaptive: bool = True
    """Weight each sample by 1 - sigmoid(k (L - EMA)); False gives plain regression (the +TR+RegLoss ablation)."""
    weight: float = 2.0
    """w_reg in Eq. 9."""
    k: float = 3.0
    """Sigmoid sharpness of the adaptive weight."""
    ema_decay: float = 0.95
    """a in the per-timestep EMA of the regression loss."""


@dataclass
class TemporalLossConfig:
    enabled: bool = True
    """Temporal regularization (Eq. 8)."""
    weight: float = 0.05
    """w_temp in Eq. 9."""
    power: float = 1.0
    """p in -log((v + eps)^p); the released code uses 1."""
    eps: float = 1e-6
    """Added to the temporal variance before the log."""
    tau: float = 0.6
    """Truncation: the term counts only while L_temp >= tau (paper 0.6, released code 0.8)."""


@dataclass
class EMAConfig:
    """An exponential moving average of the generator's weights (engine/distill/ema.py)."""

    enabled: bool = False
    """Keep the EMA: sample videos use it and the export writes it as the student (raw weights beside it)."""
    decay: float = 0.99
    """ema <- decay ema + (1 - decay) w after each applied generator update."""
    start_step: int = 200
    """Trainer step from which the EMA averages; before it, it copies the weights."""


@dataclass
class MethodConfig:
    """The distillation method: DMD2 plus the paper's losses. Every term can be switched off (ablations are configs)."""

    critic_per_generator: int = 5
    """Critic updates per generator update (two-timescale rule)."""
    dmd: DMDLossConfig = field(default_factory=DMDLossConfig)
    regression: RegressionLossConfig = field(default_factory=RegressionLossConfig)
    temporal: TemporalLossConfig = field(default_factory=TemporalLossConfig)
    fake_guidance_scale: float = 0.0
    """CFG applied to the critic's prediction in the DMD gradient (0 = conditional only)."""
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class CaptionFilter:
    """A subset of the toy world's caption space (docs/toy-world.md#domains): a clip matches when every non-empty
    field lists its value; all fields empty match the whole world."""

    kinds: list[str] = field(default_factory=list)
    """Background kinds (background = solid colour, gradient, texture)."""
    backgrounds: list[str] = field(default_factory=list)
    """Background colours (gray, sand, slate, moss, plum)."""
    colours: list[str] = field(default_factory=list)
    """Object colours: a clip matches when one of its objects has one of them."""
    shapes: list[str] = field(default_factory=list)
    """Object shapes: a clip matches when one of its objects has one of them."""
    directions: list[str] = field(default_factory=list)
    """Screen directions of the objects (left, right, up, down, still)."""
    pans: list[str] = field(default_factory=list)
    """Camera pans (none, left, right)."""

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass
class DMDPromptsConfig:
    """The DMD branch's prompts, separate from the regression pairs (distillation and fine-tuning in one stage,
    docs/method.md#prompts-and-pairs)."""

    source: Literal["same", "file", "cache", "toy"] = "same"
    """same: the regression pairs' captions; file: prompts from ``path``, encoded by the world's text encoder; cache:
    a text cache (``cache_dir``) of a prompt manifest (Wan); toy: the toy train split's captions matching ``filter``."""
    path: Optional[str] = None
    """source=file: a text file (one prompt per line, # comments) or .jsonl (rows with `caption` or `prompt`); with
    source=cache, the file ``launcher/precompute.py --dmd-prompts`` encodes into ``cache_dir``."""
    cache_dir: Optional[str] = None
    """source=cache: a text cache of the prompts (text/index.json), written by launcher/precompute.py --dmd-prompts."""
    filter: CaptionFilter = field(default_factory=CaptionFilter)
    """source=toy: which captions of the toy world (empty: all of the train split)."""


@dataclass
class DataConfig:
    manifest: Optional[str] = None
    """JSONL/CSV manifest with `path` and `caption` (plus optional metadata)."""
    root: Optional[str] = None
    """Directory that relative manifest paths are resolved against (default: the manifest's directory)."""
    source: Literal["online", "cache"] = "online"
    """online: decode -> VAE encode in the loop; cache: read precomputed latents and text embeddings."""
    cache_dir: Optional[str] = None
    """Directory of precomputed text/latent caches (launcher/precompute.py)."""
    reader: Literal["auto", "dali", "pyav"] = "auto"
    """Video decoder: DALI (GPU, or CPU for VP9/VP8/MJPEG) or PyAV; auto picks DALI when it can decode."""
    num_frames: int = 81
    """Pixel frames per clip; must be 4k + 1 (81 -> 21 latent frames)."""
    fps: float = 16.0
    """Clips are resampled to this frame rate."""
    height: int = 480
    """Output height after resize + centre crop."""
    width: int = 832
    """Output width after resize + centre crop."""
    num_workers: int = 2
    """Decoder threads/processes per rank."""
    prefetch: int = 2
    """Batches decoded ahead of compute."""
    shuffle: bool = True
    """Shuffle the manifest each epoch (seeded, identical on every rank)."""
    max_bad_fraction: float = 1.0
    """Stop when more than this share of an epoch's samples were bad (1.0: stop only when all are bad)."""
    random_clip_start: bool = True
    """Start each clip at a seeded random frame of its video (False: at the first frame)."""
    min_side: int = 16
    """Videos with a side under this many pixels are skipped as bad_resolution."""
    max_side: int = 8192
    """Videos with a side over this many pixels are skipped as bad_resolution (absurd sizes)."""
    filter: CaptionFilter = field(default_factory=CaptionFilter)
    """Toy world: the regression branch's clips, the train split narrowed to a target domain (empty: all of it)."""
    dmd_prompts: DMDPromptsConfig = field(default_factory=DMDPromptsConfig)
    """Where the DMD branch's prompts come from (default: the regression pairs' own captions)."""


@dataclass
class OptimConfig:
    lr: float = 2e-6
    """Generator learning rate (paper)."""
    critic_lr: float = 2e-6
    """Critic learning rate (paper)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 10.0
    """Gradient clipping by global norm."""
    micro_batch_size: int = 1
    """Samples per GPU per forward (per sequence-parallel group, which splits their tokens)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer update (each step's updates run over that many micro-batches)."""
    global_batch_size: Optional[int] = None
    """If set, must equal micro_batch_size x grad_accum_steps x data-parallel ranks (world size /
    parallel.sequence_parallel; checked at launch)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up: each role's update n runs at lr * min(1, (n + 1) / warmup_steps)."""


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    """ZeRO stage; 3 partitions parameters, gradients and optimizer states across ranks."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision; auto = bf16 on CUDA, fp32 on CPU."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO 1-3; DeepSpeed's CPU Adam, its op built on first use)."""
    offload_param: bool = False
    """Keep partitioned parameters in CPU memory."""
    overlap_comm: bool = True
    """Overlap reduce-scatter with backward."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduction bucket."""
    prefetch_bucket_size: int = 50_000_000
    """Elements of parameters fetched ahead (stage3_prefetch_bucket_size)."""
    param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay unpartitioned (stage3_param_persistence_threshold)."""
    max_live_parameters: int = 1_000_000_000
    """Gathered parameters kept alive at once (stage3_max_live_parameters)."""


@dataclass
class ParallelConfig:
    """How the ranks share the work beyond data parallelism (docs/architecture.md#sequence-parallelism)."""

    sequence_parallel: int = 1
    """Ulysses sequence parallelism: groups of this many ranks split every sample's tokens (all three roles); must
    divide the world size and model.num_heads. ZeRO-3 still partitions over every rank; the data-parallel ranks
    (which read different samples) are world size / this."""


@dataclass
class TrainConfig:
    max_steps: int = 3000
    """Trainer steps (each is one critic or one generator update)."""
    seed: int = 0
    """Base seed; rank r uses seed + r for its generator."""
    max_nonfinite_in_a_row: int = 10
    """Stop after this many consecutive updates skipped for a non-finite loss."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save every N trainer steps (and at the end)."""
    export: bool = True
    """At the end, write the generator consolidated in the diffusers layout to <run_dir>/export/transformer."""
    keep_last: int = 3
    """Step directories kept; older ones are deleted after a complete save."""
    resume: str = "auto"
    """auto: resume from <run_dir>/checkpoints/latest if present; never; or a checkpoint directory."""


@dataclass
class QualityConfig:
    """Quality monitors on the sample videos (engine/train/quality.py)."""

    enabled: bool = True
    """Score the sample videos at every sample step (quality/ in the run directory, TensorBoard quality/*)."""
    teacher_reference: bool = True
    """Sample the teacher once on the same prompts and seeds (50 steps, CFG) to compare the scores with."""
    saturation_margin: float = 0.10
    """Warn when the samples' saturation is more than this share above the teacher's."""
    motion_margin: float = 0.25
    """Warn when the samples' motion (frame difference; toy: travel too) is more than this share below the teacher's."""


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard (rank 0): the same scalars, the sample videos, the resolved config."""

    project: Optional[str] = None
    """W&B project (None: "vidistill")."""
    mode: Literal["disabled", "offline", "online"] = "disabled"
    """disabled (default), offline (a run directory under <run_dir>/wandb, synced later with `wandb sync`) or online."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    """Run directory: resolved config, checkpoints, TensorBoard events, samples."""
    log_every: int = 10
    """Scalars logged every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress_bar: bool = True
    """Rank-0 progress bar with ETA."""
    sample_every: int = 0
    """Write sample videos every N steps (0 = only at the end)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Fixed prompts for periodic samples."""
    sample_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds for periodic samples."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device for MFU; None = 989 (H100 bf16) on CUDA, 0.077 (measured fp32 CPU) otherwise."""
    phase_timing: bool = True
    """Per-phase times (CUDA events read at log steps, no host sync in the step; wall-clock on CPU)."""
    sample_count: int = 4
    """Sample prompts a world picks when sample_prompts is empty (toy: the first N held-out captions)."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Scores of the sample videos and drift warnings against the teacher."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (off by default)."""


@dataclass
class InterpConfig:
    """Latent frame-interpolation U-Net (paper Sec. 3.4, appendix 8) and the VIF sampler."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    """ConvBlock widths of the three levels (small default; the paper's widths in configs/interp-wan.yaml)."""
    checkpoint: Optional[str] = None
    """Trained interpolator (safetensors + config.json)."""
    lr: float = 1e-4
    """AdamW learning rate (the paper's value is illegible)."""
    batch_size: int = 32
    """Training batch (paper: 32)."""
    steps: int = 10_000
    """Training iterations (paper: 10k)."""
    half_rate_steps: int = 2
    """VIF: the first k of the student's steps run at half frame rate."""
    rope_positions: Literal["contiguous", "stride2"] = "contiguous"
    """Frame positions given to RoPE for half-rate steps: contiguous (0, 1, 2, ...) or stride2 (0, 2, 4, ...). The toy
    world measures contiguous better (demo, 100 prompts: instance preservation 0.53 vs 0.35, shape 0.83 vs 0.73,
    Frechet distance 1.64 vs 2.19; stride2 keeps more motion: travel 7.3 vs 4.2)."""
    residual: bool = True
    """Predict a correction to the average of the two frames (an untrained net is the linear blend)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not given by the paper; torch's default)."""
    micro_batch_size: Optional[int] = None
    """Samples per rank per forward; None = batch_size / world size (smaller values accumulate gradients)."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage of the interpolator trainer (a small model: stage 1 shards only optimizer states)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps (0: the constant interp.lr from the start)."""


TOY_PIX_FMTS = ("yuv444p", "yuv420p")


@dataclass
class ToyWorldConfig:
    """The procedural toy world (docs/toy-world.md#clips). Defaults: 32x32 pixels, 9 frames at 8 fps, so the toy codec's
    8x8x9 latents are 144 DiT tokens after the (1, 2, 2) patch."""

    cache_dir: str = "cache/toy"
    """Where datasets are generated on first use (one subdirectory per distinct world)."""
    num_clips: int = 1024
    """Clips in the dataset (train + val)."""
    val_fraction: float = 0.1
    """Share of clips (the last ones) marked split=val: held out for codec PSNR and metric references."""
    seed: int = 0
    """Clip i draws all its randomness from numpy.random.default_rng([seed, i])."""
    height: int = 32
    """Frame height in pixels."""
    width: int = 32
    """Frame width in pixels."""
    num_frames: int = 9
    """Frames per clip (odd, so latent F is odd for the half-frame-rate scheme: 9 -> 5 -> 9)."""
    fps: float = 8.0
    """Frame rate written into the files."""
    speeds: tuple[float, ...] = (1.0, 2.0)
    """Object speeds in pixels per frame (travel 8-16 px over 9 frames; halve them for 17 frames)."""
    static_fraction: float = 0.2
    """Share of clips whose objects stay still."""
    two_object_fraction: float = 0.2
    """Share of clips with two objects (distinct colours, same motion)."""
    pan_fraction: float = 0.5
    """Share of texture-background clips whose camera pans left or right."""
    pan_speed: float = 0.5
    """Background drift of a pan in pixels per frame."""
    object_size: tuple[float, float] = (0.31, 0.375)
    """Range of an object's box side as a fraction of min(height, width) (10-12 px at 32x32)."""
    pix_fmt: str = "yuv444p"
    """VP9 chroma format: yuv444p (lossless, DALI CPU == PyAV) or yuv420p (NVDEC-compatible, lossy chroma)."""

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        checks = [
            (self.num_clips >= 1, "num_clips", "must be >= 1"),
            (0 <= self.val_fraction < 1, "val_fraction", "must lie in [0, 1)"),
            (self.height >= 16 and self.width >= 16, "height", "frames must be at least 16x16"),
            (self.num_frames >= 3 and self.num_frames % 2 == 1, "num_frames", "must be odd and >= 3"),
            (self.fps > 0, "fps", "must be positive"),
            (len(self.speeds) >= 1 and min(self.speeds) > 0, "speeds", "needs positive speeds"),
            (all(0 <= f <= 1 for f in self._fractions()), "static_fraction", "fractions must lie in [0, 1]"),
            (0 < self.object_size[0] <= self.object_size[1] < 1, "object_size", "needs 0 < min <= max < 1"),
            (self.pix_fmt in TOY_PIX_FMTS, "pix_fmt", f"must be one of {TOY_PIX_FMTS}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"toy world `{key}`: {msg} (got {getattr(self, key)!r})")
        travel = max(self.speeds) * (self.num_frames - 1) + self.object_size[1] * min(self.height, self.width) + 2
        if travel > min(self.height, self.width):
            raise ValueError(f"toy world `speeds`: the fastest object travels out of the frame ({travel:.1f} px path)")

    def _fractions(self) -> tuple[float, ...]:
        return self.static_fraction, self.two_object_fraction, self.pan_fraction

    def key(self) -> str:
        """Hash of everything that shapes the data (not where it is cached)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "cache_dir"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def num_val(self) -> int:
        return int(round(self.num_clips * self.val_fraction))


@dataclass
class ToyTeacherConfig:
    """Training of the toy world's teacher (engine/toy/teacher.py, launcher/train_teacher.py)."""

    steps: int = 10_000
    """Optimizer steps."""
    batch_size: int = 32
    """Clips per step."""
    lr: float = 1e-3
    """AdamW learning rate after warm-up (constant, then a linear decay to lr * min_lr_ratio)."""
    warmup_steps: int = 500
    """Linear warm-up."""
    decay_fraction: float = 0.2
    """Share of the steps, at the end, over which the learning rate decays."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a share of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    ema_decay: float = 0.999
    """EMA of the weights; the EMA is what gets exported."""
    caption_dropout: float = 0.1
    """Share of samples trained with the empty prompt (unconditional branch for CFG)."""
    save_every: int = 500
    """Checkpoint (exact resume) every N steps."""
    log_every: int = 100
    """Mean loss over the last N steps to ``<out_dir>/train.log``."""
    out_dir: str = "runs/toy-teacher"
    """Training state and logs."""
    export_dir: str = "engine/assets/toy_teacher"
    """Where the EMA teacher is exported (diffusers layout)."""
    seed: int = 0
    """Seed of the data order, noise and dropout draws."""
    data: Literal["fixed", "procedural"] = "fixed"
    """fixed: the toy dataset's train split; procedural: fresh clips rendered from a seed stream, held-out prompts
    excluded (engine/toy/procedural.py)."""
    grad_accum_steps: int = 1
    """Micro-batches a step's batch_size clips are split into (accumulated gradients, one optimizer update)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    interp: InterpConfig = field(default_factory=InterpConfig)
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    toy_teacher: ToyTeacherConfig = field(default_factory=ToyTeacherConfig)


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # docs/wan.md#sizes
    "wan2.1-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096),
    "wan2.1-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096),
    # The toy world's teacher (docs/toy-world.md#teacher): 1.25 M parameters.
    "toy": dict(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_dim=32),
    # Smallest useful model for unit tests.
    "tiny": dict(dim=24, ffn_dim=32, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=16, rope_max_seq_len=32),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a named preset, with field overrides (validated)."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    cfg = ModelConfig(preset=name, **{**MODEL_PRESETS[name], **overrides})
    validate_model(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _oc_error(exc: OmegaConfBaseException, schema=None, layers=()) -> ConfigError:
    """A ConfigError naming the key OmegaConf complained about. Some errors (a tuple field given the wrong number of
    values, a value inside a list that does not convert) carry no key: then each value the layers set is merged alone
    into the schema, and the first that fails is the key."""
    key = getattr(exc, "full_key", None)
    msg = _first_line(exc)
    if not key and schema is not None:
        found = _failing_leaf(schema, layers)
        if found is not None:
            key, value, msg = found
            msg = f"{value!r} does not fit: {msg}"
    return ConfigError(f"config key `{key or '?'}`: {msg}")


def _first_line(exc: Exception) -> str:
    msg = str(exc).splitlines()[0]
    return "a value does not convert to the field's type" if "$VALUE" in msg else msg  # an unformatted template


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every value a YAML layer sets; a list is one value."""
    for k, v in node.items_ex(resolve=False) if OmegaConf.is_dict(node) else ():
        key = f"{prefix}{k}"
        if OmegaConf.is_dict(v):
            yield from _leaves(v, f"{key}.")
        else:
            yield key, OmegaConf.to_container(v) if OmegaConf.is_list(v) else v


def _failing_leaf(schema, layers):
    for layer in layers:
        for key, value in _leaves(layer):
            try:
                OmegaConf.merge(schema, _nested(key, value))
            except OmegaConfBaseException as exc:
                return key, value, _first_line(exc)
    return None


def _nested(key: str, value):
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _read_yaml(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends; name the file
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return node


def _parse_overrides(overrides: list[str]):
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise _oc_error(exc) from exc


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load and validate a run config: defaults < model preset < YAML < dotted overrides."""
    layers = [_read_yaml(path)] if path is not None else []
    layers.append(_parse_overrides(list(overrides)))
    schema = OmegaConf.structured(RunConfig)
    try:
        user = OmegaConf.merge(schema, *layers)
        preset = user.model.preset
        if preset is not None:
            if preset not in MODEL_PRESETS:
                raise ConfigError(
                    f"config key `model.preset`: unknown preset {preset!r}; known: {sorted(MODEL_PRESETS)}"
                )
            merged = OmegaConf.merge(schema, {"model": MODEL_PRESETS[preset]}, *layers)
        else:
            merged = user
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _oc_error(exc, schema, layers) from exc
    cfg = derive_toy_data(cfg, _explicit_keys(layers, "data", TOY_DATA_KEYS))
    cfg = architecture_from_checkpoint(cfg, _explicit_keys(layers, "model", ARCH_FIELDS))
    validate(cfg)
    return cfg


ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "patch_size")
"""The fields of ModelConfig a checkpoint's config.json fixes (the rest say how the model runs)."""


def model_config_from_json(raw: dict, **overrides) -> ModelConfig:
    """A ModelConfig from either layout's config.json (official WanModel or diffusers WanTransformer3DModel)."""
    if raw.get("model_type", "t2v") != "t2v" or raw.get("image_dim") or raw.get("added_kv_proj_dim"):
        raise CheckpointError("only text-to-video Wan2.1 checkpoints are supported (found an image-conditioned config)")
    if "num_attention_heads" in raw:  # diffusers
        fields = dict(
            dim=raw["num_attention_heads"] * raw["attention_head_dim"],
            num_heads=raw["num_attention_heads"],
            in_dim=raw.get("in_channels", 16),
            out_dim=raw.get("out_channels") or raw.get("in_channels", 16),
            rope_max_seq_len=raw.get("rope_max_seq_len", 1024),
        )
    elif "dim" in raw:  # official
        fields = dict(dim=raw["dim"], num_heads=raw["num_heads"], in_dim=raw.get("in_dim", 16))
        fields["out_dim"] = raw.get("out_dim", 16)
    else:
        raise CheckpointError(f"config.json has neither diffusers nor official Wan fields: {sorted(raw)}")
    fields.update(
        ffn_dim=raw["ffn_dim"],
        num_layers=raw["num_layers"],
        text_dim=raw.get("text_dim", 4096),
        freq_dim=raw.get("freq_dim", 256),
        patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
        eps=raw.get("eps", 1e-6),
        cross_attn_norm=raw.get("cross_attn_norm", True),
    )
    cfg = ModelConfig(**{**fields, **overrides})
    validate_model(cfg)
    return cfg


def _checkpoint_config_json(path: str | Path) -> Path | None:
    """config.json of a checkpoint: in its directory, its pipeline root's transformer/, or next to its file."""
    p = Path(path)
    for c in (p / "config.json", p / "transformer" / "config.json", p.parent / "config.json"):
        if c.is_file() and (c.parent != p.parent or p.is_file()):
            return c
    return None


def architecture_from_checkpoint(cfg: RunConfig, explicit: dict[str, Any]) -> RunConfig:
    """With no ``model.preset``, every architecture field the config does not set comes from ``model.checkpoint``'s
    config.json (a user names the teacher, not its dims). Fields the config sets are kept, and checked against the
    checkpoint when the job loads it. An unreadable checkpoint is left to the job, whose error names the key."""
    m = cfg.model
    if m.preset is not None or not m.checkpoint or set(explicit) >= set(ARCH_FIELDS):
        return cfg
    found = _checkpoint_config_json(m.checkpoint)
    if found is None:
        return cfg
    try:
        ckpt = model_config_from_json(json.loads(found.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # left to the job, whose error names model.checkpoint
        return cfg
    arch = {f: getattr(ckpt, f) for f in ARCH_FIELDS if f not in explicit}
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **arch))


TOY_DATA_KEYS = ("num_frames", "height", "width", "fps")


def _explicit_keys(layers, section: str, keys) -> dict[str, Any]:
    """The values of ``section.<key>`` a YAML file or an override sets (the last one wins)."""
    out: dict[str, Any] = {}
    for layer in layers:
        node = layer.get(section) if OmegaConf.is_dict(layer) else None
        if node is not None and OmegaConf.is_dict(node):
            out.update({k: node[k] for k in keys if k in node})
    return out


def derive_toy_data(cfg: RunConfig, explicit: dict[str, Any] | None = None) -> RunConfig:
    """In the toy world the clip shape is the world's: ``data.num_frames/height/width/fps`` come from ``toy.*``. A
    config that sets one of them to something else is refused (naming both keys) instead of silently overridden."""
    if cfg.vae.kind != "toy":
        return cfg
    for key, value in (explicit or {}).items():
        want = getattr(cfg.toy, key)
        _require(
            value == want,
            f"data.{key}",
            f"{value}, but in the toy world it follows toy.{key}={want}; set toy.{key} (or drop data.{key})",
        )
    data = dataclasses.replace(cfg.data, **{k: getattr(cfg.toy, k) for k in TOY_DATA_KEYS})
    return dataclasses.replace(cfg, data=data)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (loads back to an equal config)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from engine.fsutil import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, to_yaml(cfg))


def replace(cfg, **changes):
    """dataclasses.replace that re-validates a RunConfig."""
    new = dataclasses.replace(cfg, **changes)
    if isinstance(new, RunConfig):
        validate(new)
    return new


# ---------------------------------------------------------------------------------------------------------------------
# Validation: every check names its key
# ---------------------------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key `{key}`: {msg}")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim"):
        _require(getattr(m, name) > 0, f"{prefix}.{name}", f"must be positive, got {getattr(m, name)}")
    _require(m.dim % m.num_heads == 0, f"{prefix}.num_heads", f"{m.num_heads} does not divide model.dim={m.dim}")
    head_dim = m.dim // m.num_heads
    # 3D RoPE splits head_dim into (frame, height, width) = (hd - 4(hd//6), 2(hd//6), 2(hd//6)), in complex pairs.
    _require(
        head_dim % 2 == 0 and head_dim >= 6,
        f"{prefix}.num_heads",
        f"head_dim = dim / num_heads = {head_dim} must be even and >= 6 for the 3D RoPE split",
    )
    _require(m.freq_dim % 2 == 0, f"{prefix}.freq_dim", f"must be even, got {m.freq_dim}")
    _require(all(p > 0 for p in m.patch_size), f"{prefix}.patch_size", f"entries must be positive, got {m.patch_size}")
    _require(m.eps > 0, f"{prefix}.eps", f"must be positive, got {m.eps}")
    _require(m.rope_max_seq_len > 0, f"{prefix}.rope_max_seq_len", "must be positive")
    lora = m.lora
    _require(lora.rank >= 0, f"{prefix}.lora.rank", f"must be >= 0 (0: full weights), got {lora.rank}")
    _require(lora.alpha is None or lora.alpha > 0, f"{prefix}.lora.alpha", f"must be positive, got {lora.alpha}")
    _require(
        not lora.enabled or (bool(lora.targets) and all(t.strip() for t in lora.targets)),
        f"{prefix}.lora.targets",
        f"needs at least one layer name (e.g. {list(LORA_TARGETS[:2])}), got {lora.targets}",
    )


def lora_layers(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """The block linears ``m.lora.targets`` names, as {layer: (out, in)} in the model's order (engine/models/wan.py:
    self- and cross-attention q, k, v, o of width ``dim``, the FFN's ``ffn.0`` dim -> ffn_dim and ``ffn.2`` back). A
    target that matches none, or a rank above a targeted layer's smaller side, is a ConfigError naming the key."""
    d, f, lora = m.dim, m.ffn_dim, m.lora
    shapes = {name: (f, d) if name == "ffn.0" else (d, f) if name == "ffn.2" else (d, d) for name in LORA_TARGETS}
    layers = {f"blocks.{i}.{name}": shape for i in range(m.num_layers) for name, shape in shapes.items()}
    chosen: set[str] = set()
    for target in lora.targets:
        hits = [n for n in layers if n == target or n.endswith("." + target)]
        _require(
            bool(hits),
            "model.lora.targets",
            f"{target!r} matches no linear layer of the transformer blocks; expected one of {list(LORA_TARGETS)} or "
            f"blocks.<i>.<one of them> with i < {m.num_layers}",
        )
        chosen.update(hits)
    out = {n: shape for n, shape in layers.items() if n in chosen}
    smallest = min(out, key=lambda n: min(out[n]))
    _require(
        lora.rank <= min(out[smallest]),
        "model.lora.rank",
        f"{lora.rank} is larger than layer {smallest} ({out[smallest][0]} x {out[smallest][1]}) allows; expected at "
        f"most {min(out[smallest])} for these targets",
    )
    return out


def _validate_diffusion(d: DiffusionConfig) -> None:
    T = d.num_train_timesteps
    _require(T > 0, "diffusion.num_train_timesteps", "must be positive")
    _require(d.shift > 0, "diffusion.shift", f"must be positive, got {d.shift}")
    ts = d.student_timesteps
    _require(len(ts) >= 1, "diffusion.student_timesteps", "needs at least one timestep")
    _require(
        all(a > b for a, b in zip(ts, ts[1:])), "diffusion.student_timesteps", f"must be strictly decreasing, got {ts}"
    )
    _require(all(0 < t <= T for t in ts), "diffusion.student_timesteps", f"must lie in (0, {T}], got {ts}")
    _require(d.teacher_steps >= 1, "diffusion.teacher_steps", "must be >= 1")
    _require(d.guidance_scale >= 0, "diffusion.guidance_scale", f"must be >= 0, got {d.guidance_scale}")
    _require(
        0 <= d.dmd_timestep_min < d.dmd_timestep_max <= 1,
        "diffusion.dmd_timestep_min",
        f"need 0 <= min < max <= 1, got {d.dmd_timestep_min}, {d.dmd_timestep_max}",
    )


def _validate_method(m: MethodConfig) -> None:
    _require(m.critic_per_generator >= 1, "method.critic_per_generator", "must be >= 1")
    _require(m.regression.weight >= 0, "method.regression.weight", "must be >= 0")
    _require(m.regression.k > 0, "method.regression.k", "must be positive")
    _require(0 <= m.regression.ema_decay < 1, "method.regression.ema_decay", "must lie in [0, 1)")
    _require(m.temporal.weight >= 0, "method.temporal.weight", "must be >= 0")
    _require(m.temporal.eps > 0, "method.temporal.eps", "must be positive")
    _require(m.temporal.power > 0, "method.temporal.power", "must be positive")
    _require(m.dmd.weight >= 0, "method.dmd.weight", "must be >= 0")
    on = [
        name
        for name, term in (("dmd", m.dmd), ("regression", m.regression), ("temporal", m.temporal))
        if term.enabled and term.weight > 0
    ]
    _require(
        bool(on),
        "method",
        "every generator loss is off (method.dmd, method.regression and method.temporal disabled or weight 0): "
        "the generator would never change; enable at least one",
    )
    _require(0 < m.ema.decay < 1, "method.ema.decay", f"must lie in (0, 1), got {m.ema.decay}")
    _require(m.ema.start_step >= 0, "method.ema.start_step", "must be >= 0")


def _validate_data(d: DataConfig, vae: VAEConfig, model: ModelConfig) -> None:
    st = vae.temporal_stride
    _require(
        d.num_frames >= 1 and (d.num_frames - 1) % st == 0,
        "data.num_frames",
        f"must be of the form {st}k+1 (e.g. 81), got {d.num_frames}",
    )
    cell = vae.spatial_stride * model.patch_size[1]
    _require(
        d.height > 0 and d.height % cell == 0, "data.height", f"must be a positive multiple of {cell}, got {d.height}"
    )
    cell_w = vae.spatial_stride * model.patch_size[2]
    _require(
        d.width > 0 and d.width % cell_w == 0, "data.width", f"must be a positive multiple of {cell_w}, got {d.width}"
    )
    _require(d.fps > 0, "data.fps", "must be positive")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(0 < d.max_bad_fraction <= 1, "data.max_bad_fraction", "must lie in (0, 1]")
    if d.source == "cache":
        _require(d.cache_dir is not None, "data.cache_dir", "is required when data.source=cache")
    _require(d.prefetch >= 1, "data.prefetch", "must be >= 1")
    _require(1 <= d.min_side <= d.max_side, "data.min_side", f"need 1 <= min_side <= max_side, got {d.min_side}")
    _require(0 < vae.tile_stride <= vae.tile_size, "vae.tile_stride", "need 0 < tile_stride <= tile_size")
    _require(vae.tile_size % vae.spatial_stride == 0, "vae.tile_size", f"must be a multiple of {vae.spatial_stride}")


def _validate_parallel(p: ParallelConfig, model: ModelConfig) -> None:
    sp, heads = p.sequence_parallel, model.num_heads
    _require(sp >= 1, "parallel.sequence_parallel", f"must be >= 1, got {sp}")
    ok = [k for k in range(1, heads + 1) if heads % k == 0]
    _require(
        heads % sp == 0,
        "parallel.sequence_parallel",
        f"{sp} does not divide model.num_heads={heads} (each rank of a group attends over whole heads); "
        f"values that divide it: {ok}",
    )


def check_sequence_parallel(cfg: RunConfig, world_size: int) -> None:
    """At launch, once the world size is known: the sequence-parallel degree must divide it."""
    sp = cfg.parallel.sequence_parallel
    if world_size % sp:
        heads = cfg.model.num_heads
        ok = [k for k in range(1, world_size + 1) if world_size % k == 0 and heads % k == 0]
        raise ConfigError(
            f"config key `parallel.sequence_parallel`: {sp} does not divide the world size {world_size}; values that "
            f"divide it and model.num_heads={heads}: {ok}"
        )


def _validate_optim(o: OptimConfig) -> None:
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(o.critic_lr > 0, "optim.critic_lr", f"must be positive, got {o.critic_lr}")
    _require(all(0 <= b < 1 for b in o.betas), "optim.betas", f"must lie in [0, 1), got {o.betas}")
    _require(o.max_grad_norm > 0, "optim.max_grad_norm", "must be positive")
    _require(o.micro_batch_size >= 1, "optim.micro_batch_size", "must be >= 1")
    _require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _validate_run(cfg: RunConfig) -> None:
    _require(cfg.train.max_steps >= 1, "train.max_steps", "must be >= 1")
    _require(cfg.train.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
    _require(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(bool(cfg.logging.run_dir.strip()), "logging.run_dir", "must not be empty (it would write into the cwd)")
    _require(cfg.logging.log_every >= 1, "logging.log_every", "must be >= 1")
    _require(cfg.logging.sample_every >= 0, "logging.sample_every", "must be >= 0")
    _require(cfg.logging.sample_count >= 1, "logging.sample_count", "must be >= 1")
    q = cfg.logging.quality
    _require(q.saturation_margin >= 0, "logging.quality.saturation_margin", "must be >= 0")
    _require(0 <= q.motion_margin <= 1, "logging.quality.motion_margin", "must lie in [0, 1]")
    wandb_off = cfg.logging.wandb.mode == "disabled"
    _require(wandb_off or _importable("wandb"), "logging.wandb.mode", "needs the wandb package (pip install wandb)")
    _require(cfg.text_encoder.max_length >= 1, "text_encoder.max_length", "must be >= 1")
    _require(len(cfg.interp.channels) == 3, "interp.channels", "needs three widths (one per U-Net level)")
    _require(all(c > 0 for c in cfg.interp.channels), "interp.channels", "widths must be positive")
    _require(cfg.interp.lr > 0, "interp.lr", f"must be positive, got {cfg.interp.lr}")
    _require(cfg.interp.batch_size >= 1, "interp.batch_size", "must be >= 1")
    _require(cfg.interp.steps >= 1, "interp.steps", "must be >= 1")
    _require(cfg.interp.weight_decay >= 0, "interp.weight_decay", "must be >= 0")
    _require(cfg.interp.warmup_steps >= 0, "interp.warmup_steps", "must be >= 0")
    mb = cfg.interp.micro_batch_size
    _require(
        mb is None or 1 <= mb <= cfg.interp.batch_size, "interp.micro_batch_size", "must lie in [1, interp.batch_size]"
    )
    n_student = len(cfg.diffusion.student_timesteps)
    _require(
        0 <= cfg.interp.half_rate_steps < n_student,
        "interp.half_rate_steps",
        f"must lie in [0, {n_student - 1}] for {n_student} student steps",
    )


def _nonfinite(obj, prefix: str = ""):
    """The dotted key of the first float (alone or in a list/tuple) of a dataclass tree that is inf or nan."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found = _nonfinite(value, f"{key}.")
            if found is not None:
                return found
            continue
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return key, value
    return None


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError naming the first impossible value."""
    found = _nonfinite(cfg)
    if found is not None:
        _require(False, found[0], f"must be finite, got {found[1]}")
    validate_model(cfg.model)
    if cfg.model.lora.enabled:  # the adapters fit the architecture
        lora_layers(cfg.model)
    _validate_diffusion(cfg.diffusion)
    _validate_method(cfg.method)
    _validate_data(cfg.data, cfg.vae, cfg.model)
    _validate_optim(cfg.optim)
    _validate_parallel(cfg.parallel, cfg.model)
    _validate_run(cfg)
    _validate_toy(cfg)
    _validate_sources(cfg)


def _validate_filter(f: CaptionFilter, key: str) -> None:
    for name, words in FILTER_VOCABULARY.items():
        bad = [v for v in getattr(f, name) if v not in words]
        _require(not bad, f"{key}.{name}", f"unknown {bad}; known: {list(words)}")


def _validate_sources(cfg: RunConfig) -> None:
    """The regression data filter and the DMD prompt source fit the world (some generator loss staying on is
    checked with the method)."""
    m, p, toy = cfg.method, cfg.data.dmd_prompts, cfg.vae.kind == "toy"
    _require(
        m.dmd.enabled or m.critic_per_generator == 1,
        "method.critic_per_generator",
        f"{m.critic_per_generator}, but with method.dmd.enabled=false there is no critic to train between generator "
        "updates; set 1",
    )
    _validate_filter(cfg.data.filter, "data.filter")
    _validate_filter(p.filter, "data.dmd_prompts.filter")
    _require(
        toy or cfg.data.filter.is_empty(), "data.filter",
        "filters the toy world's clips; in the Wan world give the target domain's manifest or cache as data.*",
    )  # fmt: skip
    where = {"path": ("file",), "cache_dir": ("cache",)}  # a cache may name the file it was built from (precompute)
    for key, sources in where.items():
        if p.source in sources:
            _require(bool(getattr(p, key)), f"data.dmd_prompts.{key}", f"is required when source={p.source}")
        elif not (key == "path" and p.source == "cache"):
            _require(getattr(p, key) is None, f"data.dmd_prompts.{key}", f"is read only with source={sources[0]}")
    _require(
        p.source == "toy" or p.filter.is_empty(),
        "data.dmd_prompts.filter",
        "is read only with data.dmd_prompts.source=toy",
    )
    _require(toy or p.source != "toy", "data.dmd_prompts.source", "toy: needs the toy world (vae.kind=toy)")
    _require(
        not toy or p.source != "cache",
        "data.dmd_prompts.source",
        "cache: the toy world has no text cache; use toy or file",
    )


def _validate_toy(cfg: RunConfig) -> None:
    try:
        cfg.toy.validate()
    except ValueError as exc:
        raise ConfigError(f"config key `toy`: {exc}") from exc
    if cfg.vae.kind == "toy":  # load_config derives the clip shape from toy.*; a config built in code must agree
        for key in TOY_DATA_KEYS:
            want, got = getattr(cfg.toy, key), getattr(cfg.data, key)
            _require(got == want, f"data.{key}", f"{got}, but in the toy world it follows toy.{key}={want}")
    if cfg.vae.kind == "toy":
        n_train = cfg.toy.num_clips - cfg.toy.num_val()
        _require(
            cfg.optim.micro_batch_size <= n_train,
            "optim.micro_batch_size",
            f"{cfg.optim.micro_batch_size} is more than the toy world's {n_train} training clips "
            f"(toy.num_clips={cfg.toy.num_clips}, toy.val_fraction={cfg.toy.val_fraction})",
        )
    t = cfg.toy_teacher
    for key in ("out_dir", "export_dir"):
        _require(bool(getattr(t, key).strip()), f"toy_teacher.{key}", "must not be empty (it would write into the cwd)")
    _require(t.steps >= 1, "toy_teacher.steps", "must be >= 1")
    _require(t.batch_size >= 1, "toy_teacher.batch_size", "must be >= 1")
    _require(
        t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0,
        "toy_teacher.grad_accum_steps",
        f"must be >= 1 and divide toy_teacher.batch_size={t.batch_size}, got {t.grad_accum_steps}",
    )
    _require(t.lr > 0, "toy_teacher.lr", "must be positive")
    _require(0 <= t.caption_dropout < 1, "toy_teacher.caption_dropout", "must lie in [0, 1)")
    _require(0 <= t.ema_decay < 1, "toy_teacher.ema_decay", "must lie in [0, 1)")
    _require(t.save_every >= 1, "toy_teacher.save_every", "must be >= 1")


# ---------------------------------------------------------------------------------------------------------------------
# Derived settings
# ---------------------------------------------------------------------------------------------------------------------


def resolve_dtype(cfg: RunConfig, cuda: Optional[bool] = None):
    """The training dtype: bf16 on CUDA and fp32 on CPU unless the config fixes it. fp16 needs CUDA (DeepSpeed's
    loss scaling and the fp16 kernels do not run on a CPU)."""
    import torch

    name = cfg.deepspeed.dtype
    if name in ("auto", "fp16"):
        cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        name = "bf16" if cuda else "fp32"
    _require(name != "fp16" or cuda, "deepspeed.dtype", "fp16 needs CUDA; use fp32 (or auto) on a CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def check_writable_dir(path: str | Path, key: str) -> Path:
    """Create ``path`` if needed and prove it takes a file, before any work is done: a run that cannot save must not
    start. Raises ConfigError naming ``key``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"config key `{key}`: {path} is not a writable directory ({exc.strerror or exc})") from exc
    return path


def check_run_dir(cfg: RunConfig) -> Path:
    """``logging.run_dir`` exists (created if needed) and is writable; ConfigError naming the key otherwise."""
    return check_writable_dir(cfg.logging.run_dir, "logging.run_dir")


def deepspeed_config(
    cfg: RunConfig,
    world_size: int,
    *,
    cuda: Optional[bool] = None,
    micro_batch_size: Optional[int] = None,
    grad_accum_steps: Optional[int] = None,
    zero_stage: Optional[int] = None,
    gradient_clipping: Optional[float] = None,
    dtype=None,
    offload_optimizer: Optional[bool] = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON for a trained role, from the one run config (batch size, dtype and ZeRO stage of
    ``optim`` and ``deepspeed``); a job training another model (the interpolator) overrides what its own section
    sets."""
    import torch

    _require(world_size >= 1, "world_size", f"must be >= 1, got {world_size}")
    o, ds = cfg.optim, cfg.deepspeed
    dtype = resolve_dtype(cfg, cuda) if dtype is None else dtype
    mb = o.micro_batch_size if micro_batch_size is None else micro_batch_size
    accum = o.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
    stage = ds.zero_stage if zero_stage is None else zero_stage
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.param_persistence_threshold,
            stage3_max_live_parameters=ds.max_live_parameters,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if ds.offload_optimizer if offload_optimizer is None else offload_optimizer:  # engine.train.optim: CPU Adam
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        _require(stage == 3, "deepspeed.offload_param", "needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": accum,
        "train_batch_size": mb * accum * world_size,
        "gradient_clipping": o.max_grad_norm if gradient_clipping is None else gradient_clipping,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
