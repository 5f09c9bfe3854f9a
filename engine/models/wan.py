"""The Wan2.1 text-to-video DiT (docs/wan.md#forward-pass), one implementation for teacher, generator and critic.

Parameter names are the official Wan2.1 checkpoint keys (``blocks.0.self_attn.q.weight``...), so an official
checkpoint loads as is and the diffusers layout is a rename (engine/models/checkpoint.py).

Precision follows the official code: the timestep embedding, the adaLN modulation and every norm run in fp32 whatever
the parameter dtype; the residual stream stays in the input dtype. Element-wise hot paths (adaLN, gated residual,
qk-norm + RoPE) go through ``kernels/`` when fused kernels are on.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.config import ModelConfig, validate_model
from engine.models.attention import attention, resolve_backend
from engine.models.rope import rope_tables, shard_tables
from engine.models.sequence_parallel import SequenceParallel, Shard
from kernels import adaln, gated_residual, qk_norm_rope

_FUSED = {"adaln": adaln.adaln_modulate, "residual": gated_residual.gated_residual, "qk": qk_norm_rope.qk_norm_rope}
_REFERENCE = {
    "adaln": adaln.adaln_modulate_reference,
    "residual": gated_residual.gated_residual_reference,
    "qk": qk_norm_rope.qk_norm_rope_reference,
}


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) fp32 [cos(t f), sin(t f)] with f_i = 10000^(-i / (dim/2)) (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FP32Linear(nn.Linear):
    """A linear layer evaluated in fp32 whatever its parameter dtype (the official fp32 autocast regions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (the official WanRMSNorm: computed in fp32, key ``<name>.weight``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qk_norm_rope.rms_norm_reference(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: dict, backend: str, shard: Shard | None = None
    ) -> torch.Tensor:
        """x: (B, N, D); cos, sin: (N, Dh/2). With a sequence-parallel ``shard``, x holds this rank's tokens and
        cos, sin their rows; attention runs over the whole sequence (engine/models/sequence_parallel.py)."""
        wq, wk = self.norm_q.weight, self.norm_k.weight
        q, k = ops["qk"](self.q(x), self.k(x), wq, wk, cos, sin, self.num_heads, self.eps)  # (B, N, H, Dh) each
        v = self.v(x).unflatten(-1, (self.num_heads, -1))  # (B, N, H, Dh)
        out = attention(q, k, v, backend) if shard is None else shard.attend(q, k, v, backend)  # (B, N, H, Dh)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention: q/k RMSNorm across heads, no RoPE, all context rows attended (docs/wan.md#forward-pass)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, backend: str) -> torch.Tensor:
        """x: (B, N, D); ctx: (B, L, D)."""
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)  # (B, N, H, Dh)
        k = self.norm_k(self.k(ctx)).unflatten(-1, heads)  # (B, L, H, Dh)
        v = self.v(ctx).unflatten(-1, heads)  # (B, L, H, Dh)
        return self.o(attention(q, k, v, backend).flatten(2))


class WanBlock(nn.Module):
    """adaLN-modulated self-attention, un-modulated cross-attention, adaLN-modulated GELU-tanh FFN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(d, eps=cfg.eps, elementwise_affine=cfg.cross_attn_norm)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.compiled = cfg.compile

    def forward(self, x, e0, ctx, cos, sin, ops: dict, backend: str, shard: Shard | None = None) -> torch.Tensor:
        """x: (B, N, D); e0: (B, 6, D) fp32; ctx: (B, L, D). Under sequence parallelism x is this rank's ``shard``
        of the tokens: only self-attention looks beyond it. ``model.compile``: the same computation as one compiled
        graph (the module's hooks, ZeRO-3's among them, run outside it)."""
        if self.compiled and not torch.compiler.is_compiling():
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                return _compiled_block()(self, x, e0, ctx, cos, sin, ops, backend, shard)
        return self._forward(x, e0, ctx, cos, sin, ops, backend, shard)

    def _forward(self, x, e0, ctx, cos, sin, ops: dict, backend: str, shard: Shard | None) -> torch.Tensor:
        mod = (self.modulation.float() + e0).unsqueeze(2)  # (B, 6, 1, D)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(1)  # each (B, 1, D)
        y = self.self_attn(ops["adaln"](x, shift_a, scale_a, self.eps), cos, sin, ops, backend, shard)
        x = ops["residual"](x, y, gate_a)
        x = x + self.cross_attn(self.norm3(x), ctx, backend)
        y = self.ffn(ops["adaln"](x, shift_f, scale_f, self.eps))
        return ops["residual"](x, y, gate_f)


_RECOMPILE_LIMIT = 64
"""Graphs the compiled block may hold: one per combination of what its guards see (grad mode, batch and token
counts, a role's parameter types under ZeRO-3: a distillation job needs about 4, sampling a few more). Past it the
job fails instead of silently running the block eagerly."""


@functools.cache
def _compiled_block():
    """One compiled function for every block of every model in the process: dynamo treats a block's parameters as
    graph inputs, so blocks of the same shape share the graph and only a new shape (or dtype, device, kernel set)
    compiles again. fullgraph: a break inside a block is a bug to fix, not a silent slowdown."""

    def run(block: WanBlock, *args):
        return block._forward(*args)

    return torch.compile(run, fullgraph=True)


class Head(nn.Module):
    """Output adaLN (from e, not e0, and no SiLU: docs/wan.md#forward-pass) and the projection to patch pixels."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, ops: dict) -> torch.Tensor:
        """x: (B, N, D); e: (B, D) fp32 -> (B, N, out_features)."""
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)  # each (B, 1, D)
        return self.head(ops["adaln"](x, shift, scale, self.eps))


class WanModel(nn.Module):
    """Wan2.1 T2V DiT. ``forward(x (B, C, F, H, W), t (B,), context (B, L, text_dim)) -> velocity (B, C, F, H, W)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        d, p = cfg.dim, tuple(cfg.patch_size)
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=p, stride=p)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(FP32Linear(cfg.freq_dim, d), nn.SiLU(), FP32Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), FP32Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(d, cfg.out_dim * math.prod(p), cfg.eps)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.sequence_parallel: SequenceParallel | None = None

    # -- set-up ------------------------------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """Initialization for training from scratch (official init_weights): xavier linears, zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    @property
    def kernel_ops(self) -> dict:
        return _FUSED if self.cfg.fused_kernels else _REFERENCE

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module's forward reads a parameter owned by a child whose forward it
        does not call: the q/k RMSNorm weights, consumed by the fused qk-norm + RoPE op inside SelfAttention.
        ZeRO-3 must gather them with that module (deepspeed.zero.register_external_parameter)."""
        return [(b.self_attn, w) for b in self.blocks for w in (b.self_attn.norm_q.weight, b.self_attn.norm_k.weight)]

    def set_sequence_parallel(self, sp: SequenceParallel | None) -> None:
        """Split every forward's tokens over ``sp``'s group (None: each rank runs whole sequences). Every rank of the
        group must then call the model with the same inputs; each gets the whole output."""
        self.sequence_parallel = sp

    def num_tokens(self, latent_shape: tuple[int, int, int]) -> int:
        """Tokens of a (F, H, W) latent."""
        pt, ph, pw = self.cfg.patch_size
        return (latent_shape[0] // pt) * (latent_shape[1] // ph) * (latent_shape[2] // pw)

    # -- forward -----------------------------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        c = self.cfg
        if x.ndim != 5:
            raise ValueError(f"latent must be (B, C, F, H, W), got shape {tuple(x.shape)}")
        b, ch, f, h, w = x.shape
        if ch != c.in_dim:
            raise ValueError(f"latent has {ch} channels, the model expects model.in_dim={c.in_dim}")
        for name, size, patch in zip(("frames", "height", "width"), (f, h, w), c.patch_size):
            if size % patch:
                raise ValueError(f"latent {name} {size} is not divisible by the patch size {patch} ({tuple(x.shape)})")
        if t.shape != (b,):
            raise ValueError(f"timestep must have shape ({b},) (one per sample), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.text_dim:
            raise ValueError(f"context must be ({b}, L, {c.text_dim}), got {tuple(context.shape)}")

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) timesteps -> e (B, D) and e0 (B, 6, D), both fp32."""
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim))  # (B, D) fp32
        e0 = self.time_projection(e)  # (B, 6D) fp32
        return e, e0.unflatten(1, (6, self.cfg.dim))  # (B, 6, D)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        frame_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: (B, C, F, H, W) latent; t: (B,) timesteps in [0, num_train_timesteps]; context: (B, L, text_dim) text
        embeddings (zero rows past each prompt's length are attended, as in Wan). frame_positions: optional (F',)
        RoPE frame positions of the F' = F / p_t token frames (default 0..F'-1). Returns (B, C_out, F, H, W) in x.dtype.
        """
        self._check_inputs(x, t, context)
        b, _, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        dtype = self.patch_embedding.weight.dtype
        rope_len = self.cfg.rope_max_seq_len
        cos, sin = rope_tables(
            grid, self.cfg.head_dim, max_seq_len=rope_len, frame_positions=frame_positions, device=x.device
        )
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        shard = None if self.sequence_parallel is None else self.sequence_parallel.shard(tokens.shape[1])
        if shard is not None:  # this rank's tokens and their RoPE rows (positions in the whole grid)
            tokens = shard.split(tokens)  # (B, N_pad / P, D)
            cos, sin = shard_tables(cos, sin, shard.start, shard.stop)
        e, e0 = self.embed_time(t)
        ctx = self.text_embedding(context.to(dtype))  # (B, L, D)
        ops = self.kernel_ops
        backend = resolve_backend(self.cfg.attention_backend, tokens)  # once, outside the blocks (compiled or not)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e0, ctx, cos, sin, ops, backend, shard, use_reentrant=False)
            else:
                tokens = block(tokens, e0, ctx, cos, sin, ops, backend, shard)
        out = self.head(tokens, e, ops)  # (B, N, pt*ph*pw*C)
        if shard is not None:
            out = shard.gather(out)  # the whole sequence on every rank of the group
        return self.unpatchify(out, grid).to(x.dtype)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, pt*ph*pw*C) tokens -> (B, C, F, H, W)."""
        b = out.shape[0]
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        out = out.view(b, f, h, w, pt, ph, pw, self.cfg.out_dim)  # (B, f, h, w, pt, ph, pw, C)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return out.reshape(b, self.cfg.out_dim, f * pt, h * ph, w * pw)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Construct a WanModel; ``device="meta"`` builds the structure without allocating (a 14B model is fine)."""
    with torch.device(device or "cpu"):
        model = WanModel(cfg)
    return model if dtype is None else model.to(dtype)
