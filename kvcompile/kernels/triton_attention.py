"""Fused-dequantization attention over the packed KV cache (flash-decoding), Triton.

Reads top to bottom: helpers (tile dequantization, matmul) -> attention kernel (one split of the
keys) -> reduction kernel (combine the splits) -> qk / pv kernels (eager attention's matmuls) ->
launchers. The torch twins are `reference.attention`, `reference.qk` and `reference.pv`.

Layouts (layout.Packed, reference.py; every inner tensor has PAD unused leading rows along dim 2):
  q                 [B, Hq, L, D]                     any strides, fp32 / fp16 / bf16
  k_codes           [B, Hkv, PAD + C, D * bits / 8]   uint8, low bits first (3-bit codes: 8 in 3 bytes)
  k_scale, k_mn     [B, Hkv, PAD + C / G, D]  (TOKEN_AXIS)  or  [B, Hkv, PAD + C, D / G]  (CHANNEL_AXIS)
                    (mn of width 0 for the formats that store no minimum)
  k_res             [B, Hkv, PAD + Nr, D]             the newest Nr tokens; T = nq - skip + Nr
  v_*               the same with Dv, and their own nq, Nr (K and V flush at different times)
The packed storage holds nq rows, the first `skip` of them dropped by a sliding window, then spare rows. Each tensor's Layout gives the kernel constants
(format, bits, group, axis: `_Operand`); formats stored in a transformed basis (NFH) are read as their
plain format with q, the residuals and the output transformed (reference.in_basis).

How the kernel reads them:
  * one program serves all Hq / Hkv query heads of one KV head: their L query rows are stacked
    into the M dimension of the tile (row r -> head h_kv * Hq/Hkv + r // L, query r % L), padded
    to >= 16 rows for tl.dot, so each K/V tile is read and dequantized once per KV head;
  * K/V tiles of BLOCK_N tokens are dequantized in registers (code * scale + mn, or level[code] *
    scale, (code - 128) * scale, e4m3(code) * scale, float32, then rounded to q's dtype as the
    reference does); tokens < Nq come from the codes, the rest from
    the residual; a tile straddling the boundary takes both;
  * online softmax in natural units (tl.exp: an additive mask of -3.4e38 stays finite, so a row
    masked everywhere by a finite minimum averages its values exactly as SDPA does);
  * flash-decoding: the T axis is cut into `num_splits` chunks of whole tiles, one program each
    (grid (B * Hkv, num_splits, M blocks)); each writes its partial (m, l, acc) and a reduction
    kernel combines them. With one split the kernel writes the output directly.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..layout import PAD, TOKEN_AXIS, Packed
from . import reference as ref
from .common import (FMT_FP8, FMT_INT8, FMT_KIVI, FMT_NF, FMT_NONE, INT8_ZERO, TL_DTYPES, dtype_flags, head_rows,
                     plan_splits, round_to_storage)
from .common import TOKEN_AXIS as TL_TOKEN_AXIS

MASK_NONE = tl.constexpr(0)
MASK_ADD = tl.constexpr(1)  # an additive float mask
MASK_BOOL = tl.constexpr(2)  # a boolean mask, True = attend (read as uint8)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kv_tile(
    C, S, MN, R, LV, stride_cn, stride_sn, stride_rn, start_n, nq, start, t_len,
    BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr, FMT: tl.constexpr, ALIGNED: tl.constexpr,
    DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tokens [start_n, start_n + BLOCK_N) of one (batch, kv head) as a float32 [BLOCK_N, BLOCK_D]
    tile: dequantized codes for tokens < nq (token n in packed row start + n: a sliding window's first
    kept token may sit inside a token group, _Operand; ALIGNED: start is 0), residual rows for
    nq <= token < t_len, 0 elsewhere.
    C, S, MN, R point at row PAD of their (batch, head); last strides are 1. FMT: the storage format
    (FMT_KIVI code * scale + mn; FMT_NF LV[code] * scale, LV the float32 levels; FMT_INT8
    (code - INT8_ZERO) * scale; FMT_FP8 e4m3fn(code) * scale; FMT_NONE: residual only); only FMT_KIVI
    has an MN."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    row_n = offs_n + start  # the packed row of each token
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    x = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    if FMT != FMT_NONE:
        if start_n < nq:
            # -- unpack codes: channel d is in byte d // PER at bit (d % PER) * BITS --
            # load whole bytes (contiguous, vectorized), split each into its PER codes, and
            # interleave them back into channel order
            q_ok = (offs_n < nq)[:, None] & d_ok[None, :]
            if BITS == 3:
                # 8 codes in 3 bytes (a little-endian 24-bit word): channel d's 3 bits start at bit
                # 3 * (d % 8) of word d // 8 and may straddle two bytes
                bit = 3 * (offs_d % 8)
                at = 3 * (offs_d // 8) + bit // 8
                row = C + row_n[:, None] * stride_cn
                lo = tl.load(row + at[None, :], mask=q_ok, other=0).to(tl.int32)
                hi_ok = q_ok & ((at + 1) < 3 * (DIM // 8))[None, :]
                hi = tl.load(row + (at + 1)[None, :], mask=hi_ok, other=0).to(tl.int32)
                code = ((lo | (hi << 8)) >> (bit % 8)[None, :]) & 7
            elif BITS == 8:
                code = tl.load(C + row_n[:, None] * stride_cn + offs_d[None, :], mask=q_ok, other=0).to(tl.int32)
            else:
                offs_b = tl.arange(0, BLOCK_D // (8 // BITS))
                b_ok = (offs_n < nq)[:, None] & (offs_b < DIM // (8 // BITS))[None, :]
                byte = tl.load(C + row_n[:, None] * stride_cn + offs_b[None, :], mask=b_ok, other=0).to(tl.int32)
                if BITS == 4:  # 2 codes a byte
                    code = tl.interleave(byte & 15, (byte >> 4) & 15)
                else:  # BITS == 2: 4 codes a byte
                    code = tl.interleave(tl.interleave(byte & 3, (byte >> 4) & 3),
                                         tl.interleave((byte >> 2) & 3, (byte >> 6) & 3))
            # -- scale / mn of each element's group --
            if AXIS == TL_TOKEN_AXIS and GROUP % BLOCK_N == 0 and ALIGNED:
                # the tile lies inside one token group (start_n and Nq are multiples of BLOCK_N
                # and GROUP): one row of scales, broadcast over the tile's tokens
                sp = (start_n // GROUP) * stride_sn + offs_d
                sc = tl.load(S + sp, mask=d_ok, other=0.0).to(tl.float32)[None, :]
                if FMT == FMT_KIVI:
                    mn = tl.load(MN + sp, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            else:
                if AXIS == TL_TOKEN_AXIS:
                    sp = (row_n // GROUP)[:, None] * stride_sn + offs_d[None, :]
                else:
                    sp = row_n[:, None] * stride_sn + (offs_d // GROUP)[None, :]
                sc = tl.load(S + sp, mask=q_ok, other=0.0).to(tl.float32)
                if FMT == FMT_KIVI:
                    mn = tl.load(MN + sp, mask=q_ok, other=0.0).to(tl.float32)
            if FMT == FMT_KIVI:
                x = code.to(tl.float32) * sc + mn
            elif FMT == FMT_NF:  # a gather from the 2^BITS levels
                x = tl.load(LV + code, mask=q_ok, other=0.0) * sc
            elif FMT == FMT_INT8:  # stored code + INT8_ZERO
                x = (code - INT8_ZERO).to(tl.float32) * sc
            else:  # FMT_FP8, e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; never NaN here
                e = (code >> 3) & 15
                m = code & 7
                normal = ((e + 120) << 23) | (m << 20)  # float32 bits of (1 + m/8) * 2^(e - 7)
                mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
                x = tl.where((code & 128) != 0, -mag, mag) * sc
    if start_n + BLOCK_N > nq:
        # -- full-precision residual: token n is residual row n - nq --
        r_ok = ((offs_n >= nq) & (offs_n < t_len))[:, None] & d_ok[None, :]
        res = tl.load(R + (offs_n - nq)[:, None] * stride_rn + offs_d[None, :], mask=r_ok, other=0.0)
        x = tl.where(r_ok, res.to(tl.float32), x)
    return x


@triton.jit
def _stacked_rows(pid_bh, pid_m, HKV, GQ, L, BLOCK_M: tl.constexpr):
    """A program's stacked query rows: row r is query r % L of query head hkv * GQ + r // L.
    Returns (b, hkv, offs_m, m_ok, head, qi)."""
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    head = hkv * GQ + offs_m // L
    return b, hkv, offs_m, offs_m < GQ * L, head, offs_m % L


@triton.jit
def _load_q(Q, b, head, qi, m_ok, stride_qb, stride_qh, stride_ql, stride_qd, D: tl.constexpr,
            BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """The stacked query rows [BLOCK_M, BLOCK_D] (0 past D and past the rows)."""
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _as_operand(x, DTYPE: tl.constexpr, RNE_BF16: tl.constexpr, UPCAST: tl.constexpr):
    """Round float32 x to the compute dtype (what the reference's tensors hold), and hand it to
    tl.dot in that dtype, or in float32 when UPCAST (the interpreter's bf16 tl.dot is wrong)."""
    y = round_to_storage(x, RNE_BF16, DTYPE)
    if UPCAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation; IEEE float32 products (no TF32) when the inputs are float32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ----------------------------------------------------------------------------------------------
# attention: one split of the keys for all query heads of one KV head
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    Q, KC, KS, KM, KR, KLV, VC, VS, VM, VR, VLV, MASK, OUT, PART_M, PART_L, PART_ACC,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kcb, stride_kch, stride_kcn,
    stride_ksb, stride_ksh, stride_ksn,
    stride_krb, stride_krh, stride_krn,
    stride_vcb, stride_vch, stride_vcn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_vrb, stride_vrh, stride_vrn,
    stride_mb, stride_mh, stride_ml, stride_mn,
    stride_ob, stride_oh, stride_ol,
    HKV, GQ, L, T, NQ_K, START_K, NQ_V, START_V, TILES_PER_SPLIT, N_SPLITS, qk_scale,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_AXIS: tl.constexpr, K_FMT: tl.constexpr, K_ALIGNED: tl.constexpr,
    V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_AXIS: tl.constexpr, V_FMT: tl.constexpr, V_ALIGNED: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    COMPUTE: tl.constexpr, RNE_BF16: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Softmax(q K^T * scale + mask) V over tokens of one split, for one (batch, KV head, M block).

    Q      [B, Hq, L, D]           strides stride_q*
    K*     see the module docstring; strides (batch, head, row) per tensor, last stride 1
    MASK   [B, Hq, L, T]           a broadcast view (strides may be 0); additive float or uint8
    OUT    [B, Hq, L, DV]          written when not WRITE_PARTIAL (a single split)
    PART_M, PART_L  [B*HKV, N_SPLITS, GQ*L]      fp32 running max and sum, else
    PART_ACC        [B*HKV, N_SPLITS, GQ*L, DV]  fp32 unnormalized output
    grid: (B * HKV, N_SPLITS, cdiv(GQ * L, BLOCK_M))
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, hkv, offs_m, m_ok, head, qi = _stacked_rows(pid_bh, tl.program_id(2), HKV, GQ, L, BLOCK_M)
    rows = GQ * L
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_q(Q, b, head, qi, m_ok, stride_qb, stride_qh, stride_ql, stride_qd, D, BLOCK_D, UPCAST)

    # -- this (batch, kv head)'s inner tensors, past their PAD rows --
    kc, ks, km, kr = head_rows(KC, KS, KM, KR, b, hkv, stride_kcb, stride_kch, stride_kcn, stride_ksb, stride_ksh,
                               stride_ksn, stride_krb, stride_krh, stride_krn)
    vc, vs, vm, vr = head_rows(VC, VS, VM, VR, b, hkv, stride_vcb, stride_vch, stride_vcn, stride_vsb, stride_vsh,
                               stride_vsn, stride_vrb, stride_vrh, stride_vrn)
    if MASK_KIND != MASK_NONE:
        mask_row = MASK + b * stride_mb + head * stride_mh + qi * stride_ml  # [BLOCK_M]

    lo = split * TILES_PER_SPLIT * BLOCK_N
    hi = tl.minimum(lo + TILES_PER_SPLIT * BLOCK_N, T)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_DV), 0.0, tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        # -- dequantize a K tile, compute qk --
        k = _kv_tile(kc, ks, km, kr, KLV, stride_kcn, stride_ksn, stride_krn, start_n, NQ_K, START_K, T,
                     K_BITS, K_GROUP, K_AXIS, K_FMT, K_ALIGNED, D, BLOCK_N, BLOCK_D)
        k = _as_operand(k, COMPUTE, RNE_BF16, UPCAST)
        qk = _mm(q, tl.trans(k), IEEE) * qk_scale  # [BLOCK_M, BLOCK_N] logits

        # -- mask: padding keys, attn_mask, causal --
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = m_ok[:, None] & (offs_n < hi)[None, :]
        if MASK_KIND == MASK_ADD:
            add = tl.load(mask_row[:, None] + offs_n[None, :] * stride_mn, mask=valid, other=0.0)
            qk = qk + add.to(tl.float32)  # natural units: a finite -3.4e38 stays finite, as in SDPA
        if MASK_KIND == MASK_BOOL:
            keep = tl.load(mask_row[:, None] + offs_n[None, :] * stride_mn, mask=valid, other=0)
            valid = valid & (keep != 0)
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= qi[:, None])
        qk = tl.where(valid, qk, float("-inf"))

        # -- online softmax (rows with every key masked so far keep m = -inf, p = 0) --
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)

        # -- dequantize a V tile, acc += p V --
        v = _kv_tile(vc, vs, vm, vr, VLV, stride_vcn, stride_vsn, stride_vrn, start_n, NQ_V, START_V, T,
                     V_BITS, V_GROUP, V_AXIS, V_FMT, V_ALIGNED, DV, BLOCK_N, BLOCK_DV)
        v = _as_operand(v, COMPUTE, RNE_BF16, UPCAST)
        acc = acc * alpha[:, None] + _mm(_as_operand(p, COMPUTE, RNE_BF16, UPCAST), v, IEEE)
        m_i = m_new

    if WRITE_PARTIAL:
        # -- partial (m, l, acc) of this split, combined by _attn_reduce_kernel --
        part = (pid_bh * N_SPLITS + split) * rows + offs_m
        tl.store(PART_M + part, m_i, mask=m_ok)
        tl.store(PART_L + part, l_i, mask=m_ok)
        tl.store(PART_ACC + part[:, None] * DV + offs_dv[None, :], acc, mask=m_ok[:, None] & (offs_dv < DV)[None, :])
    else:
        # -- normalize; a row with every key masked gives 0, as torch's SDPA does --
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ol + offs_dv[None, :]
        tl.store(o_ptrs, round_to_storage(o, RNE_BF16, OUT.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _attn_reduce_kernel(
    PART_M, PART_L, PART_ACC, OUT,
    stride_ob, stride_oh, stride_ol,
    HKV, GQ, L, N_SPLITS,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """Combine the N_SPLITS partial (m, l, acc) of each stacked row: out = sum_s e^(m_s - m) acc_s /
    sum_s e^(m_s - m) l_s with m = max_s m_s.

    PART_*  see _attn_fwd_kernel;  OUT [B, Hq, L, DV], last stride 1
    grid: (B * HKV, cdiv(GQ * L, BLOCK_M))
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    b, hkv, offs_m, m_ok, head, qi = _stacked_rows(pid_bh, tl.program_id(1), HKV, GQ, L, BLOCK_M)
    rows = GQ * L
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = (offs_dv < DV)[None, :]

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_DV), 0.0, tl.float32)
    for s in range(0, N_SPLITS):
        # -- rescale the running sums and add this split's --
        part = (pid_bh * N_SPLITS + s) * rows + offs_m
        m_s = tl.load(PART_M + part, mask=m_ok, other=float("-inf"))
        l_s = tl.load(PART_L + part, mask=m_ok, other=0.0)
        acc_s = tl.load(PART_ACC + part[:, None] * DV + offs_dv[None, :], mask=m_ok[:, None] & dv_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_safe)
        c = tl.exp(m_s - m_safe)
        l = l * a + l_s * c
        acc = acc * a[:, None] + acc_s * c[:, None]
        m = m_new

    o = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    o_ptrs = OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ol + offs_dv[None, :]
    tl.store(o_ptrs, round_to_storage(o, RNE_BF16, OUT.dtype.element_ty), mask=m_ok[:, None] & dv_ok)


# ----------------------------------------------------------------------------------------------
# eager attention's matmuls: scores = q K^T and out = p V
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qk_kernel(
    Q, KC, KS, KM, KR, KLV, OUT,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kcb, stride_kch, stride_kcn,
    stride_ksb, stride_ksh, stride_ksn,
    stride_krb, stride_krh, stride_krn,
    stride_ob, stride_oh, stride_ol,
    HKV, GQ, L, T, NQ_K, START_K, N_TILES,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_AXIS: tl.constexpr, K_FMT: tl.constexpr, K_ALIGNED: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr, RNE_BF16: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """OUT[b, h, i, n] = sum_d Q[b, h, i, d] K[b, h // GQ, n, d] for one tile of BLOCK_N tokens.

    OUT [B, Hq, L, T], last stride 1.  grid: (B * HKV * N_TILES, cdiv(GQ * L, BLOCK_M))
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % N_TILES
    b, hkv, offs_m, m_ok, head, qi = _stacked_rows(pid // N_TILES, tl.program_id(1), HKV, GQ, L, BLOCK_M)
    q = _load_q(Q, b, head, qi, m_ok, stride_qb, stride_qh, stride_ql, stride_qd, D, BLOCK_D, UPCAST)

    # -- dequantize the K tile, one matmul --
    start_n = tile * BLOCK_N
    kc, ks, km, kr = head_rows(KC, KS, KM, KR, b, hkv, stride_kcb, stride_kch, stride_kcn, stride_ksb, stride_ksh,
                               stride_ksn, stride_krb, stride_krh, stride_krn)
    k = _kv_tile(kc, ks, km, kr, KLV, stride_kcn, stride_ksn, stride_krn, start_n, NQ_K, START_K, T,
                 K_BITS, K_GROUP, K_AXIS, K_FMT, K_ALIGNED, D, BLOCK_N, BLOCK_D)
    s = _mm(q, tl.trans(_as_operand(k, COMPUTE, RNE_BF16, UPCAST)), IEEE)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    o_ptrs = OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ol + offs_n[None, :]
    tl.store(o_ptrs, round_to_storage(s, RNE_BF16, OUT.dtype.element_ty), mask=m_ok[:, None] & (offs_n < T)[None, :])


@triton.jit
def _pv_kernel(
    P, VC, VS, VM, VR, VLV, OUT, PART_ACC,
    stride_pb, stride_ph, stride_pl, stride_pn,
    stride_vcb, stride_vch, stride_vcn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_vrb, stride_vrh, stride_vrn,
    stride_ob, stride_oh, stride_ol,
    HKV, GQ, L, T, NQ_V, START_V, TILES_PER_SPLIT, N_SPLITS,
    V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_AXIS: tl.constexpr, V_FMT: tl.constexpr, V_ALIGNED: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    COMPUTE: tl.constexpr, RNE_BF16: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """OUT[b, h, i, :] = sum_n P[b, h, i, n] V[b, h // GQ, n, :] over one split of the tokens.

    P [B, Hq, L, T] any strides; OUT [B, Hq, L, DV] (one split) or PART_ACC [B*HKV, N_SPLITS,
    GQ*L, DV] fp32 (summed by the launcher).  grid: (B * HKV, N_SPLITS, cdiv(GQ * L, BLOCK_M))
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, hkv, offs_m, m_ok, head, qi = _stacked_rows(pid_bh, tl.program_id(2), HKV, GQ, L, BLOCK_M)
    rows = GQ * L
    offs_dv = tl.arange(0, BLOCK_DV)
    p_row = P + b * stride_pb + head * stride_ph + qi * stride_pl
    vc, vs, vm, vr = head_rows(VC, VS, VM, VR, b, hkv, stride_vcb, stride_vch, stride_vcn, stride_vsb, stride_vsh,
                               stride_vsn, stride_vrb, stride_vrh, stride_vrn)

    lo = split * TILES_PER_SPLIT * BLOCK_N
    hi = tl.minimum(lo + TILES_PER_SPLIT * BLOCK_N, T)
    acc = tl.full((BLOCK_M, BLOCK_DV), 0.0, tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        # -- a tile of probabilities, a dequantized V tile --
        offs_n = start_n + tl.arange(0, BLOCK_N)
        p_ok = m_ok[:, None] & (offs_n < hi)[None, :]
        p = tl.load(p_row[:, None] + offs_n[None, :] * stride_pn, mask=p_ok, other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
        v = _kv_tile(vc, vs, vm, vr, VLV, stride_vcn, stride_vsn, stride_vrn, start_n, NQ_V, START_V, T,
                     V_BITS, V_GROUP, V_AXIS, V_FMT, V_ALIGNED, DV, BLOCK_N, BLOCK_DV)
        acc += _mm(p, _as_operand(v, COMPUTE, RNE_BF16, UPCAST), IEEE)

    dv_ok = (offs_dv < DV)[None, :]
    if WRITE_PARTIAL:
        part = (pid_bh * N_SPLITS + split) * rows + offs_m
        tl.store(PART_ACC + part[:, None] * DV + offs_dv[None, :], acc, mask=m_ok[:, None] & dv_ok)
    else:
        o_ptrs = OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ol + offs_dv[None, :]
        tl.store(o_ptrs, round_to_storage(acc, RNE_BF16, OUT.dtype.element_ty), mask=m_ok[:, None] & dv_ok)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


class _Operand:
    """One packed cache tensor as the kernels take it: its tensors (last dim contiguous), their
    (batch, head, row) strides, the kernel constants of its layout and the format's table. The layout
    comes valid from its method; the tensors are checked against it, so a kernel never reads out of
    bounds."""

    def __init__(self, name: str, p: Packed, batch: int, heads: int, dim: Optional[int] = None):
        lay, res = p.layout, p.res
        if res.dim() != 4 or res.shape[0] != batch or res.shape[2] < PAD:
            raise ValueError(f"{name}_res must be [B={batch}, Hkv, PAD + Nr, D] with PAD={PAD}; got {list(res.shape)}")
        self.heads, self.dim = res.shape[1], res.shape[3]
        if dim is not None and self.dim != dim:
            raise ValueError(f"the queries' head_dim {dim} and the {name} cache's {self.dim} differ")
        if self.heads == 0 or heads % self.heads:
            raise ValueError(f"the number of KV heads ({self.heads}) must divide the query heads ({heads})")
        res = res if res.stride(3) == 1 else res.contiguous()
        fmt = lay.fmt
        if fmt.kernel is None:
            raise ValueError(f"{name}: format {lay.format!r} is read through its plain format (reference.in_basis)")
        self.start = 0  # packed rows before the first token (a window's dropped rows inside a token group)
        skip = int(p.skip) if lay.quantized else 0
        if skip:  # dropped rows: read from the group holding the first kept token on (views, no copy)
            self.start = skip % lay.group if lay.axis == TOKEN_AXIS else 0
            off, srows = skip - self.start, lay.scale_rows(skip - self.start)
            p = p._replace(codes=p.codes[:, :, off:], scale=p.scale[:, :, srows:], mn=p.mn[:, :, srows:],
                           nq=p.nq - off, skip=0)
        self.nq = int(p.nq) if lay.quantized else 0
        self.levels = res  # a placeholder pointer unless the format reads a table
        if not lay.quantized:  # only the residual holds tokens; codes/scale/mn are unused
            codes = scale = mn = res
        else:
            cw, sw, mw = lay.widths(self.dim)
            srows = lay.scale_rows(self.nq)
            shapes = ((p.codes, PAD + self.nq, cw), (p.scale, PAD + srows, sw), (p.mn, PAD + srows, mw))
            if not all(t.dim() == 4 and tuple(t.shape[:2]) == (batch, self.heads) and t.shape[2] >= rows
                       and t.shape[3] == width for t, rows, width in shapes) or p.codes.dtype != torch.uint8 \
                    or (lay.axis == TOKEN_AXIS and self.nq % lay.group):
                raise ValueError(
                    f"{name}: inconsistent packed cache for layout {lay} with nq={self.nq}: codes "
                    f"{list(p.codes.shape)} ({p.codes.dtype}), scale {list(p.scale.shape)}, mn {list(p.mn.shape)}, "
                    f"res {list(p.res.shape)}; expected codes [B, Hkv, >= {PAD + self.nq}, {cw}] uint8, scale and mn "
                    f"[B, Hkv, >= {PAD + srows}, {sw} / {mw}]"
                )
            codes, scale, mn = (t if t.stride(3) == 1 else t.contiguous() for t in (p.codes, p.scale, p.mn))
            if fmt.levels is not None:
                self.levels = fmt.levels(lay.bits, res.device)
        self.tensors = (codes, scale, mn, res)
        self.strides = (codes.stride(0), codes.stride(1), codes.stride(2), scale.stride(0), scale.stride(1),
                        scale.stride(2), res.stride(0), res.stride(1), res.stride(2))
        self.nq -= self.start  # the kernels count the tokens held, from packed row `start` on
        self.ntok = self.nq + res.shape[2] - PAD
        self.consts = dict(BITS=lay.bits, GROUP=lay.group, AXIS=lay.axis, FMT=fmt.kernel, ALIGNED=self.start == 0)

    def prefixed(self, prefix: str) -> dict:
        """The kernel constants as K_BITS=..., V_FMT=... ."""
        return {f"{prefix}_{k}": v for k, v in self.consts.items()}


def _blocks(D: int, Dv: int, rows: int, dtype: torch.dtype, block_n: Optional[int],
            num_warps: Optional[int]) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_warps). Defaults chosen from register use on sm_90
    (ptxas, compiled without a GPU): the largest key tile that does not spill, 8 warps for big ones."""
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(Dv))
    block_m = min(max(16, triton.next_power_of_2(rows)), 64)
    width = max(block_d, block_dv)
    wide = 2048 if dtype == torch.float32 else 4096  # tile elements from which 8 warps pay
    if block_n is None:
        if dtype == torch.float32:
            block_n = 32 if width <= 64 else 16
        else:
            block_n = 64 if width <= 128 else 16
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16; got {block_n}")
    if num_warps is None:
        num_warps = 8 if block_n * width >= wide else 4
    return block_m, block_n, block_d, block_dv, num_warps


def _check(x: Tensor, name: str, *packed: Packed) -> None:
    """x (q, or p for pv) is [B, Hq, L, *] in a kernel dtype, that of the cache."""
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, Hq, L, {'T' if name == 'p' else 'D'}]; got shape {list(x.shape)}")
    if x.dtype not in TL_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {x.dtype}")
    if any(p.res.dtype != x.dtype for p in packed):
        raise ValueError(f"{name} and the cache must have the same dtype; got {x.dtype} and "
                         f"{', '.join(str(p.res.dtype) for p in packed)}")


def _expand_mask(attn_mask: Tensor, B: int, Hq: int, L: int, T: int) -> Tuple[Tensor, int]:
    try:
        m = attn_mask.expand(B, Hq, L, T)  # a view: broadcast dims get stride 0
    except RuntimeError as e:
        raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to [B, Hq, L, T] = "
                         f"{[B, Hq, L, T]}") from e
    if m.dtype == torch.bool:
        return m.view(torch.uint8), MASK_BOOL
    if not m.dtype.is_floating_point:
        raise ValueError(f"attn_mask must be boolean or floating point (additive); got {m.dtype}")
    return m, MASK_ADD


def attention(
    q: Tensor,
    k: Packed,
    v: Packed,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    num_splits: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: int = 1,
) -> Tensor:
    """scaled_dot_product_attention of q [B, Hq, L, D] over packed keys and values (Triton), the twin
    of `reference.attention`.

      k, v: Packed with Hkv heads, Hkv divides Hq; query head h reads KV head h // (Hq / Hkv).
      attn_mask: additive float or boolean (True = attend), broadcastable to [B, Hq, L, T].
      is_causal: query i sees keys j <= i (top-left aligned, as SDPA); not with attn_mask.
      dropout_p: must be 0.  scale: default 1 / sqrt(D).
      Launch configuration (tests, benchmarks): num_splits (T chunks; default: enough to fill the GPU),
      block_n (tokens per tile, a power of two >= 16), num_warps (default by tile size), num_stages
      (the loop branches on the tile kind, so Triton does not pipeline it; kept for experiments).
    Returns [B, Hq, L, Dv], contiguous, in q's dtype. A row whose keys are all masked gives 0.
    Any D and Dv work (tiles are padded to powers of two >= 16).

    Grid: (B * Hkv, num_splits, cdiv(Hq / Hkv * L, BLOCK_M)), then (B * Hkv, cdiv(Hq / Hkv * L,
    BLOCK_M)) for the reduction when num_splits > 1.
    """
    _check(q, "q", k, v)
    config = dict(num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    if ref.transformed(k, v):  # attend in the basis (in float32), round once at the end
        q32, k, v, back = ref.in_basis(q, k, v, float32=True)
        return back(attention(q32, k, v, attn_mask, dropout_p, is_causal, scale, **config)).to(q.dtype)
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p must be 0 for the quantized KV attention (inference); got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set (as in scaled_dot_product_attention)")
    B, Hq, L, D = q.shape
    K, V = _Operand("k", k, B, Hq, D), _Operand("v", v, B, Hq)
    if K.heads != V.heads:
        raise ValueError(f"keys have {K.heads} heads, values {V.heads}")
    if K.ntok != V.ntok:
        raise ValueError(f"keys hold {K.ntok} tokens (nq {K.nq} + Nr), values {V.ntok} (nq {V.nq} + Nr)")
    Hkv, T, Dv = K.heads, K.ntok, V.dim
    gq = Hq // Hkv
    out = torch.empty((B, Hq, L, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if T == 0:  # no keys: torch's SDPA gives zeros
        return out.zero_()

    mask_kind, mask, mstr = MASK_NONE, q, (0, 0, 0, 0)
    if attn_mask is not None:
        mask, mask_kind = _expand_mask(attn_mask, B, Hq, L, T)
        mstr = mask.stride()
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    rows = gq * L
    block_m, block_n, block_d, block_dv, num_warps = _blocks(D, Dv, rows, q.dtype, block_n, num_warps)
    n_mblk = triton.cdiv(rows, block_m)
    num_splits, tiles_per_split = plan_splits(q.device, B * Hkv * n_mblk, triton.cdiv(T, block_n), num_splits)
    partial = num_splits > 1
    if partial:
        part_m = torch.empty((B * Hkv, num_splits, rows), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B * Hkv, num_splits, rows, Dv), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused

    flags = dtype_flags(q.dtype)
    _attn_fwd_kernel[(B * Hkv, num_splits, n_mblk)](
        q, *K.tensors, K.levels, *V.tensors, V.levels, mask, out, part_m, part_l, part_acc,
        *q.stride(), *K.strides, *V.strides, *mstr, out.stride(0), out.stride(1), out.stride(2),
        Hkv, gq, L, T, K.nq, K.start, V.nq, V.start, tiles_per_split, num_splits, sm_scale,
        **K.prefixed("K"), **V.prefixed("V"),
        D=D, DV=Dv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal), WRITE_PARTIAL=partial, **flags,
        num_warps=num_warps, num_stages=num_stages,
    )
    if partial:
        _attn_reduce_kernel[(B * Hkv, n_mblk)](
            part_m, part_l, part_acc, out, out.stride(0), out.stride(1), out.stride(2),
            Hkv, gq, L, num_splits, DV=Dv, BLOCK_M=block_m, BLOCK_DV=block_dv, RNE_BF16=flags["RNE_BF16"],
            num_warps=4,
        )
    return out


def qk(q: Tensor, k: Packed, *, block_n: Optional[int] = None) -> Tensor:
    """q [B, Hq, L, D] @ K^T -> scores [B, Hq, L, T] in q's dtype, over packed keys with Hkv heads
    (the twin of `reference.qk`). Grid: (B * Hkv * cdiv(T, BLOCK_N), cdiv(Hq / Hkv * L, BLOCK_M))."""
    _check(q, "q", k)
    if ref.transformed(k):
        q32, k, _, _ = ref.in_basis(q, k, None, float32=True)
        return qk(q32, k, block_n=block_n).to(q.dtype)
    B, Hq, L, D = q.shape
    K = _Operand("k", k, B, Hq, D)
    Hkv, T = K.heads, K.ntok
    out = torch.empty((B, Hq, L, T), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    gq = Hq // Hkv
    rows = gq * L
    block_m, block_n, block_d, _, num_warps = _blocks(D, 16, rows, q.dtype, block_n, None)
    n_tiles = triton.cdiv(T, block_n)
    _qk_kernel[(B * Hkv * n_tiles, triton.cdiv(rows, block_m))](
        q, *K.tensors, K.levels, out, *q.stride(), *K.strides, out.stride(0), out.stride(1), out.stride(2),
        Hkv, gq, L, T, K.nq, K.start, n_tiles, **K.prefixed("K"), D=D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **dtype_flags(q.dtype), num_warps=num_warps,
    )
    return out


def pv(p: Tensor, v: Packed, *, num_splits: Optional[int] = None, block_n: Optional[int] = None) -> Tensor:
    """probs [B, Hq, L, T] @ V -> [B, Hq, L, Dv] in p's dtype, over packed values with Hkv heads
    (the twin of `reference.pv`). Grid: (B * Hkv, num_splits, cdiv(Hq / Hkv * L, BLOCK_M)); with
    several splits the fp32 partial sums are added by torch."""
    _check(p, "p", v)
    if ref.transformed(v):
        _, _, v, back = ref.in_basis(None, None, v, float32=True)
        return back(pv(p.float(), v, num_splits=num_splits, block_n=block_n)).to(p.dtype)
    B, Hq, L, T = p.shape
    V = _Operand("v", v, B, Hq)
    if V.ntok != T:
        raise ValueError(f"p has {T} keys, the values hold {V.ntok} tokens")
    Hkv, Dv = V.heads, V.dim
    gq = Hq // Hkv
    out = torch.empty((B, Hq, L, Dv), dtype=p.dtype, device=p.device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    rows = gq * L
    block_m, block_n, _, block_dv, num_warps = _blocks(16, Dv, rows, p.dtype, block_n, None)
    n_mblk = triton.cdiv(rows, block_m)
    num_splits, tiles_per_split = plan_splits(p.device, B * Hkv * n_mblk, triton.cdiv(T, block_n), num_splits)
    partial = num_splits > 1
    part = torch.empty((B * Hkv, num_splits, rows, Dv), dtype=torch.float32, device=p.device) if partial else out
    _pv_kernel[(B * Hkv, num_splits, n_mblk)](
        p, *V.tensors, V.levels, out, part, *p.stride(), *V.strides, out.stride(0), out.stride(1), out.stride(2),
        Hkv, gq, L, T, V.nq, V.start, tiles_per_split, num_splits, **V.prefixed("V"), DV=Dv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DV=block_dv, WRITE_PARTIAL=partial, **dtype_flags(p.dtype),
        num_warps=num_warps,
    )
    if partial:
        # (B*Hkv, splits, GQ*L, Dv) -> (B, Hkv, GQ, L, Dv) -> (B, Hq, L, Dv)
        out.copy_(part.sum(1).view(B, Hkv, gq, L, Dv).reshape(B, Hq, L, Dv))
    return out
