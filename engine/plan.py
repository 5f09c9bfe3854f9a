"""Memory and step-time planner for a distillation run (docs/PERFORMANCE.md#planner).

Per-GPU bytes of the three roles under DeepSpeed ZeRO-3 (teacher: bf16 weights only; generator and critic: weights,
gradient partitions, fp32 master weights and Adam moments, the fp32 gradient of the optimizer step), the gathered
parameters and communication buckets, the activations of the largest phase of a 5:1 cycle, the VAE and text encoder
where a rank holds them, and the allocator headroom; whether that fits, which change makes it fit, and the step time
the FLOP model (engine/models/flops.py) gives at a stated MFU.

Every figure is a formula over the config; nothing here builds a real model (the parameter count walks a model on
the meta device). The formulas follow what the code allocates; docs/PERFORMANCE.md#how-the-planner-counts lists them
and benchmarks/memory_plan_check.py measures them on 2 CPU ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from engine.config import ConfigError, ModelConfig, RunConfig, lora_layers
from engine.models.flops import dit_forward_flops, train_passes

GB = 1e9
FP32 = 4
HEADROOM = 0.10
"""Share of the usable GPU memory kept free for the caching allocator's fragmentation."""
CUDA_CONTEXT_GB = 1.0
"""CUDA context, cuBLAS/NCCL workspaces: outside the allocator's statistics, a fixed reserve per GPU."""
REUSE_DISTANCE = 1_000_000_000
"""DeepSpeed's default stage3_max_reuse_distance: a gathered parameter the recorded trace reuses within this many
elements is not released, so up to this many elements of an engine can stay gathered between uses."""
SUB_GROUP_SIZE = 1_000_000_000
"""DeepSpeed's default zero_optimization.sub_group_size: the optimizer steps this many elements at a time."""
UMT5_XXL_PARAMS = 5.68e9
"""umT5-XXL encoder: 24 layers of d 4096 / ffn 10240 (gated) plus the 256,384-token embedding."""
WAN_VAE_PARAMS = 127e6
"""Wan2.1 VAE (Wan2.1_VAE.pth holds 508 MB of fp32)."""


# ---------------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    total: int
    """Parameters of one DiT."""
    persistent: int
    """Parameters in tensors under deepspeed.param_persistence_threshold: ZeRO-3 keeps those whole on every rank."""
    largest_layer: int
    """Parameters owned directly by the largest module (what ZeRO-3 gathers at once, DeepSpeed's largest layer)."""


_NOT_ARCH = ("checkpoint", "lora")


def _arch(model: ModelConfig) -> tuple:
    return tuple(getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in _NOT_ARCH)


def _model(arch: tuple) -> ModelConfig:
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_ARCH]
    return ModelConfig(**dict(zip(names, arch)))


def count_params(model: ModelConfig, persistence_threshold: int) -> ParamCount:
    """Walk a WanModel built on the meta device (no memory), as DeepSpeed's own estimator does."""
    return _count_params(_arch(model), persistence_threshold)


@functools.lru_cache(maxsize=32)
def _count_params(arch: tuple, persistence_threshold: int) -> ParamCount:
    from engine.models.wan import build_model

    m = build_model(_model(arch), device="meta")
    total = sum(p.numel() for p in m.parameters())
    persistent = sum(p.numel() for p in m.parameters() if p.numel() < persistence_threshold)
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
    return ParamCount(total, persistent, largest)


def count_adapter_params(model: ModelConfig, persistence_threshold: int) -> ParamCount | None:
    """The LoRA adapters of one trained role (``model.lora``; None without): every A (r x in) and B (out x r) is its
    own module's only tensor, so the largest layer is the largest of them."""
    if not model.lora.enabled:
        return None
    lora = model.lora
    return _count_adapters(_arch(model), lora.rank, tuple(lora.targets), persistence_threshold)


@functools.lru_cache(maxsize=32)
def _count_adapters(arch: tuple, rank: int, targets: tuple, persistence_threshold: int) -> ParamCount:
    from engine.config import LoraConfig
    from engine.models.adapters import adapter_params

    cfg = dataclasses.replace(_model(arch), lora=LoraConfig(rank=rank, targets=list(targets)))
    sizes = [math.prod(shape) for shape in adapter_params(cfg).values()]
    return ParamCount(sum(sizes), sum(n for n in sizes if n < persistence_threshold), max(sizes))


def forward_only_params(model: ModelConfig, persistence_threshold: int) -> int:
    """With ``model.lora``: partitioned base parameters that ZeRO-3's trace uses in the forward only, because no
    gradient reaches their modules (their input needs none and their weights are frozen): the embeddings, every
    block's cross-attention k and v (they read the text context), block 0's self-attention q, k and v (they read the
    patch embedding). ZeRO-3 releases those after each use instead of keeping them gathered (measured on 2 ranks:
    benchmarks/memory_plan_check.py). Fewer targets leave more modules without a gradient: this is a lower bound."""
    if not model.lora.enabled:
        return 0
    return _forward_only(_arch(model), persistence_threshold)


@functools.lru_cache(maxsize=32)
def _forward_only(arch: tuple, persistence_threshold: int) -> int:
    import re

    from engine.models.wan import build_model

    forward_only = re.compile(
        r"(patch_embedding|text_embedding|time_embedding|time_projection)\.|blocks\.\d+\.cross_attn\.[kv]\.|"
        r"blocks\.0\.self_attn\.[qkv]\."
    )
    m = build_model(_model(arch), device="meta")
    return sum(
        p.numel() for name, p in m.named_parameters() if forward_only.match(name) and p.numel() >= persistence_threshold
    )


def lora_rows_per_block(model: ModelConfig) -> tuple[float, float]:
    """Adapted layers per block (averaged over the blocks) whose input is the video tokens, and the text tokens
    (cross-attention k and v): each adapter saves its rank-wide A output per input row for B's backward."""
    layers = lora_layers(model)
    text = sum(1 for n in layers if n.endswith(("cross_attn.k", "cross_attn.v")))
    return (len(layers) - text) / model.num_layers, text / model.num_layers


# ---------------------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------------------


def block_saved_bytes(model: ModelConfig, tokens: int, text_len: int, dtype_bytes: int, fused: bool = False) -> int:
    """Bytes autograd saves in one WanBlock forward for one sample of ``tokens`` tokens.

    Reference element-wise ops (CPU, or ``model.fused_kernels: false``), per token in units of dim: adaLN (fp32 input
    and normalized tensor) twice, the q/k/v input, q and k each through RMSNorm (fp32 input, normalized) and RoPE
    (rotated output), v, the attention output (the o-projection reads a view of it), the gated residuals' fp32
    branch outputs, the cross-attention's LayerNorm input and output, its q path (fp32 RMSNorm input and normalized,
    q) and output, the FFN input and its two ffn_dim-wide tensors. The fused kernels (CUDA) save their inputs in the
    training dtype instead: adaLN the input, qk-norm+RoPE the q and k projections, the gated residual the branch.
    Per text token: the cross-attention's k path and v; per token and head the attention log-sum-exp; norm stats.

    With ``model.lora`` only the adapters train: the modulation, the RMSNorm weights and the gates need no gradient,
    so the reference ops no longer save what only their gradients read (adaLN's and RMSNorm's normalized tensor, the
    gated residual's branch; the fused kernels save the same as before), a frozen linear saves no input but its
    adapter's A saves that same tensor, and B saves A's rank-wide output per row of the layer's input."""
    d, f, h, s = model.dim, model.ffn_dim, model.num_heads, dtype_bytes
    frozen = model.lora.enabled
    normed = 0 if frozen else FP32  # the fp32 normalized tensor of adaLN and RMSNorm: saved for their weights' grads
    # An fp32 copy of an fp32 tensor is the tensor itself, so each term is counted once whatever the dtype.
    adaln = s if fused else FP32 + normed
    qk = 2 * (2 * s if fused else FP32 + normed + s)  # fused: q/k projections, rotated; else fp32 in, normed, rotated
    residual = s if fused else (0 if frozen else FP32)
    per_token_d = (
        adaln  # self-attention adaLN
        + s  # q/k/v projection input
        + qk
        + s  # v
        + s  # attention output (the o-projection input is a view of it)
        + residual  # gated residual: the branch output
        + FP32  # cross-attention LayerNorm input (fp32)
        + s  # its output, the q projection input
        + FP32
        + normed
        + s  # cross q: RMSNorm input and normalized (fp32), q in the dtype
        + s  # cross-attention output
        + adaln  # FFN adaLN
        + s  # FFN input
        + residual  # gated residual
    )
    per_token = per_token_d * d + 2 * s * f + 2 * h * FP32 + 8 * FP32  # FFN hidden + GELU out, lse x2, norm stats
    per_text = (FP32 + normed + 2 * s) * d  # cross k: RMSNorm input + normalized, k and v in the dtype
    if frozen:  # B saves A's output, r wide, per adapted layer and row of its input
        token_layers, text_layers = lora_rows_per_block(model)
        per_token += token_layers * model.lora.rank * s
        per_text += text_layers * model.lora.rank * s
    return round(tokens * per_token + text_len * per_text)


def activation_bytes(
    model: ModelConfig,
    tokens: int,
    text_len: int,
    batch: int,
    dtype_bytes: int,
    checkpointing: bool,
    fused: bool = False,
) -> dict[str, int]:
    """Activations of one trained forward over ``batch`` samples (``tokens`` each on this rank): ``stored`` (held from
    forward to backward: every block's saved tensors, or with checkpointing every block's input) and ``working``
    (added during the backward: with checkpointing one block's recomputed saved tensors, whose gradients take the
    place of the saved tensors autograd frees node by node; without, the gradients in flight: the residual
    stream's and one branch's, fp32)."""
    s, d = dtype_bytes, model.dim
    block = batch * block_saved_bytes(model, tokens, text_len, s, fused)
    outside = batch * (tokens * d * (2 * FP32 + 2 * s) + text_len * d * s)  # embeddings, head adaLN, text context
    if checkpointing:
        stored = model.num_layers * batch * tokens * d * s + outside  # each block's input
        working = block
    else:
        stored = model.num_layers * block + outside
        working = batch * tokens * 2 * FP32 * d
    return {"stored": stored, "working": working, "block": block}


def nograd_forward_bytes(model: ModelConfig, tokens: int, batch: int, dtype_bytes: int) -> int:
    """Peak of a forward without gradient (teacher, critic scores, rollout) over ``batch`` samples: the residual
    stream, one block's widest temporaries (the FFN hidden and its GELU, fp32 norm copies, q/k/v)."""
    d, f, s = model.dim, model.ffn_dim, dtype_bytes
    return batch * tokens * (2 * s * f + (6 * s + 3 * FP32) * d)


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """The hardware and parallel layout a config is planned on."""

    gpus: int
    sp: int = 1
    gpu_memory_gb: float = 80.0
    mfu: float = 0.4
    peak_tflops: float = 989.0
    headroom: float = HEADROOM
    context_gb: float = CUDA_CONTEXT_GB
    dtype_bytes: int = 2
    """Training dtype bytes (bf16 on a GPU; the CPU measurement runs fp32)."""
    cuda: bool = True
    """GPUs (the fused kernels run, CUDA context reserved); False plans a CPU run (benchmarks/memory_plan_check.py)."""


@dataclass
class Plan:
    cfg: RunConfig
    layout: Layout
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    """(item, bytes per GPU, note) in the order printed."""
    peak: float = 0.0
    usable: float = 0.0
    params: ParamCount | None = None
    tokens: int = 0
    timing: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


def _weight_bytes(pc: ParamCount, zero: int, s: int, offload_param: bool) -> int:
    """A role's weights on the GPU: its partition, persistent tensors also whole (all of it without partitioning)."""
    if offload_param:
        return s * pc.persistent
    return s * (math.ceil(pc.total / zero) + pc.persistent) if zero > 1 else s * pc.total


def role_states(
    pc: ParamCount,
    zero: int,
    s: int,
    offload_optimizer: bool,
    offload_param: bool,
    sub_group_size: int = SUB_GROUP_SIZE,
    adapters: ParamCount | None = None,
) -> dict[str, float]:
    """GPU bytes of one role's ZeRO-3 states partitioned over ``zero`` ranks, as DeepSpeed's stage 3 allocates them:
    the weight partition in the training dtype (persistent tensors also whole), the flat gradient partition, the fp32
    master partition and Adam's two moments; at the optimizer step the fp32 copy of the gradient partition (one
    sub_group_size group at a time) and Adam's denominator. Offloaded parts live in CPU memory (0 here).

    With LoRA ``adapters`` (``model.lora``) the base weights ``pc`` are frozen: they keep their partition, and the
    gradient partition, fp32 master, Adam moments and the step's temporaries are those of the adapters alone (the
    only parameters in the optimizer); a gathered layer's gradient is an adapter's."""
    trained = pc if adapters is None else adapters
    part = math.ceil(trained.total / zero)
    weights = _weight_bytes(pc, zero, s, offload_param)
    if adapters is not None:
        weights += _weight_bytes(adapters, zero, s, offload_param)
    step = FP32 * min(part, sub_group_size)
    return {
        "weights": weights,
        "grad_partition": 0 if offload_optimizer else s * part,
        "master_adam": 0 if offload_optimizer else 3 * FP32 * part,
        "step_fp32_grad": 0 if offload_optimizer else step,
        "step_adam_temp": 0 if offload_optimizer else step,
        "layer_gathered": s * pc.largest_layer,
        "layer_grad": s * (trained.largest_layer + trained.persistent),  # persistent tensors' gradients are whole too
    }


def dtype_bytes_of(cfg: RunConfig) -> int:
    """Bytes per element of the training dtype on a GPU (auto = bf16)."""
    return {"auto": 2, "bf16": 2, "fp16": 2, "fp32": 4}[cfg.deepspeed.dtype]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_layout(cfg: RunConfig, gpus: int, sp: int) -> None:
    """Impossible layouts fail naming the key and the values that would work."""
    if gpus < 1:
        raise ConfigError(f"option `--gpus`: must be >= 1, got {gpus}")
    heads = cfg.model.num_heads
    ok = [k for k in divisors(gpus) if heads % k == 0]
    if sp < 1 or gpus % sp or heads % sp:
        why = []
        if sp >= 1 and gpus % sp:
            why.append(f"does not divide the {gpus} GPUs")
        if sp >= 1 and heads % sp:
            why.append(f"does not divide model.num_heads={heads}")
        raise ConfigError(
            f"option `--sp` (parallel.sequence_parallel): {sp} {' and '.join(why) or 'must be >= 1'}; "
            f"values that divide both: {ok}"
        )
    o = cfg.optim
    if o.global_batch_size is not None:
        want = o.micro_batch_size * o.grad_accum_steps * (gpus // sp)
        if want != o.global_batch_size:
            raise ConfigError(
                f"config key `optim.global_batch_size`: {o.global_batch_size}, but micro_batch_size "
                f"{o.micro_batch_size} x grad_accum_steps {o.grad_accum_steps} x {gpus // sp} data-parallel ranks "
                f"({gpus} GPUs / SP {sp}) = {want}; set it to {want} or null"
            )


def latent_tokens(cfg: RunConfig) -> tuple[tuple[int, int, int], int]:
    """((F, h, w) latent, DiT tokens per sample) of the config's clips."""
    from engine.worlds.base import world_latent_shape

    _, f, h, w = world_latent_shape(cfg)
    pt, ph, pw = cfg.model.patch_size
    return (f, h, w), (f // pt) * (h // ph) * (w // pw)


def plan(cfg: RunConfig, layout: Layout) -> Plan:
    """Per-GPU memory (the worst rank: rank 0, which also holds the VAE for sample videos) and the step time."""
    check_layout(cfg, layout.gpus, layout.sp)
    m, ds, o = cfg.model, cfg.deepspeed, cfg.optim
    s = layout.dtype_bytes
    # ZeRO-3 partitions over every GPU, sequence parallelism or not (engine/distill/roles.py: a sequence-parallel
    # group's ranks hold different shares of one gradient, which ZeRO reduces together)
    zero = layout.gpus if ds.zero_stage == 3 else 1
    threshold = ds.param_persistence_threshold if ds.zero_stage == 3 else 0
    pc = count_params(m, threshold)
    adapters = count_adapter_params(m, threshold)  # model.lora: the trained parameters (None: the full weights)
    part = math.ceil(pc.total / zero)  # partition of every parameter (persistent ones included) for grads/optimizer
    trained_part = part if adapters is None else math.ceil(adapters.total / zero)
    rows: list[tuple[str, float, str]] = []
    add = lambda name, value, note="": rows.append((name, float(value), note))  # noqa: E731

    # -- model states ------------------------------------------------------------------------------------------------
    st = role_states(pc, zero, s, ds.offload_optimizer, ds.offload_param, adapters=adapters)
    off = " (offloaded to CPU)"
    # The teacher's engine (no optimizer) does not hold the persistent tensors whole between uses (measured).
    teacher_weights = 0 if ds.offload_param else s * part if zero > 1 else s * pc.total
    add("teacher weights", teacher_weights, f"{pc.total / 1e9:.2f}B params x {s} B / {zero}" + off * ds.offload_param)
    what = "" if adapters is None else f" of the LoRA adapters (rank {m.lora.rank}, {adapters.total / 1e6:,.1f}M)"
    for role in ("generator", "critic"):
        note = "same partition" if adapters is None else "frozen base (same partition) + the adapters'"
        add(f"{role} weights", st["weights"], note + off * ds.offload_param)
        if ds.offload_optimizer:
            add(f"{role} grads + fp32 master + Adam", 0,
                f"{(s + 12) * trained_part / GB:.1f} GB in CPU memory (offloaded){what}")  # fmt: skip
        else:
            add(f"{role} grad partition", st["grad_partition"], f"{s} B/param{what}")
            add(f"{role} fp32 master + Adam m, v", st["master_adam"], f"12 B/param{what}")
    ema = getattr(cfg.method, "ema", None)  # method.ema (generator EMA): an fp32 copy of the rank's partition
    if ema is not None and getattr(ema, "enabled", False):
        add("generator EMA", FP32 * trained_part, "fp32 copy of the trained partition")
    step_transient = st["step_fp32_grad"] + st["step_adam_temp"]
    # -- parameters gathered by ZeRO-3 and the reduce bucket ----------------------------------------------------------
    partitioned = pc.total - pc.persistent + (0 if adapters is None else adapters.total - adapters.persistent)
    # The generator runs several times per step (rollout, sample, trained forward), so ZeRO-3's trace reuses its
    # parameters within stage3_max_reuse_distance and keeps them gathered between uses; the teacher and critic
    # release theirs after each use (measured: benchmarks/memory_plan_check.py reads ds_status on 2 ranks). With LoRA
    # the modules no gradient reaches are released too.
    reused = partitioned - forward_only_params(m, threshold)
    kept = min(reused, REUSE_DISTANCE, ds.max_live_parameters) if zero > 1 and not ds.offload_param else 0
    if zero > 1:
        add("generator params kept gathered", s * kept,
            f"{kept / 1e6:,.0f}M elements (stage3_max_reuse_distance 1e9, max_live_parameters "
            f"{ds.max_live_parameters:.0e})")  # fmt: skip
        add(
            "reduce buckets (generator, critic)", 2 * s * ds.reduce_bucket_size, f"{ds.reduce_bucket_size:.0e} elements"
        )
    fetch = lambda pool: s * min(pc.largest_layer + ds.prefetch_bucket_size, pool) if zero > 1 else 0  # noqa: E731
    comm_gen = fetch(partitioned - kept)  # in flight beyond the kept set
    comm_teacher = fetch(pc.total)  # the current layer and the prefetch bucket (persistent tensors included)
    comm_critic = fetch(partitioned)
    layer_grad = st["layer_grad"]  # a gathered layer's full gradient before its reduce-scatter
    # -- activations ---------------------------------------------------------------------------------------------------
    latent, tokens = latent_tokens(cfg)
    rank_tokens = math.ceil(tokens / layout.sp)
    text_len = cfg.text_encoder.max_length
    mb = o.micro_batch_size
    gen_batch = mb * (2 if cfg.method.regression.enabled else 1)  # the DMD and the regression branch in one forward
    ckpt = m.gradient_checkpointing
    fused = m.fused_kernels and layout.cuda
    a_gen = activation_bytes(m, rank_tokens, text_len, gen_batch, s, ckpt, fused)
    a_critic = activation_bytes(m, rank_tokens, text_len, mb, s, ckpt, fused)
    cfg_batch = 2 * mb if cfg.diffusion.guidance_scale != 0 or cfg.diffusion.guidance_form != "standard" else mb
    teacher_fwd = nograd_forward_bytes(m, rank_tokens, cfg_batch, s)
    sp_buffers = 4 * s * rank_tokens * m.dim * gen_batch if layout.sp > 1 else 0  # all-to-all q, k, v, out
    latent_elems = math.prod(latent) * m.in_dim
    small = 8 * gen_batch * latent_elems * FP32  # latents, noise, x0 and loss tensors in fp32
    phases = {
        "generator forward + teacher/critic scores": a_gen["stored"] + teacher_fwd + comm_teacher + sp_buffers + small,
        "generator backward": a_gen["stored"] + a_gen["working"] + comm_gen + layer_grad + sp_buffers + small,
        "critic backward": a_critic["stored"] + a_critic["working"] + comm_critic + layer_grad + sp_buffers + small,
        "optimizer step": step_transient,
    }
    worst = max(phases, key=phases.get)
    add(
        f"activations ({'checkpointed' if ckpt else 'no checkpointing'})",
        a_gen["stored"],
        f"{gen_batch} x {rank_tokens:,} tokens (generator, DMD + regression)",
    )
    add("backward working set", a_gen["working"], "one block recomputed" if ckpt else "gradients")
    comm = max(comm_teacher, comm_gen + layer_grad, comm_critic + layer_grad)
    add(
        "ZeRO-3 fetch in flight + layer gradient",
        comm,
        f"largest layer {pc.largest_layer / 1e6:.0f}M + prefetch {ds.prefetch_bucket_size:.0e} elements",
    )
    if sp_buffers:
        add("sequence-parallel all-to-all", sp_buffers, "q, k, v, out in the head-split layout")
    # -- the data parts a rank loads (engine/worlds/wan.py) ------------------------------------------------------------
    vae = text = 0.0
    if cfg.vae.kind == "wan":
        vae_bytes = WAN_VAE_PARAMS * (FP32 if cfg.vae.dtype in ("auto", "fp32") else 2)
        text_bytes = UMT5_XXL_PARAMS * (FP32 if cfg.text_encoder.dtype == "fp32" else 2)
        if cfg.data.source == "online":
            vae, text = vae_bytes, text_bytes
            add("VAE (every rank, online data)", vae)
            add("umT5-XXL (every rank, online data)", text)
        else:
            vae = vae_bytes if cfg.vae.path else 0
            add("VAE (rank 0, sample videos)", vae, "cache data: umT5 only at start for sample prompts, then freed")
    resident = sum(v for _, v, _ in rows) - a_gen["stored"] - a_gen["working"] - comm - sp_buffers
    peak = resident + phases[worst]
    add("CUDA context + workspaces", layout.context_gb * GB, "fixed reserve")
    usable = (layout.gpu_memory_gb - layout.context_gb) * GB * (1 - layout.headroom)
    p = Plan(cfg, layout, rows, peak=peak, usable=usable, params=pc, tokens=tokens)
    p.phases = {"resident": resident, **phases, "worst": worst}
    p.timing = step_time(cfg, layout, latent, text_len)
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------------------------------


def cycle_forwards(cfg: RunConfig) -> dict[str, float]:
    """Forward-equivalents per sample of one 5:1 cycle (engine/distill/method.py): a forward counts 1, a forward
    with backward 3 (backward = 2 forwards; with LoRA less, engine.models.flops.train_passes), a checkpointed block's
    recompute 1 more. The backward-simulation exit k
    is uniform over the K student steps, so a rollout costs (K - 1) / 2 forwards on average."""
    n = cfg.method.critic_per_generator
    k = len(cfg.diffusion.student_timesteps)
    rollout = (k - 1) / 2
    passes = train_passes(cfg.model, latent_tokens(cfg)[0], cfg.text_encoder.max_length)  # LoRA: under 3
    train = passes + (1 if cfg.model.gradient_checkpointing else 0)
    d = cfg.diffusion
    cfg_passes = 2 if d.guidance_scale != 0 or d.guidance_form != "standard" else 1
    critic_eval = 2 if cfg.method.fake_guidance_scale > 0 else 1
    gen_samples = 2 if cfg.method.regression.enabled else 1
    return {
        "generator rollout": rollout,
        "generator forward+backward": gen_samples * train,
        "teacher scores (CFG)": cfg_passes if cfg.method.dmd.enabled else 0,
        "critic scores": critic_eval if cfg.method.dmd.enabled else 0,
        "critic rollout + sample (x5)": n * (rollout + 1),
        "critic forward+backward (x5)": n * train,
    }


def step_time(cfg: RunConfig, layout: Layout, latent: tuple[int, int, int], text_len: int) -> dict:
    """Seconds per 5:1 cycle at ``layout.mfu`` of ``layout.peak_tflops`` per GPU, and tokens/s (the trainer's
    perf/tokens_per_s: samples per trainer step over all ranks x tokens, per second)."""
    fwd = dit_forward_flops(cfg.model, latent, text_len)
    per_sample = cycle_forwards(cfg)
    dp = layout.gpus // layout.sp
    mb = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps  # samples per rank and trainer step
    recompute = 1 if cfg.model.gradient_checkpointing else 0
    flops = {k: v * fwd["total"] * mb for k, v in per_sample.items()}  # per SP group (one data-parallel rank)
    total = sum(flops.values())
    model_flops = total - recompute * fwd["total"] * mb * (
        (2 if cfg.method.regression.enabled else 1) + cfg.method.critic_per_generator
    )  # MFU counts model FLOPs: recompute excluded
    seconds = model_flops / (layout.sp * layout.mfu * layout.peak_tflops * 1e12)
    steps = cfg.method.critic_per_generator
    tokens_s = dp * mb * fwd["tokens"] * steps / seconds
    return {
        "forward_tflop": fwd["total"] / 1e12,
        "per_role": {k: v / 1e12 for k, v in flops.items()},
        "cycle_tflop": total / 1e12,
        "model_tflop": model_flops / 1e12,
        "cycle_s": seconds,
        "step_s": seconds / steps,
        "tokens_per_s": tokens_s,
    }


# ---------------------------------------------------------------------------------------------------------------------
# What makes it fit
# ---------------------------------------------------------------------------------------------------------------------


def with_overrides(cfg: RunConfig, changes: dict[str, object]) -> RunConfig:
    out = cfg
    for key, value in changes.items():
        section, name = key.split(".")
        out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **{name: value})})
    return out


def fit(cfg: RunConfig, layout: Layout) -> tuple[Plan, dict[str, object]] | None:
    """The first change that fits, trying in order: a larger SP degree, optimizer offload, parameter offload,
    gradient checkpointing, a smaller micro-batch (each on top of the previous). None when nothing does."""
    heads, gpus = cfg.model.num_heads, layout.gpus
    tried: dict[str, object] = {}
    sps = [k for k in divisors(gpus) if heads % k == 0 and k > layout.sp]
    for sp in sps:
        p = plan(_without_global_batch(cfg), dataclasses.replace(layout, sp=sp))
        if p.fits:
            return p, {"parallel.sequence_parallel": sp, **_batch_key(cfg, gpus, sp)}
    steps = [("deepspeed.offload_optimizer", True), ("deepspeed.offload_param", True),
             ("model.gradient_checkpointing", True)]  # fmt: skip
    current = cfg
    for key, value in steps:
        section, name = key.split(".")
        if getattr(getattr(current, section), name) == value:
            continue
        tried[key] = value
        current = with_overrides(current, {key: value})
        p = plan(current, layout)
        if p.fits:
            return p, dict(tried)
        for sp in sps:  # the change together with more sequence parallelism
            p = plan(_without_global_batch(current), dataclasses.replace(layout, sp=sp))
            if p.fits:
                return p, {**tried, "parallel.sequence_parallel": sp, **_batch_key(cfg, gpus, sp)}
    mb = current.optim.micro_batch_size
    while mb > 1:
        mb //= 2
        tried["optim.micro_batch_size"] = mb
        current = _without_global_batch(with_overrides(current, {"optim.micro_batch_size": mb}))
        p = plan(current, layout)
        if p.fits:
            return p, {**tried, **_batch_key(current, gpus, layout.sp)}
    return None


def _without_global_batch(cfg: RunConfig) -> RunConfig:
    return with_overrides(cfg, {"optim.global_batch_size": None})


def _batch_key(cfg: RunConfig, gpus: int, sp: int) -> dict[str, object]:
    if cfg.optim.global_batch_size is None:
        return {}
    o = cfg.optim
    return {"optim.global_batch_size": o.micro_batch_size * o.grad_accum_steps * (gpus // sp)}


# ---------------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------------


def format_plan(p: Plan) -> str:
    lay, c = p.layout, p.cfg
    lines = [
        f"{c.model.preset or 'model'}: {p.params.total / 1e9:.2f}B params per role; {c.data.num_frames}x{c.data.height}"
        f"x{c.data.width} -> {p.tokens:,} tokens ({math.ceil(p.tokens / lay.sp):,} per rank at SP {lay.sp}); "
        f"{lay.gpus} GPUs of {lay.gpu_memory_gb:g} GB, ZeRO-3 over {lay.gpus} ranks, "
        f"{lay.gpus // lay.sp} data-parallel",
        f"{'per GPU':<44}{'GB':>8}  note",
    ]
    for name, value, note in p.rows:
        lines.append(f"{name:<44}{value / GB:>8.2f}  {note}")
    lines.append(f"{'peak (' + p.phases['worst'] + ')':<44}{p.peak / GB:>8.2f}")
    lines.append(
        f"{'usable':<44}{p.usable / GB:>8.2f}  ({lay.gpu_memory_gb:g} GB - {lay.context_gb:g} GB context) x "
        f"(1 - {lay.headroom:.0%} allocator headroom)"
    )
    lines.append(f"fits: {'yes' if p.fits else 'no'} ({p.peak / p.usable:.0%} of usable)")
    t = p.timing
    lines.append(
        f"step time at MFU {lay.mfu:g} of {lay.peak_tflops:g} TFLOP/s: {t['cycle_s']:.1f} s per 5:1 cycle "
        f"({t['step_s']:.2f} s per trainer step), {t['tokens_per_s']:,.0f} tokens/s; one forward "
        f"{t['forward_tflop']:.1f} TFLOP per sample"
    )
    for role, tf in t["per_role"].items():
        lines.append(f"  {role:<36}{tf:>10.1f} TFLOP per sample and cycle")
    return "\n".join(lines)
