"""Triton twins of `reference.quantize`: `quantize` (KIVI, asymmetric 2/4-bit groups with packing)
and `quantize_symmetric` (NF 2/3/4-bit, NFH, int8, fp8: one absmax scale per block of one token).

Reads top to bottom: helpers -> KIVI token-axis kernel -> KIVI channel-axis kernel -> symmetric
kernel -> launchers. Both are bit for bit `reference.quantize` (the test oracle); for KIVI:

  mn    = min(x_group)                                     float32, stored in x.dtype (exact)
  scale = div_rn(max(x_group) - mn, 2^bits - 1)            float32, stored in x.dtype (RNE)
  code  = clamp(floor(div_rn(x - mn, scale) + 0.5), 0, 2^bits - 1), 0 where scale == 0

where `scale` in the code formula is the *stored* (rounded) scale read back as float32.
Divisions use `tl.math.div_rn` (IEEE round-to-nearest; in Triton since 3.0): the plain `/` of
float32 lowers to an approximate divide on NVIDIA GPUs, which would flip codes at .5 ties.

Layouts (see reference.py): x [B, H, N, D] -> codes uint8 [B, H, N, D*bits/8] (8/bits codes per
byte, low bits first), scale and mn [B, H, N/G, D] (axis 2, TOKEN_AXIS) or [B, H, N, D/G]
(axis 3, CHANNEL_AXIS).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

TOKEN_AXIS = 2
CHANNEL_AXIS = 3

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Elements of x held in registers per program (a [rows, bytes, codes-per-byte] tile).
_TILE_ELEMS = 4096


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


# Reductions. tl.sum / tl.max / tl.min are @triton.jit functions of Triton's standard library,
# decorated when triton is imported: they run under the interpreter only if TRITON_INTERPRET=1 was set
# before *triton* was imported (torch._dynamo imports it early). When this module is interpreted but
# triton was not imported for interpretation, reduce with our own combine functions instead (builtins
# only; slower in the interpreter). On a GPU both compile to the same code.
_STD_REDUCTIONS = tl.constexpr(
    os.environ.get("TRITON_INTERPRET", "0") != "1" or type(tl.sum).__name__ == "InterpretedFunction"
)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    if _STD_REDUCTIONS:
        return tl.sum(x, axis)
    else:
        return tl.reduce(x, axis, _add)


@triton.jit
def reduce_max(x, axis: tl.constexpr):
    if _STD_REDUCTIONS:
        return tl.max(x, axis)
    else:
        return tl.reduce(x, axis, _maximum)


@triton.jit
def reduce_min(x, axis: tl.constexpr):
    if _STD_REDUCTIONS:
        return tl.min(x, axis)
    else:
        return tl.reduce(x, axis, _minimum)


@triton.jit
def round_to_storage(x, IS_BF16: tl.constexpr, DTYPE: tl.constexpr):
    """float32 x rounded (to nearest even) to DTYPE, returned as DTYPE.

    For bfloat16 the rounding is done on the bits: the interpreter's float32 -> bfloat16 cast
    truncates (TRITON_INTERPRET=1, Triton <= 3.9), while GPUs round to nearest even. Once x holds a
    bfloat16 value exactly, the cast is exact everywhere. NaN is not expected (groups are finite)."""
    if IS_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _codes(x, mn, s, QMAX: tl.constexpr):
    """float32 codes of x given float32 mn and *stored* scale s (broadcastable): the reference's
    clamp(floor((x - mn) / s + 0.5), 0, qmax), and 0 where s == 0 (s == 0 -> divide by 1, no NaN)."""
    ok = s > 0
    q = tl.floor(tl.math.div_rn(x - mn, tl.where(ok, s, 1.0)) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    return tl.where(ok, q, 0.0)


# ----------------------------------------------------------------------------------------------
# axis 2 (TOKEN_AXIS): a group is G consecutive tokens of one channel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _quantize_tokens_kernel(
    X, C, S, MN,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_cb, stride_ch, stride_cn,
    stride_sb, stride_sh, stride_sn,
    H, D, NBY, N_GROUPS, N_DBLK, row, srow,
    GROUP: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_BY: tl.constexpr,
):
    """One program quantizes one group of GROUP tokens for BLOCK_BY * PER channels.

    X  [B, H, N, D]                 any strides
    C  [B, H, >= row + N, NBY]      uint8, last stride 1 (NBY = D / PER bytes per token)
    S, MN [B, H, >= srow + N/G, D]  x.dtype, last stride 1
    grid: (B * H * N_GROUPS * N_DBLK,)   N_GROUPS = N / GROUP, N_DBLK = cdiv(NBY, BLOCK_BY)
    Two passes over the group's tokens in chunks of BLOCK_T (min/max, then codes), so any GROUP
    fits in registers. The tile is [BLOCK_T, BLOCK_BY, PER]: channel = byte * PER + slot.
    """
    pid = tl.program_id(0).to(tl.int64)
    dblk = pid % N_DBLK
    grp = (pid // N_DBLK) % N_GROUPS
    bh = pid // (N_DBLK * N_GROUPS)
    b = bh // H
    h = bh % H

    offs_by = dblk * BLOCK_BY + tl.arange(0, BLOCK_BY)  # [BLOCK_BY] byte column
    slot = tl.arange(0, PER)  # [PER] code slot within a byte
    chan = offs_by[:, None] * PER + slot[None, :]  # [BLOCK_BY, PER]
    chan_ok = chan < D
    by_ok = offs_by < NBY
    t0 = grp * GROUP
    xp = X + b * stride_xb + h * stride_xh

    # -- pass 1: min / max over the group's tokens --
    mn = tl.full((BLOCK_BY, PER), float("inf"), tl.float32)
    mx = tl.full((BLOCK_BY, PER), float("-inf"), tl.float32)
    for t in range(0, GROUP, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        ok = (offs_t < GROUP)[:, None, None] & chan_ok[None, :, :]
        ptrs = xp + (t0 + offs_t)[:, None, None] * stride_xn + chan[None, :, :] * stride_xd
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, reduce_min(tl.where(ok, x, float("inf")), axis=0))
        mx = tl.maximum(mx, reduce_max(tl.where(ok, x, float("-inf")), axis=0))

    # -- scale in the storage dtype, then read back: codes use what dequantization will see --
    scale = tl.math.div_rn(mx - mn, tl.full(mx.shape, (1 << BITS) - 1, tl.float32))
    scale = round_to_storage(scale, IS_BF16, S.dtype.element_ty)
    sp = (srow + grp) * stride_sn + chan
    tl.store(S + b * stride_sb + h * stride_sh + sp, scale, mask=chan_ok)
    tl.store(MN + b * stride_sb + h * stride_sh + sp, mn.to(MN.dtype.element_ty), mask=chan_ok)
    s = scale.to(tl.float32)

    # -- pass 2: codes, packed PER to a byte, low bits first --
    shift = slot * BITS
    cp = C + b * stride_cb + h * stride_ch
    for t in range(0, GROUP, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        t_ok = offs_t < GROUP
        ok = t_ok[:, None, None] & chan_ok[None, :, :]
        ptrs = xp + (t0 + offs_t)[:, None, None] * stride_xn + chan[None, :, :] * stride_xd
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        q = _codes(x, mn[None, :, :], s[None, :, :], (1 << BITS) - 1).to(tl.int32)
        packed = reduce_sum(q << shift[None, None, :], axis=2)  # [BLOCK_T, BLOCK_BY], bits disjoint
        cptrs = cp + (row + t0 + offs_t)[:, None] * stride_cn + offs_by[None, :]
        tl.store(cptrs, packed.to(tl.uint8), mask=t_ok[:, None] & by_ok[None, :])


# ----------------------------------------------------------------------------------------------
# axis 3 (CHANNEL_AXIS): a group is G consecutive channels of one token
# ----------------------------------------------------------------------------------------------


@triton.jit
def _quantize_channels_kernel(
    X, C, S, MN,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_cb, stride_ch, stride_cn,
    stride_sb, stride_sh, stride_sn,
    H, N, N_TBLK, row, srow,
    GROUP: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, IS_BF16: tl.constexpr, WIDE: tl.constexpr,
    NA: tl.constexpr, NB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program quantizes BLOCK_T whole tokens (all D channels).

    X  [B, H, N, D]                  any strides
    C  [B, H, >= row + N, D / PER]   uint8, last stride 1
    S, MN [B, H, >= srow + N, D / G] x.dtype, last stride 1
    grid: (B * H * N_TBLK,)          N_TBLK = cdiv(N, BLOCK_T)

    The tile is 4-d, [BLOCK_T, A, B, C], so that groups and bytes are both whole sub-blocks:
      WIDE (G % PER == 0): A = group (NA = D/G), B = byte in group (NB = G/PER), C = slot (PER);
                           channel = a*G + b*PER + c
      else (PER % G == 0): A = byte (NA = D/PER), B = group in byte (PER/G), C = channel in group;
                           channel = a*PER + b*G + c
    """
    pid = tl.program_id(0).to(tl.int64)
    tblk = pid % N_TBLK
    bh = pid // N_TBLK
    b = bh // H
    h = bh % H

    offs_t = tblk * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < N
    a = tl.arange(0, BLOCK_A)[None, :, None, None]
    bb = tl.arange(0, BLOCK_B)[None, None, :, None]
    c = tl.arange(0, BLOCK_C)[None, None, None, :]
    t4 = offs_t[:, None, None, None]
    if WIDE:
        chan = a * GROUP + bb * PER + c
        ok = (a < NA) & (bb < NB)  # [1, A, B, 1]
        shift = c * BITS
        byte = a * NB + bb  # [1, A, B, 1]
        group = a  # [1, A, 1, 1]
    else:
        chan = a * PER + bb * GROUP + c
        ok = a < NA  # [1, A, 1, 1]
        shift = (bb * GROUP + c) * BITS
        byte = a  # [1, A, 1, 1]
        group = a * (PER // GROUP) + bb  # [1, A, B, 1]
    ok = ok & (t4 < N)

    # -- load whole tokens --
    x = tl.load(X + b * stride_xb + h * stride_xh + t4 * stride_xn + chan * stride_xd, mask=ok, other=0.0)
    x = x.to(tl.float32)

    # -- min / max over each group: the last axis, and also B when a group spans whole bytes --
    mn = reduce_min(tl.where(ok, x, float("inf")), axis=3)[:, :, :, None]
    mx = reduce_max(tl.where(ok, x, float("-inf")), axis=3)[:, :, :, None]
    if WIDE:
        mn = reduce_min(mn, axis=2)[:, :, None, :]
        mx = reduce_max(mx, axis=2)[:, :, None, :]
    scale = tl.math.div_rn(mx - mn, tl.full(mx.shape, (1 << BITS) - 1, tl.float32))
    scale = round_to_storage(scale, IS_BF16, S.dtype.element_ty)
    s = scale.to(tl.float32)

    # -- codes, packed PER to a byte --
    q = _codes(x, mn, s, (1 << BITS) - 1).to(tl.int32)
    packed = reduce_sum(q << shift, axis=3)[:, :, :, None]
    if not WIDE:
        packed = reduce_sum(packed, axis=2)[:, :, None, :]

    # -- store: the reductions above leave each of scale/mn/packed broadcast-shaped with group/byte --
    if WIDE:
        g_ok = (a < NA) & t_ok[:, None, None, None]
        by_ok = (a < NA) & (bb < NB) & t_ok[:, None, None, None]
    else:
        g_ok = (a < NA) & t_ok[:, None, None, None]
        by_ok = g_ok
    sp = (srow + t4) * stride_sn + group
    tl.store(S + b * stride_sb + h * stride_sh + sp, scale, mask=g_ok)
    tl.store(MN + b * stride_sb + h * stride_sh + sp, mn.to(MN.dtype.element_ty), mask=g_ok)
    cptrs = C + b * stride_cb + h * stride_ch + (row + t4) * stride_cn + byte
    tl.store(cptrs, packed.to(tl.uint8), mask=by_ok)


# ----------------------------------------------------------------------------------------------
# the symmetric formats (nqkv NF, int8, fp8): blocks of G channels of one token, one scale each
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rint(x):
    """Round float32 x >= 0 (< 2^22) to the nearest integer, ties to even, as uint32."""
    f = tl.floor(x)
    d = x - f
    i = f.to(tl.uint32)
    return i + ((d > 0.5) | ((d == 0.5) & ((i & 1) == 1))).to(tl.uint32)


@triton.jit
def _e4m3(u):
    """float32 u (|u| <= 448) -> its float8 e4m3fn byte, rounding to nearest even as torch's cast
    does, from the float32 bits: the sign; subnormals (|u| < 2^-6) as round(|u| * 2^9); normals as
    (exponent + 7, top 3 mantissa bits) rounded on the 20 dropped bits (a carry moves the exponent)."""
    bits = u.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 7
    a = bits & 0x7FFFFFFF
    mag = a.to(tl.float32, bitcast=True)
    # subnormal: mag * 512 is exact; rint = round half to even
    sub = _rint(mag * 512.0)
    e = (a >> 23).to(tl.int32) - 127
    keep = (a >> 20) & 7
    rest = a & 0xFFFFF
    up = (rest > 0x80000) | ((rest == 0x80000) & ((keep & 1) == 1))
    normal = (((e + 7).to(tl.uint32) << 3) | keep) + up.to(tl.uint32)
    code = tl.where(mag < 0.015625, sub, normal)
    return (code | sign).to(tl.uint8)


@triton.jit
def _quantize_symmetric_kernel(
    X, C, S, MIDS,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_cb, stride_ch, stride_cn,
    stride_sb, stride_sh, stride_sn,
    H, N, N_TBLK, row, srow,
    D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, IS_BF16: tl.constexpr,
    PERW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One program quantizes BLOCK_T whole tokens (all D channels) into a symmetric format.

    X  [B, H, N, D]                          any strides (float32 for NFH: already transformed)
    C  [B, H, >= row + N, D * BITS / 8]      uint8, last stride 1
    S  [B, H, >= srow + N, D / GROUP]        the cache dtype, last stride 1
    MIDS  the 2^BITS - 1 NF decision boundaries (float32; FMT NF only)
    grid: (B * H * N_TBLK,)

    Two phases: (1) a [BLOCK_T, blocks, GROUP] tile gives each block's absmax and its scale, stored;
    (2) after a barrier, a [BLOCK_T, words, PERW] tile (PERW codes per packed word: 8 / BITS per byte,
    or 8 3-bit codes per 3 bytes) reads each channel's *stored* scale back, as the reference computes
    codes with it, and packs the codes."""
    pid = tl.program_id(0).to(tl.int64)
    tblk = pid % N_TBLK
    bh = pid // N_TBLK
    b = bh // H
    h = bh % H
    offs_t = tblk * BLOCK_T + tl.arange(0, BLOCK_T)
    t3 = offs_t[:, None, None]
    t_ok = t3 < N
    xb = X + b * stride_xb + h * stride_xh + t3 * stride_xn
    sb = S + b * stride_sb + h * stride_sh + (srow + t3) * stride_sn

    # -- (1) scale of each block --
    a = tl.arange(0, BLOCK_A)[None, :, None]
    g = tl.arange(0, BLOCK_G)[None, None, :]
    ok = t_ok & (a < D // GROUP) & (g < GROUP)
    x = tl.load(xb + (a * GROUP + g) * stride_xd, mask=ok, other=0.0).to(tl.float32)
    amax = reduce_max(tl.abs(x), axis=2)[:, :, None]  # [T, A, 1]
    if FMT == 1:
        scale = amax
    elif FMT == 2:
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    else:
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    tl.store(sb + a, round_to_storage(scale, IS_BF16, S.dtype.element_ty), mask=t_ok & (a < D // GROUP))
    tl.debug_barrier()  # the stores above are read back below, by other threads of this program

    # -- (2) codes from the stored scales, packed --
    w = tl.arange(0, BLOCK_W)[None, :, None]
    j = tl.arange(0, PERW)[None, None, :]
    chan = w * PERW + j
    ok = t_ok & (chan < D)
    x = tl.load(xb + chan * stride_xd, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sb + chan // GROUP, mask=ok, other=0.0).to(tl.float32)
    pos = s > 0
    u = tl.where(pos, tl.math.div_rn(x, tl.where(pos, s, 1.0)), 0.0)
    if FMT == 1:  # NF: the number of decision boundaries below u (the nearest level, ties down)
        q = tl.zeros(u.shape, tl.int32)
        for i in tl.static_range((1 << BITS) - 1):
            q += (u > tl.load(MIDS + i)).to(tl.int32)
    elif FMT == 2:  # INT8: code + 128
        q = (tl.minimum(tl.maximum(tl.floor(u + 0.5), -127.0), 127.0) + 128.0).to(tl.int32)
    else:  # FP8
        q = _e4m3(tl.minimum(tl.maximum(u, -448.0), 448.0)).to(tl.int32)
    word = reduce_sum(q << (j * BITS), axis=2)  # [T, W]
    cb = C + b * stride_cb + h * stride_ch + (row + offs_t[:, None]) * stride_cn
    wv = tl.arange(0, BLOCK_W)[None, :]
    w_ok = (offs_t < N)[:, None] & (wv * PERW < D)
    if BITS == 3:  # 8 codes in a little-endian 24-bit word: 3 bytes
        for k in tl.static_range(3):
            tl.store(cb + 3 * wv + k, ((word >> (8 * k)) & 255).to(tl.uint8), mask=w_ok)
    else:
        tl.store(cb + wv, word.to(tl.uint8), mask=w_ok)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def _check_out(out, x: Tensor, bits: int, group: int, axis: int, row: int, srow: int, mn_width=None):
    """Raise ValueError unless out = (codes, scale, mn) can take x's N tokens at rows row / srow.
    mn_width: the width of mn (None: that of scale, KIVI; 0 for the symmetric formats)."""
    B, H, N, D = x.shape
    if len(out) != 3:
        raise ValueError(f"out must be (codes, scale, mn); got {len(out)} tensors")
    codes, scale, mn = out
    nby = D * bits // 8
    ns, sw = (N // group, D) if axis == TOKEN_AXIS else (N, D // group)
    for name, t, rows, width, dtype in (("codes", codes, row + N, nby, torch.uint8),
                                        ("scale", scale, srow + ns, sw, x.dtype),
                                        ("mn", mn, srow + ns, sw if mn_width is None else mn_width, x.dtype)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != width or t.shape[2] < rows:
            raise ValueError(
                f"out {name} must have shape [{B}, {H}, >= {rows}, {width}] to take {N} tokens at row "
                f"{row if name == 'codes' else srow}; got {list(t.shape)}"
            )
        if t.dtype != dtype:
            raise ValueError(f"out {name} must have dtype {dtype}; got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"out {name} is on {t.device}, x on {x.device}")
        if t.shape[3] > 0 and t.stride(3) != 1:
            raise ValueError(f"out {name} must be contiguous along its last dim; got strides {t.stride()}")


def quantize(
    x: Tensor,
    bits: int,
    group: int,
    axis: int,
    out: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    row: int = 0,
    scale_row: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize x [B, H, N, D] (fp32/fp16/bf16, any strides) into (codes, scale, mn).

    Bit-exact with `reference.quantize(x, bits, group, axis)`.

    Args:
      bits: 2 or 4. D must be a multiple of 8 / bits.
      group: G. axis 2 (TOKEN_AXIS): G consecutive tokens per channel, N % G == 0.
             axis 3 (CHANNEL_AXIS): G consecutive channels per token, D % G == 0, and G a
             multiple or a divisor of 8 / bits (a group is whole bytes, or a byte whole groups).
      out: optional destination (codes uint8 [B, H, R, D*bits/8], scale, mn [B, H, Rs, Ds] in
           x.dtype), last dim contiguous. The N tokens are written at codes rows
           [row, row + N) and scale/mn rows [scale_row, scale_row + N/G) (axis 2) or
           [scale_row, scale_row + N) (axis 3); nothing else is touched. For appending into
           padded storage (reference.PAD leading rows, Nq tokens already stored) pass
           row = PAD + Nq and scale_row = PAD + Nq // G (axis 2) / PAD + Nq (axis 3).
      scale_row: defaults to row // G (axis 2) or row (axis 3).

    Returns (codes, scale, mn): new contiguous tensors of shapes [B, H, N, D*bits/8] and
    [B, H, N/G, D] / [B, H, N, D/G], or the `out` tensors themselves.

    Grid: axis 2: (B * H * N/G * cdiv(D*bits/8, BLOCK_BY),); axis 3: (B * H * cdiv(N, BLOCK_T),).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, N, D]; got shape {list(x.shape)}")
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4 for the Triton quantizer; got {bits}")
    if axis not in (TOKEN_AXIS, CHANNEL_AXIS):
        raise ValueError(f"axis must be {TOKEN_AXIS} (token groups) or {CHANNEL_AXIS} (channel groups); got {axis}")
    B, H, N, D = x.shape
    per = 8 // bits
    if D % per:
        raise ValueError(f"{bits}-bit codes pack {per} per byte, which must divide head_dim {D}")
    if group < 1:
        raise ValueError(f"group must be >= 1; got {group}")
    if axis == TOKEN_AXIS and N % group:
        raise ValueError(f"token groups of {group} must divide the token count {N}")
    if axis == CHANNEL_AXIS:
        if D % group:
            raise ValueError(f"channel groups of {group} must divide head_dim {D}")
        if group % per and per % group:
            raise NotImplementedError(
                f"channel group {group} with {bits}-bit codes ({per} per byte): the group must be a "
                f"multiple or a divisor of {per}"
            )
    if scale_row is None:
        scale_row = row // group if axis == TOKEN_AXIS else row
    nby = D // per
    ns, sw = (N // group, D) if axis == TOKEN_AXIS else (N, D // group)
    if out is None:
        if row != 0 or scale_row != 0:
            raise ValueError("row / scale_row need out=(codes, scale, mn)")
        codes = torch.empty((B, H, N, nby), dtype=torch.uint8, device=x.device)
        scale = torch.empty((B, H, ns, sw), dtype=x.dtype, device=x.device)
        mn = torch.empty((B, H, ns, sw), dtype=x.dtype, device=x.device)
    else:
        _check_out(out, x, bits, group, axis, row, scale_row)
        codes, scale, mn = out
    if B * H * N * D == 0:
        return codes, scale, mn

    common = (
        x, codes, scale, mn,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        codes.stride(0), codes.stride(1), codes.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
    )
    if axis == TOKEN_AXIS:
        block_by = min(triton.next_power_of_2(nby), max(1, 64 // per))  # <= 64 channels a program
        block_t = max(1, min(triton.next_power_of_2(group), _TILE_ELEMS // (block_by * per)))
        n_dblk = triton.cdiv(nby, block_by)
        n_groups = N // group
        grid = (B * H * n_groups * n_dblk,)
        _quantize_tokens_kernel[grid](
            *common, H, D, nby, n_groups, n_dblk, row, scale_row,
            GROUP=group, BITS=bits, PER=per, IS_BF16=x.dtype == torch.bfloat16, BLOCK_T=block_t, BLOCK_BY=block_by,
        )
    else:
        wide = group % per == 0
        if wide:
            na, nb, nc = D // group, group // per, per
        else:
            na, nb, nc = D // per, per // group, group
        ba, bb, bc = (triton.next_power_of_2(v) for v in (na, nb, nc))
        block_t = max(1, min(triton.next_power_of_2(N), _TILE_ELEMS // (ba * bb * bc), 64))
        n_tblk = triton.cdiv(N, block_t)
        grid = (B * H * n_tblk,)
        _quantize_channels_kernel[grid](
            *common, H, N, n_tblk, row, scale_row,
            GROUP=group, BITS=bits, PER=per, IS_BF16=x.dtype == torch.bfloat16, WIDE=wide, NA=na, NB=nb,
            BLOCK_T=block_t, BLOCK_A=ba, BLOCK_B=bb, BLOCK_C=bc,
        )
    return codes, scale, mn


def quantize_symmetric(
    x: Tensor,
    bits: int,
    group: int,
    fmt: int,
    out: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    row: int = 0,
    scale_row: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize x [B, H, N, D] (fp32/fp16/bf16, any strides) into (codes, scale, mn) of a symmetric
    storage format, bit for bit `reference.quantize(x, bits, group, CHANNEL_AXIS, fmt)`.

    fmt: methods.NF (bits 2, 3, 4; group any divisor of D), NFH (the same after nqkv.fwht of each
    block, done here with torch: group a power of 2), INT8 or FP8 (bits 8, group D). mn has width 0.
    out / row / scale_row: as `quantize` (scale rows are tokens). Grid: (B * H * cdiv(N, BLOCK_T),)."""
    from ..methods import FP8, INT8, NF, NFH, nqkv

    valid = {NF: (2, 3, 4), NFH: (2, 3, 4), INT8: (8,), FP8: (8,)}
    if fmt not in valid:
        raise ValueError(f"fmt must be one of {', '.join(map(str, valid))} (methods.NF, NFH, INT8, FP8); got {fmt}")
    if bits not in valid[fmt]:
        raise ValueError(f"bits must be {', '.join(map(str, valid[fmt]))} for format {fmt}; got {bits}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, N, D]; got shape {list(x.shape)}")
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    B, H, N, D = x.shape
    perw = 8 if bits == 3 else 8 // bits  # codes per packed word (3 bytes for 3-bit codes, else a byte)
    if group < 1 or D % group:
        raise ValueError(f"group {group} must divide head_dim {D}")
    if D % perw:
        raise ValueError(f"{bits}-bit codes pack {perw} per word, which must divide head_dim {D}")
    if scale_row is None:
        scale_row = row
    if out is None:
        if row != 0 or scale_row != 0:
            raise ValueError("row / scale_row need out=(codes, scale, mn)")
        out = (torch.empty((B, H, N, D * bits // 8), dtype=torch.uint8, device=x.device),
               torch.empty((B, H, N, D // group), dtype=x.dtype, device=x.device),
               torch.empty((B, H, N, 0), dtype=x.dtype, device=x.device))
    else:
        _check_out(out, x, bits, group, CHANNEL_AXIS, row, scale_row, mn_width=0)
    codes, scale, mn = out
    if B * H * N * D == 0:
        return codes, scale, mn
    if fmt == NFH:
        if group & (group - 1):
            raise ValueError(f"the Hadamard format needs power-of-2 blocks; got group {group}")
        x = nqkv.fwht(x.float().reshape(B, H, N, D // group, group)).reshape(B, H, N, D)
    mids = nqkv.midpoints(bits, x.device) if fmt in (NF, NFH) else scale  # (else a placeholder)
    block_a, block_g = triton.next_power_of_2(D // group), triton.next_power_of_2(group)
    block_w = triton.next_power_of_2(D // perw)
    block_t = max(1, min(triton.next_power_of_2(N), _TILE_ELEMS // max(block_a * block_g, block_w * perw), 64))
    n_tblk = triton.cdiv(N, block_t)
    _quantize_symmetric_kernel[(B * H * n_tblk,)](
        x, codes, scale, mids,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        codes.stride(0), codes.stride(1), codes.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
        H, N, n_tblk, row, scale_row,
        D=D, GROUP=group, BITS=bits, FMT=NF if fmt == NFH else fmt, IS_BF16=scale.dtype == torch.bfloat16,
        PERW=perw, BLOCK_T=block_t, BLOCK_A=block_a, BLOCK_G=block_g, BLOCK_W=block_w,
    )
    return codes, scale, mn
