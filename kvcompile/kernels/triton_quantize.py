"""Triton twin of `reference.quantize`: every storage format, bit for bit (the test oracle).

Reads top to bottom: helpers -> KIVI token-axis kernel -> KIVI channel-axis kernel -> the kernel of
the per-token symmetric formats (NF 2/3/4-bit, int8, fp8) -> the launcher, `quantize(x, layout)`. For
KIVI (methods/kivi.py):

  mn    = min(x_group)                                     float32, stored in x.dtype (exact)
  scale = div_rn(max(x_group) - mn, 2^bits - 1)            float32, stored in x.dtype (RNE)
  code  = clamp(floor(div_rn(x - mn, scale) + 0.5), 0, 2^bits - 1), 0 where scale == 0

where `scale` in the code formula is the *stored* (rounded) scale read back as float32.
Divisions use `tl.math.div_rn` (IEEE round-to-nearest; in Triton since 3.0): the plain `/` of
float32 lowers to an approximate divide on NVIDIA GPUs, which would flip codes at .5 ties.

Layouts (see reference.py): x [B, H, N, D] -> codes uint8 [B, H, N, D*bits/8] (8/bits codes per
byte, low bits first; 3-bit codes 8 in 3 bytes), scale and mn [B, H, N/G, D] (TOKEN_AXIS) or
[B, H, N, D/G] (CHANNEL_AXIS); mn of width 0 for the formats that store no minimum.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..layout import TOKEN_AXIS, Layout
from ..methods import FORMATS, codes_per_word
from .common import (FMT_INT8, FMT_KIVI, FMT_NF, FP8_MAX, INT8_QMAX, INT8_ZERO, TL_DTYPES, round_to_storage)

# Elements of x held in registers per program (a [rows, bytes, codes-per-byte] tile).
_TILE_ELEMS = 4096


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _token_block(N_TBLK, H, BLOCK_T: tl.constexpr):
    """The (batch, head) and the BLOCK_T tokens of a program of grid (B * H * N_TBLK,)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // N_TBLK
    return bh // H, bh % H, (pid % N_TBLK) * BLOCK_T + tl.arange(0, BLOCK_T)


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
        mn = tl.minimum(mn, tl.min(tl.where(ok, x, float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.where(ok, x, float("-inf")), axis=0))

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
        packed = tl.sum(q << shift[None, None, :], axis=2)  # [BLOCK_T, BLOCK_BY], bits disjoint
        cptrs = cp + (row + t0 + offs_t)[:, None] * stride_cn + offs_by[None, :]
        tl.store(cptrs, packed.to(tl.uint8), mask=t_ok[:, None] & by_ok[None, :])


# ----------------------------------------------------------------------------------------------
# CHANNEL_AXIS, every format (KIVI values, nqkv NF, int8, fp8): groups of G channels of one token
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
def _quantize_per_token_kernel(
    X, C, S, MN, BOUNDS,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_cb, stride_ch, stride_cn,
    stride_sb, stride_sh, stride_sn,
    H, N, N_TBLK, row, srow,
    D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, IS_BF16: tl.constexpr,
    PERW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One program quantizes BLOCK_T whole tokens (all D channels), groups of GROUP channels.

    X  [B, H, N, D]                          any strides (float32 for NFH: already transformed)
    C  [B, H, >= row + N, D * BITS / 8]      uint8, last stride 1
    S, MN  [B, H, >= srow + N, D / GROUP]    the cache dtype, last stride 1 (MN: FMT_KIVI only)
    BOUNDS  the 2^BITS - 1 NF decision boundaries (float32; FMT_NF only)
    grid: (B * H * N_TBLK,)

    Two phases: (1) a [BLOCK_T, groups, GROUP] tile gives each group's statistics (KIVI min and max,
    the others absmax) and its scale, stored; (2) after a barrier, a [BLOCK_T, words, PERW] tile (PERW
    codes per packed word: 8 / BITS per byte, or 8 3-bit codes per 3 bytes) reads each channel's
    *stored* scale (and minimum) back, as the reference computes codes with them, and packs the codes.
    A group and a packed word need not align."""
    b, h, offs_t = _token_block(N_TBLK, H, BLOCK_T)
    t3 = offs_t[:, None, None]
    t_ok = t3 < N
    xb = X + b * stride_xb + h * stride_xh + t3 * stride_xn
    sb = S + b * stride_sb + h * stride_sh + (srow + t3) * stride_sn
    mb = MN + b * stride_sb + h * stride_sh + (srow + t3) * stride_sn

    # -- (1) scale (and minimum) of each group --
    a = tl.arange(0, BLOCK_A)[None, :, None]
    g = tl.arange(0, BLOCK_G)[None, None, :]
    ok = t_ok & (a < D // GROUP) & (g < GROUP)
    g_ok = t_ok & (a < D // GROUP)
    x = tl.load(xb + (a * GROUP + g) * stride_xd, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=2)[:, :, None]  # [T, A, 1]
    if FMT == FMT_KIVI:
        mn = tl.min(tl.where(ok, x, float("inf")), axis=2)[:, :, None]
        mx = tl.max(tl.where(ok, x, float("-inf")), axis=2)[:, :, None]
        scale = tl.math.div_rn(mx - mn, tl.full(mx.shape, (1 << BITS) - 1, tl.float32))
        tl.store(mb + a, mn.to(MN.dtype.element_ty), mask=g_ok)
    elif FMT == FMT_NF:
        scale = amax
    elif FMT == FMT_INT8:
        scale = tl.math.div_rn(amax, tl.full(amax.shape, INT8_QMAX * 1.0, tl.float32))
    else:  # FMT_FP8
        scale = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX * 1.0, tl.float32))
    tl.store(sb + a, round_to_storage(scale, IS_BF16, S.dtype.element_ty), mask=g_ok)
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
    if FMT == FMT_KIVI:
        q = _codes(x, tl.load(mb + chan // GROUP, mask=ok, other=0.0).to(tl.float32), s, (1 << BITS) - 1).to(tl.int32)
    elif FMT == FMT_NF:  # the number of decision boundaries below u (the nearest level, ties down)
        q = tl.zeros(u.shape, tl.int32)
        for i in tl.static_range((1 << BITS) - 1):
            q += (u > tl.load(BOUNDS + i)).to(tl.int32)
    elif FMT == FMT_INT8:  # stored as code + INT8_ZERO
        q = (tl.minimum(tl.maximum(tl.floor(u + 0.5), -INT8_QMAX * 1.0), INT8_QMAX * 1.0) + INT8_ZERO * 1.0).to(tl.int32)
    else:  # FMT_FP8
        q = _e4m3(tl.minimum(tl.maximum(u, -FP8_MAX * 1.0), FP8_MAX * 1.0)).to(tl.int32)
    word = tl.sum(q << (j * BITS), axis=2)  # [T, W]
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


def _check_out(out, x: Tensor, layout: Layout, row: int, srow: int) -> None:
    """Raise ValueError unless out = (codes, scale, mn) can take x's N tokens at rows row / srow."""
    B, H, N, D = x.shape
    if len(out) != 3:
        raise ValueError(f"out must be (codes, scale, mn); got {len(out)} tensors")
    cw, sw, mw = layout.widths(D)
    ns = layout.scale_rows(N)
    for name, t, rows, width, dtype in (("codes", out[0], row + N, cw, torch.uint8),
                                        ("scale", out[1], srow + ns, sw, x.dtype),
                                        ("mn", out[2], srow + ns, mw, x.dtype)):
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
    layout: Layout,
    out: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    row: int = 0,
    scale_row: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize x [B, H, N, D] (fp32/fp16/bf16, any strides) into (codes, scale, mn) in `layout`'s
    storage format, bit for bit `reference.quantize(x, layout)`.

    The layout comes valid from its method (bits, group and head_dim fit); on top, TOKEN_AXIS groups
    need N % G == 0.
      out: optional destination (codes uint8 [B, H, R, D*bits/8], scale, mn [B, H, Rs, Ds] in
           x.dtype), last dim contiguous. The N tokens are written at codes rows [row, row + N) and
           scale/mn rows [scale_row, scale_row + layout.scale_rows(N)); nothing else is touched. For
           appending into padded storage holding nq tokens: row = PAD + nq, scale_row = PAD +
           layout.scale_rows(nq).
      scale_row: defaults to layout.scale_rows(row).

    Returns (codes, scale, mn): new contiguous tensors, or the `out` tensors themselves.
    Grid: TOKEN_AXIS (B * H * N/G * cdiv(D*bits/8, BLOCK_BY),); CHANNEL_AXIS (B * H * cdiv(N, BLOCK_T),).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, N, D]; got shape {list(x.shape)}")
    if x.dtype not in TL_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    B, H, N, D = x.shape
    group, bits = layout.group, layout.bits
    if layout.axis == TOKEN_AXIS and N % group:
        raise ValueError(f"token groups of {group} must divide the token count {N}")
    if scale_row is None:
        scale_row = layout.scale_rows(row)
    cw, sw, mw = layout.widths(D)
    if out is None:
        if row != 0 or scale_row != 0:
            raise ValueError("row / scale_row need out=(codes, scale, mn)")
        ns = layout.scale_rows(N)
        out = (torch.empty((B, H, N, cw), dtype=torch.uint8, device=x.device),
               torch.empty((B, H, ns, sw), dtype=x.dtype, device=x.device),
               torch.empty((B, H, ns, mw), dtype=x.dtype, device=x.device))
    else:
        _check_out(out, x, layout, row, scale_row)
    codes, scale, mn = out
    if B * H * N * D == 0:
        return out
    fmt = layout.fmt
    if fmt.transform is not None:  # e.g. NFH: the blocks transformed with torch, then the plain format's kernel
        x = fmt.transform(x.float().reshape(B, H, N, D // group, group)).reshape(B, H, N, D)
        fmt = FORMATS[fmt.plain]
    strides = (x.stride(0), x.stride(1), x.stride(2), x.stride(3), codes.stride(0), codes.stride(1), codes.stride(2),
               scale.stride(0), scale.stride(1), scale.stride(2))
    is_bf16 = scale.dtype == torch.bfloat16
    if layout.axis == TOKEN_AXIS:
        per = 8 // bits
        nby = D // per
        block_by = min(triton.next_power_of_2(nby), max(1, 64 // per))  # <= 64 channels a program
        block_t = max(1, min(triton.next_power_of_2(group), _TILE_ELEMS // (block_by * per)))
        n_dblk = triton.cdiv(nby, block_by)
        n_groups = N // group
        _quantize_tokens_kernel[(B * H * n_groups * n_dblk,)](
            x, codes, scale, mn, *strides, H, D, nby, n_groups, n_dblk, row, scale_row,
            GROUP=group, BITS=bits, PER=per, IS_BF16=is_bf16, BLOCK_T=block_t, BLOCK_BY=block_by,
        )
        return out
    perw = codes_per_word(bits)  # codes per packed word (3 bytes for 3-bit codes, else a byte)
    bounds = fmt.bounds(bits, x.device) if fmt.bounds is not None else scale  # (else a placeholder)
    block_a, block_g = triton.next_power_of_2(D // group), triton.next_power_of_2(group)
    block_w = triton.next_power_of_2(D // perw)
    block_t = max(1, min(triton.next_power_of_2(N), _TILE_ELEMS // max(block_a * block_g, block_w * perw), 64))
    n_tblk = triton.cdiv(N, block_t)
    _quantize_per_token_kernel[(B * H * n_tblk,)](
        x, codes, scale, mn if fmt.has_min else scale, bounds, *strides, H, N, n_tblk, row, scale_row,
        D=D, GROUP=group, BITS=bits, FMT=fmt.kernel, IS_BF16=is_bf16,
        PERW=perw, BLOCK_T=block_t, BLOCK_A=block_a, BLOCK_G=block_g, BLOCK_W=block_w,
    )
    return out
