"""Inference ops of the frame-interpolation U-Net: forward only, on tensors and numbers.

Three ops, each a Triton kernel with a pure-torch reference of the same signature:
- ``conv_norm_act(x, weight, bias, ln_weight, ln_bias, eps, skip=None, pool=False)``: one ConvNormAct unit (3x3
  same-padding conv -> LayerNorm over channels at each pixel -> SiLU) on ``[maxpool(x) if pool else x; skip]``;
- ``pair_conv_norm_act(latents, ...)``: the same unit on every adjacent frame pair of a (B, C, F, H, W) latent;
- ``interp_head(x, ..., out_weight, out_bias, latents, residual)``: the last unit, the 1x1 output conv, the pair
  average and the interleaving into the (B, C, 2F - 1, H, W) result.
This module knows nothing of the model: which op runs which layer, the encoder/decoder walk, the max-pool at the
bottom, the transposed convs and the skip crops are ``fused_interpolate`` in engine/models/interp_unet.py.

Each unit is one kernel, as an implicit GEMM: a program holds BLOCK_M consecutive pixels of one image x all output
channels, accumulates ``tl.dot`` over the K = 9 taps x Cin reduction in (tap, channel chunk) steps, and finishes in
its epilogue with the bias, the per-pixel LayerNorm (a row reduction, because the tile holds every output channel),
the affine and SiLU: one read of the input (per tap, through the cache), one write of the output. The model's
ConvBlock is two such units, two launches (fusing both would need the first conv's output on a halo around the tile:
recomputed rows or a (tile + 2)^2 x Cout buffer, more than the one activation round trip it saves).

Layout: NCHW, the model's, so the torch ops the caller runs between kernels (the ceil-mode max-pool at the bottom,
the 2x2 transposed convs) take the maps as they are; per input channel a tile's pixels are contiguous, as are its
stores. Inputs are addressed by strides, which removes three copies of the torch path:
- ``skip``: a second source whose channels follow the first (the decoder's ``cat([up, skip])``), and the first source
  may be a cropped view (``up[..., :h, :w]``);
- pairs: the first layer reads channel c of pair n = b (F - 1) + i from latent[b, c, i] (c < C) or latent[b, c - C,
  i + 1], so ``frame_pairs`` (a (B (F - 1), 2C, H, W) copy) is never formed;
- ``pool``: the first unit of encoder levels 2 and 3 reads the ceil-mode 2x2 max of the finer map on load.
The last unit's epilogue (`interp_head`) also applies the final 1x1 conv, adds the average of the pair (residual) and
writes generated frames to the odd positions of the (B, C, 2F - 1, H, W) result and the originals to the even ones:
no stack/cat, and the last activation never reaches memory.

Layers, top to bottom: pure-torch references (the model's own ops), the `@triton.jit` kernels, launchers, custom ops
with fake impls (forward only: training runs the torch path), public functions that dispatch (kernels/_dispatch.py)
and check shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import interpreting, launch, use_triton
from kernels._rounding import store_rounded

MAX_CHANNELS = 512  # output channels one tile holds (BLOCK_M 32 x 512 fp32 accumulators); the paper's widest level
# Register tiles per program, for 16-bit operands; fp32 operands (DOT_FP32, tf32 or ieee dots) take half of each, as
# they take twice the registers. Larger tiles spill on sm_90 at every warp count (benchmarks/kernels/sm90_resources.md).
_TILE_ELEMS = 16384  # BLOCK_M x BLOCK_N accumulators: 128x128, 64x256, 32x512 (standard GEMM tiles)
_A_TILE_ELEMS = 2048  # BLOCK_M x BLOCK_K inputs per tap and channel chunk, with their int64 addresses and masks
_B_TILE_ELEMS = 4096  # BLOCK_K x BLOCK_N weights per tap and channel chunk
# Under the interpreter a tl op costs about the same Python overhead whatever the tile size, so larger tiles run faster
# (measured 1.4 s -> 0.37 s for a (10, 8, 15, 26) conv at BLOCK_M 128 -> 512). 256 still cuts the tests' 15 x 26
# images into two tiles, one partial, so tile offsets and pixel masks are exercised. None: the GPU's tiles.
_INTERPRETER_BLOCK_M = 256


# ----------------------------------------------------------------------------------------------------- reference ---
def conv_norm_act_reference(x, weight, bias, ln_weight, ln_bias, eps: float, skip=None, pool: bool = False):
    """The model's ConvNormAct on ``[maxpool(x) if pool else x; skip]``, with the model's own ops and dtype.

    x: (N, Cx, Hx, Wx); skip: (N, Cs, H, W) or None; (H, W) = ceil((Hx, Wx) / 2) if pool else (Hx, Wx).
    weight: (Cout, Cx + Cs, 3, 3); bias, ln_weight, ln_bias: (Cout,). Returns (N, Cout, H, W).
    """
    if pool:
        x = F.max_pool2d(x, kernel_size=2, ceil_mode=True)
    if skip is not None:
        x = torch.cat([x, skip], dim=1)
    y = F.conv2d(x, weight, bias, padding=1)
    y = F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], ln_weight, ln_bias, eps)  # (N, H, W, Cout)
    return F.silu(y.permute(0, 3, 1, 2))  # (N, Cout, H, W)


def frame_pairs_reference(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B (F - 1), 2C, H, W): [frame i; frame i + 1] for every adjacent pair, batch-major."""
    pairs = torch.cat([latents[:, :, :-1], latents[:, :, 1:]], dim=1).transpose(1, 2)  # (B, F - 1, 2C, H, W)
    return pairs.reshape(-1, pairs.shape[2], *latents.shape[-2:])


def pair_conv_norm_act_reference(latents, weight, bias, ln_weight, ln_bias, eps: float):
    """The first unit on every adjacent frame pair: (B, C, F, H, W) -> (B (F - 1), Cout, H, W)."""
    return conv_norm_act_reference(frame_pairs_reference(latents), weight, bias, ln_weight, ln_bias, eps)


def interp_head_reference(x, weight, bias, ln_weight, ln_bias, eps, out_weight, out_bias, latents, residual=True):
    """Last unit, 1x1 conv, residual pair average and interleaving, as the model computes them.

    x: (B (F - 1), c1, H, W); out_weight: (C, c1, 1, 1); out_bias: (C,); latents: (B, C, F, H, W).
    Returns (B, C, 2F - 1, H, W): latents at even frame indices, generated frames at odd ones.
    """
    y = conv_norm_act_reference(x, weight, bias, ln_weight, ln_bias, eps)
    mid = F.conv2d(y, out_weight, out_bias).to(latents.dtype)  # (N, C, H, W)
    if residual:
        a, b = frame_pairs_reference(latents).chunk(2, dim=1)
        mid = 0.5 * (a + b) + mid
    bsz, c, f, h, w = latents.shape
    out = latents.new_empty(bsz, c, 2 * f - 1, h, w)
    out[:, :, 0::2] = latents
    out[:, :, 1::2] = mid.view(bsz, f - 1, c, h, w).transpose(1, 2)  # (B, C, F - 1, H, W)
    return out


# -------------------------------------------------------------------------------------------------------- kernels ---
@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. DOT_FP32: fp32 operands (fp32 models; always under the interpreter, whose bf16 dot is wrong)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _load_taps(ptr, c, mask_c, th, tw, in_grid, h_src, w_src, s_c, s_h, s_w, POOL: tl.constexpr):
    """(BLOCK_M, BLOCK_K) inputs at conv-grid pixels (th, tw) and channels c; 0 off the grid (same padding).

    POOL: the value at a grid pixel is the max of its ceil-mode 2x2 window in the (h_src, w_src) source. Cell (0, 0)
    of a window is always inside the source, so it starts the max; missing cells load -inf.
    """
    mask = in_grid[:, None] & mask_c[None, :]
    base = ptr + c[None, :].to(tl.int64) * s_c
    if POOL:
        fh, fw = 2 * th, 2 * tw
        best = tl.load(base + (fh * s_h + fw * s_w)[:, None], mask=mask, other=0.0)
        for cell in tl.static_range(1, 4):
            ch, cw = fh + cell // 2, fw + cell % 2
            ok = mask & ((ch < h_src) & (cw < w_src))[:, None]
            v = tl.load(base + (ch * s_h + cw * s_w)[:, None], mask=ok, other=float("-inf"))
            best = tl.maximum(best, v).to(best.dtype)  # tl.maximum computes bf16/fp16 in fp32: keep the load's type
        return best
    return tl.load(base + (th * s_h + tw * s_w)[:, None], mask=mask, other=0.0)


@triton.jit
def _accumulate(
    acc, ptr, c_count, c_first, s_c, s_h, s_w, h_src, w_src, hh, ww, mask_m, height, width,
    w_ptr, c_total, c_out, cols, mask_n,
    BLOCK_K: tl.constexpr, POOL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc += the conv over one source's c_count channels. Weights: (9, c_total, c_out), rows c_first + c."""
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    for tap in tl.static_range(9):
        th, tw = hh + (tap // 3 - 1), ww + (tap % 3 - 1)  # shifted once per tap, reused by every channel chunk
        in_grid = mask_m & (th >= 0) & (th < height) & (tw >= 0) & (tw < width)
        for c0 in range(0, c_count, BLOCK_K):
            c = c0 + ks
            mask_c = c < c_count
            a = _load_taps(ptr, c, mask_c, th, tw, in_grid, h_src, w_src, s_c, s_h, s_w, POOL)
            rows = (tap * c_total + c_first + c).to(tl.int64) * c_out
            b = tl.load(w_ptr + rows[:, None] + cols[None, :], mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            if DOT_FP32:  # inline, not _dot: a device-function call costs ~1 ms under the interpreter
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _norm_act(acc, cols, mask_n, bias_ptr, ln_w_ptr, ln_b_ptr, c_out, eps):
    """SiLU(LayerNorm_channels(acc + bias) * ln_w + ln_b) in fp32; padded columns come out 0."""
    bias = tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    gamma = tl.load(ln_w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    x = acc + bias[None, :]  # padded columns: 0 (weights and bias loaded as 0)
    mean = tl.sum(x, axis=1) / c_out
    xc = tl.where(mask_n[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / c_out + eps)  # biased variance, as F.layer_norm
    y = xc * rstd[:, None] * gamma[None, :] + beta[None, :]
    return y * tl.sigmoid(y)


@triton.jit
def _conv_norm_act_kernel(
    x_ptr, x_div, x_sn0, x_sn1, x_sc, x_sh, x_sw, c_x, h_x, w_x,
    s_ptr, s_div, s_sn0, s_sn1, s_sc, s_sh, s_sw, c_s,
    w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, y_ptr, height, width, c_out, eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, POOL: tl.constexpr,
    HAS_SKIP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pixels [pid0 * BLOCK_M, +BLOCK_M) of output image n = pid1, all c_out channels; y: (N, c_out, H, W).

    Source rows: image n of a source starts at (n // div) * sn0 + (n % div) * sn1 (div = 1: a plain NCHW tensor;
    div = F - 1, sn0 = latent batch stride, sn1 = frame stride: a frame of a latent pair).
    """
    n = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 index math throughout: it
    mask_m = pix < height * width  # cannot overflow, and the interpreter skips its (slow) int32 overflow checks
    hh, ww = pix // width, pix % width
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < c_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_base = x_ptr + (n // x_div) * x_sn0 + (n % x_div) * x_sn1
    acc = _accumulate(acc, x_base, c_x, 0, x_sc, x_sh, x_sw, h_x, w_x, hh, ww, mask_m, height, width,
                      w_ptr, c_x + c_s, c_out, cols, mask_n, BLOCK_K, POOL, DOT_FP32, PRECISION)  # fmt: skip
    if HAS_SKIP:
        s_base = s_ptr + (n // s_div) * s_sn0 + (n % s_div) * s_sn1
        acc = _accumulate(acc, s_base, c_s, c_x, s_sc, s_sh, s_sw, height, width, hh, ww, mask_m, height, width,
                          w_ptr, c_x + c_s, c_out, cols, mask_n, BLOCK_K, False, DOT_FP32, PRECISION)  # fmt: skip
    y = _norm_act(acc, cols, mask_n, bias_ptr, ln_w_ptr, ln_b_ptr, c_out, eps)
    hw = height * width
    out = y_ptr + n * c_out * hw + cols[None, :] * hw + pix[:, None]
    store_rounded(out, y, mask_m[:, None] & mask_n[None, :])


@triton.jit
def _interp_head_kernel(
    x_ptr, x_sn, x_sc, x_sh, x_sw, c_x,
    w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, ow_ptr, ob_ptr,
    lat_ptr, l_sb, l_sc, l_sf, l_sh, l_sw, out_ptr, o_sb, o_sc, o_sf,
    n_pairs, height, width, c_lat, eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    RESIDUAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pair n = b (F - 1) + i = pid1, pixels [pid0 * BLOCK_M, +BLOCK_M): the last unit (c_x -> c_x), the 1x1 conv
    (weights ow: (c_x, C)), + 0.5 (frame i + frame i + 1), written to out[b, :, 2i + 1]; also copies frame i to
    out[b, :, 2i] (and the last pair frame F - 1 to 2F - 2). out: (B, C, 2F - 1, H, W), pixels contiguous."""
    n = tl.program_id(1).to(tl.int64)
    b, i = n // n_pairs, n % n_pairs
    pix = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = pix < height * width
    hh, ww = pix // width, pix % width
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < c_x
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, x_ptr + n * x_sn, c_x, 0, x_sc, x_sh, x_sw, height, width, hh, ww, mask_m, height, width,
                      w_ptr, c_x, c_x, cols, mask_n, BLOCK_K, False, DOT_FP32, PRECISION)  # fmt: skip
    y = _norm_act(acc, cols, mask_n, bias_ptr, ln_w_ptr, ln_b_ptr, c_x, eps)  # (BLOCK_M, BLOCK_N) fp32
    ch = tl.arange(0, BLOCK_C)
    mask_ch = ch < c_lat
    w_out = tl.load(ow_ptr + cols[:, None] * c_lat + ch[None, :], mask=mask_n[:, None] & mask_ch[None, :], other=0.0)
    if not DOT_FP32:  # low precision on the GPU: the activation in the model's dtype, as the torch path has it
        y = y.to(w_out.dtype)
    delta = _dot(y, w_out, tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), DOT_FP32, PRECISION)
    delta += tl.load(ob_ptr + ch, mask=mask_ch, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_ch[None, :]
    frame_a = lat_ptr + b * l_sb + i * l_sf + ch[None, :].to(tl.int64) * l_sc + (hh * l_sh + ww * l_sw)[:, None]
    first = tl.load(frame_a, mask=mask, other=0.0)
    second = tl.load(frame_a + l_sf, mask=mask, other=0.0)
    mid = delta
    if RESIDUAL:
        mid += 0.5 * (first.to(tl.float32) + second.to(tl.float32))
    out_a = out_ptr + b * o_sb + 2 * i * o_sf + ch[None, :].to(tl.int64) * o_sc + pix[:, None]
    tl.store(out_a, first, mask=mask)  # originals: copied bits, no arithmetic
    store_rounded(out_a + o_sf, mid, mask)
    tl.store(out_a + 2 * o_sf, second, mask=mask & (i == n_pairs - 1))


# ------------------------------------------------------------------------------------------------------ launchers ---
def _blocks(c_in: int, c_out: int, dtype: torch.dtype, pool: bool = False) -> dict:
    """Tile sizes: all c_out channels (padded to a power of two >= 16, tl.dot's minimum) x BLOCK_M pixels, the
    channel chunk BLOCK_K within the input and weight tile budgets (halved for fp32 operands on a GPU, and the input
    tile's again for a pooled load, which reads four pixels for each)."""
    div = 2 if dtype == torch.float32 and not interpreting() else 1
    a_tile = _A_TILE_ELEMS // div // (2 if pool else 1)
    block_n = max(16, triton.next_power_of_2(c_out))
    block_m = max(16, min(128, _TILE_ELEMS // div // block_n, a_tile // 16))
    # 128 x 32 inputs spilled at every warp count, 128 x 16 does not (pooled: 64 x 16); 32 x 512 weights spilled too.
    block_k = max(16, min(32, triton.next_power_of_2(c_in), a_tile // block_m, _B_TILE_ELEMS // div // block_n))
    if interpreting() and _INTERPRETER_BLOCK_M:
        block_m = _INTERPRETER_BLOCK_M
    return {"BLOCK_M": block_m, "BLOCK_K": block_k, "BLOCK_N": block_n}


def _tuning(consts: dict) -> dict:
    """What the autotuner may try for a convolution tile (kernels/_dispatch.py tune_configs): the accumulators and
    the input tile (its int64 addresses and masks take 8 registers an element) within 64 registers a thread, so 4
    warps are not tried for a 128 x 16 input tile (nor a pooled 64 x 16 one); with fp32 operands on a GPU twice that,
    and at most 8 warps (at 16 the 128-register cap spills the pooled loads)."""
    fp32 = consts["DOT_FP32"] and not interpreting()
    f = 2 if fp32 else 1
    a = 8 * f * (2 if consts.get("POOL") else 1)  # a pooled input element is four loads and their addresses
    return {"tile": (("BLOCK_M", "BLOCK_N", f), ("BLOCK_M", "BLOCK_K", a)), "max_warps": 8 if fp32 else 16}


def _dot_mode(dtype: torch.dtype) -> dict:
    """fp32 operands under the interpreter (its bf16 dot is wrong) and for fp32 models, whose precision follows
    torch's own conv setting (cudnn.allow_tf32, True by default); native fp16/bf16 tensor-core dots otherwise."""
    if interpreting():
        return {"DOT_FP32": True, "PRECISION": "ieee"}
    if dtype == torch.float32:
        return {"DOT_FP32": True, "PRECISION": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"}
    return {"DOT_FP32": False, "PRECISION": "ieee"}


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> (9, Cin, Cout): a chunk of channels at one tap is a contiguous (BLOCK_K, Cout) tile."""
    return weight.permute(2, 3, 1, 0).reshape(9, weight.shape[1], weight.shape[0]).contiguous()


def _plain(t: torch.Tensor) -> tuple:
    """Source arguments (ptr, div, sn0, sn1, sc, sh, sw) of an (N, C, H, W) tensor or view."""
    return (t, 1, t.stride(0), 0, *t.stride()[1:])


def _conv_forward(x, weight, bias, ln_weight, ln_bias, eps, skip, pool, pairs_of=0):
    """Launch one unit. pairs_of = F > 0: x and skip are the frames i and i + 1 of a (B, C, F, H, W) latent."""
    if pairs_of:
        lat = x
        x, skip = lat[:, :, :-1], lat[:, :, 1:]  # views: (B, C, F - 1, H, W) each
        n, c_x, (h, w) = lat.shape[0] * (pairs_of - 1), lat.shape[1], lat.shape[-2:]
        sb, sc, sf, sh, sw = lat.stride()
        src_x, src_s = (x, pairs_of - 1, sb, sf, sc, sh, sw), (skip, pairs_of - 1, sb, sf, sc, sh, sw)
        h_x, w_x = h, w
    else:
        n, c_x, h_x, w_x = x.shape
        h, w = (-(-h_x // 2), -(-w_x // 2)) if pool else (h_x, w_x)
        src_x, src_s = _plain(x), _plain(skip if skip is not None else x)
    c_s = skip.shape[1] if skip is not None else 0
    c_out = weight.shape[0]
    y = torch.empty(n, c_out, h, w, device=x.device, dtype=x.dtype)
    blocks = _blocks(max(c_x, c_s), c_out, x.dtype, pool)
    grid = (triton.cdiv(h * w, blocks["BLOCK_M"]), n)
    args = (*src_x, c_x, h_x, w_x, *src_s, c_s, _taps(weight), bias, ln_weight, ln_bias, y, h, w, c_out, eps)
    consts = {**blocks, "POOL": pool, "HAS_SKIP": skip is not None, **_dot_mode(x.dtype)}
    launch(
        _conv_norm_act_kernel,
        grid,
        args,
        consts,
        tune_key=("c_x", "c_s", "c_out", "width"),
        **_tuning(consts),
    )
    return y


def _head_forward(x, weight, bias, ln_weight, ln_bias, eps, out_weight, out_bias, latents, residual):
    bsz, c, f, h, w = latents.shape
    n, c_x = x.shape[:2]
    out = torch.empty(bsz, c, 2 * f - 1, h, w, device=x.device, dtype=latents.dtype)
    w_out = out_weight.reshape(c, c_x).t().contiguous()  # (c1, C): the 1x1 conv as a right-hand GEMM operand
    blocks = _blocks(c_x, c_x, x.dtype)
    grid = (triton.cdiv(h * w, blocks["BLOCK_M"]), n)
    args = (x, *x.stride(), c_x, _taps(weight), bias, ln_weight, ln_bias, w_out, out_bias, latents, *latents.stride(),
            out, *out.stride()[:3], f - 1, h, w, c, eps)  # fmt: skip
    consts = {**blocks, "BLOCK_C": max(16, triton.next_power_of_2(c)), "RESIDUAL": residual, **_dot_mode(x.dtype)}
    launch(_interp_head_kernel, grid, args, consts, tune_key=("c_x", "c_lat", "width"), **_tuning(consts))
    return out


# ------------------------------------------------------------------------------------------------- custom ops ---
@torch.library.custom_op("vidistill::conv_norm_act", mutates_args=())
def _conv_norm_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    skip: Optional[torch.Tensor],
    pool: bool,
) -> torch.Tensor:
    """(N, Cout, H, W) in x.dtype; see conv_norm_act."""
    return _conv_forward(x, weight, bias, ln_weight, ln_bias, eps, skip, pool)


@_conv_norm_act_op.register_fake
def _(x, weight, bias, ln_weight, ln_bias, eps, skip, pool):
    h, w = x.shape[-2:]
    h, w = ((h + 1) // 2, (w + 1) // 2) if pool else (h, w)
    return x.new_empty(x.shape[0], weight.shape[0], h, w)


@torch.library.custom_op("vidistill::pair_conv_norm_act", mutates_args=())
def _pair_conv_norm_act_op(
    latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:  # fmt: skip
    """(B (F - 1), Cout, H, W) in latents.dtype; see pair_conv_norm_act."""
    return _conv_forward(latents, weight, bias, ln_weight, ln_bias, eps, None, False, pairs_of=latents.shape[2])


@_pair_conv_norm_act_op.register_fake
def _(latents, weight, bias, ln_weight, ln_bias, eps):
    b, _, f, h, w = latents.shape
    return latents.new_empty(b * (f - 1), weight.shape[0], h, w)


@torch.library.custom_op("vidistill::interp_head", mutates_args=())
def _interp_head_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    eps: float, out_weight: torch.Tensor, out_bias: torch.Tensor, latents: torch.Tensor, residual: bool,
) -> torch.Tensor:  # fmt: skip
    """(B, C, 2F - 1, H, W) in latents.dtype; see interp_head."""
    return _head_forward(x, weight, bias, ln_weight, ln_bias, eps, out_weight, out_bias, latents, residual)


@_interp_head_op.register_fake
def _(x, weight, bias, ln_weight, ln_bias, eps, out_weight, out_bias, latents, residual):
    b, c, f, h, w = latents.shape
    return latents.new_empty(b, c, 2 * f - 1, h, w)


# --------------------------------------------------------------------------------------------------------- public ---
def _forward_only(*tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            "the fused interpolation U-Net kernels are forward only: call them under torch.no_grad() (training "
            "uses the model's torch path)"
        )


def _check_unit(x, weight, bias, ln_weight, ln_bias, c_in: int) -> None:
    """Shapes and dtypes of one ConvNormAct's parameters for an input of c_in channels."""
    c_out = weight.shape[0] if weight.dim() == 4 else -1
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (c_in, 3, 3):
        raise ValueError(
            f"conv weight must be (Cout, {c_in}, 3, 3) for {c_in} input channels, got {tuple(weight.shape)}"
        )
    if any(tuple(t.shape) != (c_out,) for t in (bias, ln_weight, ln_bias)):
        raise ValueError(f"conv bias, norm weight and norm bias must be ({c_out},) each")
    if not 1 <= c_out <= MAX_CHANNELS:
        raise ValueError(f"{c_out} output channels: the fused kernel holds at most {MAX_CHANNELS} per pixel tile")
    if any(t.dtype != x.dtype for t in (weight, bias, ln_weight, ln_bias)):
        raise ValueError(f"parameters must have the input's dtype {x.dtype}, got {weight.dtype}")


def conv_norm_act(x, weight, bias, ln_weight, ln_bias, eps: float, skip=None, pool: bool = False) -> torch.Tensor:
    """SiLU(LayerNorm over channels(conv3x3([maxpool(x) if pool else x; skip]))), forward only.

    x: (N, Cx, Hx, Wx), any strides (a cropped view is read in place); skip: (N, Cs, H, W) or None, concatenated
    after x on channels without a copy; pool: x is max-pooled 2x2 (ceil mode) on load, so (H, W) = ceil((Hx, Wx) / 2).
    weight: (Cout, Cx + Cs, 3, 3), Cout <= 512; bias, ln_weight, ln_bias: (Cout,). Returns (N, Cout, H, W) in x.dtype.
    Triton on CUDA tensors (or when forced by VIDISTILL_KERNELS=triton), the reference otherwise.
    """
    tensors = (x, weight, bias, ln_weight, ln_bias) + ((skip,) if skip is not None else ())
    if not use_triton(*tensors):
        return conv_norm_act_reference(x, weight, bias, ln_weight, ln_bias, eps, skip, pool)
    if x.dim() != 4 or (skip is not None and skip.dim() != 4):
        raise ValueError(f"conv_norm_act expects x (N, C, H, W), got {tuple(x.shape)}")
    grid = ((x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2) if pool else tuple(x.shape[2:])
    if skip is not None and (skip.shape[0] != x.shape[0] or tuple(skip.shape[2:]) != grid or skip.dtype != x.dtype):
        raise ValueError(f"skip must be ({x.shape[0]}, Cs, {grid[0]}, {grid[1]}) in {x.dtype}, got {tuple(skip.shape)}")
    _check_unit(x, weight, bias, ln_weight, ln_bias, x.shape[1] + (skip.shape[1] if skip is not None else 0))
    _forward_only(*tensors)
    return torch.ops.vidistill.conv_norm_act(x, weight, bias, ln_weight, ln_bias, eps, skip, pool)


def _check_latents(latents: torch.Tensor) -> None:
    if latents.dim() != 5 or latents.shape[2] < 2:
        raise ValueError(f"latents must be (B, C, F, H, W) with F >= 2, got {tuple(latents.shape)}")


def pair_conv_norm_act(latents, weight, bias, ln_weight, ln_bias, eps: float) -> torch.Tensor:
    """The U-Net's first unit on every adjacent pair [frame i; frame i + 1], read straight from the latent.

    latents: (B, C, F, H, W), F >= 2, any strides (e.g. ``latents[:, :, ::2]``); weight: (Cout, 2C, 3, 3).
    Returns (B (F - 1), Cout, H, W), pair n = b (F - 1) + i, as ``conv_norm_act(frame_pairs(latents), ...)``.
    """
    if not use_triton(latents, weight, bias, ln_weight, ln_bias):
        return pair_conv_norm_act_reference(latents, weight, bias, ln_weight, ln_bias, eps)
    _check_latents(latents)
    _check_unit(latents, weight, bias, ln_weight, ln_bias, 2 * latents.shape[1])
    _forward_only(latents, weight, bias, ln_weight, ln_bias)
    return torch.ops.vidistill.pair_conv_norm_act(latents, weight, bias, ln_weight, ln_bias, eps)


def interp_head(x, weight, bias, ln_weight, ln_bias, eps, out_weight, out_bias, latents, residual=True):
    """The U-Net's last unit + 1x1 conv + 0.5 (frame i + frame i + 1) (if residual), interleaved with the originals.

    x: (B (F - 1), c1, H, W); weight: (c1, c1, 3, 3); out_weight: (C, c1, 1, 1); out_bias: (C,);
    latents: (B, C, F, H, W), any strides. Returns (B, C, 2F - 1, H, W): latents at even frames (bit-exact copies),
    generated frames at odd ones.
    """
    tensors = (x, weight, bias, ln_weight, ln_bias, out_weight, out_bias, latents)
    if not use_triton(*tensors):
        return interp_head_reference(x, weight, bias, ln_weight, ln_bias, eps, out_weight, out_bias, latents, residual)
    _check_latents(latents)
    b, c, f, h, w = latents.shape
    if x.dim() != 4 or x.shape[0] != b * (f - 1) or tuple(x.shape[2:]) != (h, w) or x.dtype != latents.dtype:
        raise ValueError(f"x must be ({b * (f - 1)}, c1, {h}, {w}) in {latents.dtype}, got {tuple(x.shape)}")
    _check_unit(x, weight, bias, ln_weight, ln_bias, x.shape[1])
    if tuple(out_weight.shape) != (c, x.shape[1], 1, 1) or tuple(out_bias.shape) != (c,):
        raise ValueError(f"out_weight must be ({c}, {x.shape[1]}, 1, 1) and out_bias ({c},)")
    _forward_only(*tensors)
    return torch.ops.vidistill.interp_head(
        x, weight, bias, ln_weight, ln_bias, eps, out_weight, out_bias, latents, residual
    )
