"""Fused-dequantization attention over the packed KV cache (flash-decoding), Triton.

Reads top to bottom: helpers (tile dequantization, matmul) -> attention kernel (one split of the
keys) -> reduction kernel (combine the splits) -> qk / pv kernels (eager attention's matmuls) ->
launchers. The torch twins are `reference.attention`, `reference.qk` and `reference.pv`.

Layouts (see reference.py; every inner tensor has PAD unused leading rows along dim 2):
  q                 [B, Hq, L, D]                     any strides, fp32 / fp16 / bf16
  k_codes           [B, Hkv, PAD + Nq, D * bits / 8]  uint8, 8/bits codes per byte, low bits first
  k_scale, k_mn     [B, Hkv, PAD + Nq / G, D]  (axis 2)  or  [B, Hkv, PAD + Nq, D / G]  (axis 3)
  k_res             [B, Hkv, PAD + Nr, D]             the newest Nr tokens; T = Nq + Nr
  v_*               the same with Dv, and their own Nq, Nr (K and V flush at different times)
  meta              (bits, group, axis[, nq[, fmt]]); bits 16: nothing quantized, only res holds
                    tokens; with nq, codes/scale/mn may have spare rows after their nq tokens; fmt
                    the storage format (KERNEL_BITS: KIVI 2/4 bits, NF 2/3/4 bits with 3-bit codes 8 in
                    3 bytes, INT8, FP8; the symmetric ones store an mn of width 0)

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

import functools
import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..methods import FP8, INT8, KIVI, NF, codes_per_word, nqkv
from . import reference as ref
from .triton_quantize import reduce_max, reduce_sum, round_to_storage

PAD = ref.PAD
TOKEN_AXIS = ref.TOKEN_AXIS
CHANNEL_AXIS = ref.CHANNEL_AXIS

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_MASK_NONE, _MASK_ADD, _MASK_BOOL = 0, 1, 2
# storage formats the kernels read (methods.FORMATS) -> their bits. NFH (nqkv's Hadamard blocks) is read
# as NF in the transformed basis (_keys_in_basis, _values_in_basis): the kernels never see it.
KERNEL_BITS = {KIVI: (2, 4), NF: (2, 3, 4), INT8: (8,), FP8: (8,)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _interleave(a, b, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] a, b -> [ROWS, 2 * COLS] with columns a0 b0 a1 b1 ... (tl.interleave from
    builtins only; see triton_quantize.reduce_sum for why)."""
    return tl.reshape(tl.join(a, b), (ROWS, 2 * COLS))


@triton.jit
def _kv_tile(
    C, S, MN, R, LV, stride_cn, stride_sn, stride_rn, start_n, nq, t_len,
    BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr, FMT: tl.constexpr, DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tokens [start_n, start_n + BLOCK_N) of one (batch, kv head) as a float32 [BLOCK_N, BLOCK_D]
    tile: dequantized codes for tokens < nq, residual rows for nq <= token < t_len, 0 elsewhere.
    C, S, MN, R point at row PAD of their (batch, head); last strides are 1. FMT: the storage format
    (KIVI code * scale + mn; NF LV[code] * scale, LV the float32 levels; INT8 (code - 128) * scale;
    FP8 e4m3fn(code) * scale); the symmetric formats have no MN."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    x = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    if BITS < 16:
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
                row = C + offs_n[:, None] * stride_cn
                lo = tl.load(row + at[None, :], mask=q_ok, other=0).to(tl.int32)
                hi_ok = q_ok & ((at + 1) < 3 * (DIM // 8))[None, :]
                hi = tl.load(row + (at + 1)[None, :], mask=hi_ok, other=0).to(tl.int32)
                code = ((lo | (hi << 8)) >> (bit % 8)[None, :]) & 7
            elif BITS == 8:
                code = tl.load(C + offs_n[:, None] * stride_cn + offs_d[None, :], mask=q_ok, other=0).to(tl.int32)
            else:
                offs_b = tl.arange(0, BLOCK_D // (8 // BITS))
                b_ok = (offs_n < nq)[:, None] & (offs_b < DIM // (8 // BITS))[None, :]
                byte = tl.load(C + offs_n[:, None] * stride_cn + offs_b[None, :], mask=b_ok, other=0).to(tl.int32)
                if BITS == 4:  # 2 codes a byte
                    code = _interleave(byte & 15, (byte >> 4) & 15, BLOCK_N, BLOCK_D // 2)
                else:  # BITS == 2: 4 codes a byte
                    code = _interleave(_interleave(byte & 3, (byte >> 4) & 3, BLOCK_N, BLOCK_D // 4),
                                       _interleave((byte >> 2) & 3, (byte >> 6) & 3, BLOCK_N, BLOCK_D // 4),
                                       BLOCK_N, BLOCK_D // 2)
            # -- scale / mn of each element's group --
            if AXIS == 2 and GROUP % BLOCK_N == 0:
                # the tile lies inside one token group (start_n and Nq are multiples of BLOCK_N
                # and GROUP): one row of scales, broadcast over the tile's tokens
                sp = (start_n // GROUP) * stride_sn + offs_d
                sc = tl.load(S + sp, mask=d_ok, other=0.0).to(tl.float32)[None, :]
                if FMT == 0:
                    mn = tl.load(MN + sp, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            else:
                if AXIS == 2:
                    sp = (offs_n // GROUP)[:, None] * stride_sn + offs_d[None, :]
                else:
                    sp = offs_n[:, None] * stride_sn + (offs_d // GROUP)[None, :]
                sc = tl.load(S + sp, mask=q_ok, other=0.0).to(tl.float32)
                if FMT == 0:
                    mn = tl.load(MN + sp, mask=q_ok, other=0.0).to(tl.float32)
            if FMT == 0:  # KIVI
                x = code.to(tl.float32) * sc + mn
            elif FMT == 1:  # NF: a gather from the 2^BITS levels
                x = tl.load(LV + code, mask=q_ok, other=0.0) * sc
            elif FMT == 2:  # INT8, stored code + 128
                x = (code - 128).to(tl.float32) * sc
            else:  # FP8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; never NaN here
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
    HKV, GQ, L, T, NQ_K, NQ_V, TILES_PER_SPLIT, N_SPLITS, qk_scale,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_AXIS: tl.constexpr, K_FMT: tl.constexpr,
    V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_AXIS: tl.constexpr, V_FMT: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, PAD_ROWS: tl.constexpr,
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
    pid_m = tl.program_id(2)
    b = pid_bh // HKV
    hkv = pid_bh % HKV

    # -- stacked query rows: row r is query r % L of query head hkv * GQ + r // L --
    rows = GQ * L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows
    head = hkv * GQ + offs_m // L
    qi = offs_m % L
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # -- this (batch, kv head)'s inner tensors, past their PAD rows --
    kc = KC + b * stride_kcb + hkv * stride_kch + PAD_ROWS * stride_kcn
    ks = KS + b * stride_ksb + hkv * stride_ksh + PAD_ROWS * stride_ksn
    km = KM + b * stride_ksb + hkv * stride_ksh + PAD_ROWS * stride_ksn
    kr = KR + b * stride_krb + hkv * stride_krh + PAD_ROWS * stride_krn
    vc = VC + b * stride_vcb + hkv * stride_vch + PAD_ROWS * stride_vcn
    vs = VS + b * stride_vsb + hkv * stride_vsh + PAD_ROWS * stride_vsn
    vm = VM + b * stride_vsb + hkv * stride_vsh + PAD_ROWS * stride_vsn
    vr = VR + b * stride_vrb + hkv * stride_vrh + PAD_ROWS * stride_vrn
    if MASK_KIND != 0:
        mask_row = MASK + b * stride_mb + head * stride_mh + qi * stride_ml  # [BLOCK_M]

    lo = split * TILES_PER_SPLIT * BLOCK_N
    hi = tl.minimum(lo + TILES_PER_SPLIT * BLOCK_N, T)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_DV), 0.0, tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        # -- dequantize a K tile, compute qk --
        k = _kv_tile(kc, ks, km, kr, KLV, stride_kcn, stride_ksn, stride_krn, start_n, NQ_K, T,
                     K_BITS, K_GROUP, K_AXIS, K_FMT, D, BLOCK_N, BLOCK_D)
        k = _as_operand(k, COMPUTE, RNE_BF16, UPCAST)
        qk = _mm(q, tl.trans(k), IEEE) * qk_scale  # [BLOCK_M, BLOCK_N] logits

        # -- mask: padding keys, attn_mask, causal --
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = m_ok[:, None] & (offs_n < hi)[None, :]
        if MASK_KIND == 1:
            add = tl.load(mask_row[:, None] + offs_n[None, :] * stride_mn, mask=valid, other=0.0)
            qk = qk + add.to(tl.float32)  # natural units: a finite -3.4e38 stays finite, as in SDPA
        if MASK_KIND == 2:
            keep = tl.load(mask_row[:, None] + offs_n[None, :] * stride_mn, mask=valid, other=0)
            valid = valid & (keep != 0)
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= qi[:, None])
        qk = tl.where(valid, qk, float("-inf"))

        # -- online softmax (rows with every key masked so far keep m = -inf, p = 0) --
        m_new = tl.maximum(m_i, reduce_max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + reduce_sum(p, 1)

        # -- dequantize a V tile, acc += p V --
        v = _kv_tile(vc, vs, vm, vr, VLV, stride_vcn, stride_vsn, stride_vrn, start_n, NQ_V, T,
                     V_BITS, V_GROUP, V_AXIS, V_FMT, DV, BLOCK_N, BLOCK_DV)
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
    pid_m = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    rows = GQ * L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows
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
    head = hkv * GQ + offs_m // L
    qi = offs_m % L
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
    HKV, GQ, L, T, NQ_K, N_TILES,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_AXIS: tl.constexpr, K_FMT: tl.constexpr, D: tl.constexpr,
    PAD_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr, RNE_BF16: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """OUT[b, h, i, n] = sum_d Q[b, h, i, d] K[b, h // GQ, n, d] for one tile of BLOCK_N tokens.

    OUT [B, Hq, L, T], last stride 1.  grid: (B * HKV * N_TILES, cdiv(GQ * L, BLOCK_M))
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    tile = pid % N_TILES
    pid_bh = pid // N_TILES
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < GQ * L
    head = hkv * GQ + offs_m // L
    qi = offs_m % L
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # -- dequantize the K tile, one matmul --
    start_n = tile * BLOCK_N
    kc = KC + b * stride_kcb + hkv * stride_kch + PAD_ROWS * stride_kcn
    ks = KS + b * stride_ksb + hkv * stride_ksh + PAD_ROWS * stride_ksn
    km = KM + b * stride_ksb + hkv * stride_ksh + PAD_ROWS * stride_ksn
    kr = KR + b * stride_krb + hkv * stride_krh + PAD_ROWS * stride_krn
    k = _kv_tile(kc, ks, km, kr, KLV, stride_kcn, stride_ksn, stride_krn, start_n, NQ_K, T,
                 K_BITS, K_GROUP, K_AXIS, K_FMT, D, BLOCK_N, BLOCK_D)
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
    HKV, GQ, L, T, NQ_V, TILES_PER_SPLIT, N_SPLITS,
    V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_AXIS: tl.constexpr, V_FMT: tl.constexpr, DV: tl.constexpr,
    PAD_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    COMPUTE: tl.constexpr, RNE_BF16: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """OUT[b, h, i, :] = sum_n P[b, h, i, n] V[b, h // GQ, n, :] over one split of the tokens.

    P [B, Hq, L, T] any strides; OUT [B, Hq, L, DV] (one split) or PART_ACC [B*HKV, N_SPLITS,
    GQ*L, DV] fp32 (summed by the launcher).  grid: (B * HKV, N_SPLITS, cdiv(GQ * L, BLOCK_M))
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    rows = GQ * L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows
    head = hkv * GQ + offs_m // L
    qi = offs_m % L
    offs_dv = tl.arange(0, BLOCK_DV)
    p_row = P + b * stride_pb + head * stride_ph + qi * stride_pl
    vc = VC + b * stride_vcb + hkv * stride_vch + PAD_ROWS * stride_vcn
    vs = VS + b * stride_vsb + hkv * stride_vsh + PAD_ROWS * stride_vsn
    vm = VM + b * stride_vsb + hkv * stride_vsh + PAD_ROWS * stride_vsn
    vr = VR + b * stride_vrb + hkv * stride_vrh + PAD_ROWS * stride_vrn

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
        v = _kv_tile(vc, vs, vm, vr, VLV, stride_vcn, stride_vsn, stride_vrn, start_n, NQ_V, T,
                     V_BITS, V_GROUP, V_AXIS, V_FMT, DV, BLOCK_N, BLOCK_DV)
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


class _Packed:
    """One padded cache tensor (codes, scale, mn, res) + meta, validated, with its kernel args.

    meta = (bits, group, axis), (bits, group, axis, nq) or (bits, group, axis, nq, fmt). With nq the
    packed storage may hold spare rows after its nq tokens (preallocated capacity); without it every
    row is a token. fmt: the storage format (methods.FORMATS; KIVI when absent)."""

    def __init__(self, name: str, codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, meta: Sequence[int],
                 batch: int, heads: int):
        if len(meta) not in (3, 4, 5):
            raise ValueError(f"{name}_meta must be (bits, group, axis[, nq[, fmt]]); got {tuple(meta)}")
        bits, group, axis = (int(v) for v in meta[:3])
        fmt = int(meta[4]) if len(meta) == 5 else KIVI
        if res.dim() != 4 or res.shape[0] != batch or res.shape[2] < PAD:
            raise ValueError(f"{name}_res must be [B={batch}, Hkv, PAD + Nr, D] with PAD={PAD}; got {list(res.shape)}")
        self.heads, self.dim = res.shape[1], res.shape[3]
        if self.heads == 0 or heads % self.heads:
            raise ValueError(f"the number of KV heads ({self.heads}) must divide the query heads ({heads})")
        self.res = res if res.stride(3) == 1 else res.contiguous()
        self.bits, self.group, self.axis, self.fmt = bits, group, axis, fmt
        self.levels = self.res  # a placeholder pointer unless the format is NF
        if bits >= 16:  # not quantized: only the residual holds tokens; codes/scale/mn are unused
            self.nq, self.fmt = 0, KIVI
            self.codes = self.scale = self.mn = self.res
        else:
            if fmt not in KERNEL_BITS:
                raise ValueError(f"{name}_meta format {fmt} has no Triton kernel; valid: "
                                 f"{', '.join(map(str, KERNEL_BITS))} (methods.FORMATS)")
            if bits not in KERNEL_BITS[fmt]:
                raise ValueError(f"{name}_meta bits must be {', '.join(map(str, KERNEL_BITS[fmt]))} or 16 for "
                                 f"format {fmt}; got {bits}")
            if axis not in (TOKEN_AXIS, CHANNEL_AXIS) or (fmt != KIVI and axis != CHANNEL_AXIS):
                raise ValueError(f"{name}_meta axis must be {TOKEN_AXIS} or {CHANNEL_AXIS} (the symmetric formats: "
                                 f"{CHANNEL_AXIS}); got {axis}")
            per = codes_per_word(bits)
            self.nq = int(meta[3]) if len(meta) >= 4 else codes.shape[2] - PAD
            D, nq = self.dim, self.nq
            srows, swidth = (nq // group, D) if axis == TOKEN_AXIS else (nq, D // group)
            ok = (
                nq >= 0 and D % per == 0 and codes.dim() == 4 and codes.dtype == torch.uint8
                and tuple(codes.shape[:2]) == (batch, self.heads) and codes.shape[3] == D * bits // 8
                and codes.shape[2] >= PAD + nq and scale.dim() == 4 and tuple(scale.shape[:2]) == (batch, self.heads)
                and scale.shape[3] == swidth and scale.shape[2] >= PAD + srows and mn.dim() == 4
                and tuple(mn.shape[:3]) == tuple(scale.shape[:3]) and mn.shape[3] == (swidth if fmt == KIVI else 0)
                and (axis == CHANNEL_AXIS or nq % group == 0) and (axis == TOKEN_AXIS or D % group == 0)
            )
            if not ok:
                raise ValueError(
                    f"{name}: inconsistent packed cache for meta {tuple(meta)}: codes {list(codes.shape)} "
                    f"({codes.dtype}), scale {list(scale.shape)}, mn {list(mn.shape)}, res {list(res.shape)}; "
                    f"expected codes [B, Hkv, >= PAD + Nq, D*bits/8] uint8 and scale/mn "
                    f"[B, Hkv, >= PAD + {'Nq/G, D' if axis == TOKEN_AXIS else 'Nq, D/G'}] (PAD={PAD}, Nq={nq}; "
                    f"mn of width 0 for the symmetric formats)"
                )
            self.codes, self.scale, self.mn = (t if t.stride(3) == 1 else t.contiguous() for t in (codes, scale, mn))
            if fmt == NF:
                self.levels = nqkv.levels(bits, res.device)
        self.ntok = self.nq + res.shape[2] - PAD

    def args(self):
        """(tensors, strides) for the kernels: C, S, MN, R and their (batch, head, row) strides."""
        c, s, r = self.codes, self.scale, self.res
        return (c, s, self.mn, r), (c.stride(0), c.stride(1), c.stride(2), s.stride(0), s.stride(1), s.stride(2),
                                    r.stride(0), r.stride(1), r.stride(2))

    def consts(self):
        return dict(BITS=self.bits, GROUP=self.group if self.bits < 16 else 1, AXIS=self.axis, FMT=self.fmt)


def _dtype_flags(dtype: torch.dtype) -> dict:
    interp = _interpreting()
    bf16 = dtype == torch.bfloat16
    upcast = bf16 and interp
    return dict(COMPUTE=_TL_DTYPES[dtype], RNE_BF16=bf16 and interp, UPCAST=upcast,
                IEEE=dtype == torch.float32 or upcast)


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


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(device: torch.device, programs: int, n_tiles: int) -> int:
    """Enough splits along T to give every SM about two programs (flash-decoding), keeping at least
    two tiles per split so the partial results stay small next to the cache they summarize."""
    if device.type != "cuda" or _interpreting():
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, n_tiles // 2))


def _check_q(q: Tensor, name: str = "q") -> None:
    if q.dim() != 4:
        raise ValueError(f"{name} must be [B, Hq, L, D]; got shape {list(q.shape)}")
    if q.dtype not in _TL_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {q.dtype}")


def _expand_mask(attn_mask: Tensor, B: int, Hq: int, L: int, T: int, dtype: torch.dtype) -> Tuple[Tensor, int]:
    try:
        m = attn_mask.expand(B, Hq, L, T)  # a view: broadcast dims get stride 0
    except RuntimeError as e:
        raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to [B, Hq, L, T] = "
                         f"{[B, Hq, L, T]}") from e
    if m.dtype == torch.bool:
        return m.view(torch.uint8), _MASK_BOOL
    if not m.dtype.is_floating_point:
        raise ValueError(f"attn_mask must be boolean or floating point (additive); got {m.dtype}")
    return m, _MASK_ADD


def _keys_in_basis(q: Tensor, k_res: Tensor, k_meta: Sequence[int]):
    """NFH codes are NF codes of each block's transform (reference.in_basis): attention runs in that
    basis. q and the full-precision residuals (a few tokens) are transformed with torch, the kernels
    read the codes as plain NF, and the output is transformed back when the values are NFH. All of it
    in float32 (q, residuals and output are small in decode), rounded to q's dtype once at the end."""
    g = ref.hadamard_block(k_meta)
    return (ref.rotate(q, g), ref.rotate(k_res, g), (*k_meta[:4], NF)) if g else (q.float(), k_res.float(), k_meta)


def _values_in_basis(v_res: Tensor, v_meta: Sequence[int]):
    """(v_res, v_meta, block): see _keys_in_basis; block 0 when the values are not NFH."""
    g = ref.hadamard_block(v_meta)
    return (ref.rotate(v_res, g), (*v_meta[:4], NF), g) if g else (v_res.float(), v_meta, 0)


def attention(
    q: Tensor,
    k_codes: Tensor, k_scale: Tensor, k_mn: Tensor, k_res: Tensor,
    v_codes: Tensor, v_scale: Tensor, v_mn: Tensor, v_res: Tensor,
    k_meta: Sequence[int], v_meta: Sequence[int],
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> Tensor:
    """scaled_dot_product_attention of q [B, Hq, L, D] over packed keys and values (Triton).

    The semantics of `reference.attention` with its (codes, scale, mn, res) tuples spelled out:
      k_*, v_*: padded inner tensors with Hkv heads, Hkv divides Hq; query head h reads KV head
                h // (Hq / Hkv). k_meta, v_meta: (bits, group, axis) or (bits, group, axis, nq),
                bits 2, 4 or 16; with nq, the packed storage may have spare rows after nq tokens.
      attn_mask: additive float or boolean (True = attend), broadcastable to [B, Hq, L, T].
      is_causal: query i sees keys j <= i (top-left aligned, as SDPA); not with attn_mask.
      dropout_p: must be 0.  scale: default 1 / sqrt(D).
    Returns [B, Hq, L, Dv], contiguous, in q's dtype. A row whose keys are all masked gives 0.
    Any D and Dv work (tiles are padded to powers of two >= 16).

    Grid: (B * Hkv, num_splits, cdiv(Hq / Hkv * L, BLOCK_M)), then (B * Hkv, cdiv(Hq / Hkv * L,
    BLOCK_M)) for the reduction when num_splits > 1.
    """
    return attention_with_config(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, k_meta, v_meta,
                                 attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


def attention_with_config(
    q: Tensor,
    k_codes: Tensor, k_scale: Tensor, k_mn: Tensor, k_res: Tensor,
    v_codes: Tensor, v_scale: Tensor, v_mn: Tensor, v_res: Tensor,
    k_meta: Sequence[int], v_meta: Sequence[int],
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
    """`attention` with the launch configuration exposed (tests, benchmarks): num_splits (T chunks;
    default: enough to fill the GPU), block_n (tokens per tile, a power of two >= 16), num_warps
    (default by tile size), num_stages (the loop branches on the tile kind, so Triton does not
    pipeline it; kept for experiments)."""
    _check_q(q)
    if ref.hadamard_block(k_meta) or ref.hadamard_block(v_meta):
        if k_res.dtype != q.dtype or v_res.dtype != q.dtype:
            raise ValueError(f"q, keys and values must have the same dtype; got {q.dtype}, {k_res.dtype}, "
                             f"{v_res.dtype}")
        q32, k_res, k_meta = _keys_in_basis(q, k_res, k_meta)
        v_res, v_meta, gv = _values_in_basis(v_res, v_meta)
        out = attention_with_config(q32, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, k_meta,
                                    v_meta, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                    scale=scale, num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                                    num_stages=num_stages)
        return (ref.rotate(out, gv) if gv else out).to(q.dtype)
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p must be 0 for the quantized KV attention (inference); got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set (as in scaled_dot_product_attention)")
    B, Hq, L, D = q.shape
    K = _Packed("k", k_codes, k_scale, k_mn, k_res, k_meta, B, Hq)
    V = _Packed("v", v_codes, v_scale, v_mn, v_res, v_meta, B, Hq)
    if K.dim != D:
        raise ValueError(f"q head_dim {D} and key head_dim {K.dim} differ")
    if K.heads != V.heads:
        raise ValueError(f"keys have {K.heads} heads, values {V.heads}")
    if K.ntok != V.ntok:
        raise ValueError(f"keys hold {K.ntok} tokens (Nq {K.nq} + Nr), values {V.ntok} (Nq {V.nq} + Nr)")
    if k_res.dtype != q.dtype or v_res.dtype != q.dtype:
        raise ValueError(f"q, keys and values must have the same dtype; got {q.dtype}, {k_res.dtype}, {v_res.dtype}")
    Hkv, T, Dv = K.heads, K.ntok, V.dim
    gq = Hq // Hkv
    out = torch.empty((B, Hq, L, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if T == 0:  # no keys: torch's SDPA gives zeros
        return out.zero_()

    mask_kind, mask, mstr = _MASK_NONE, q, (0, 0, 0, 0)
    if attn_mask is not None:
        mask, mask_kind = _expand_mask(attn_mask, B, Hq, L, T, q.dtype)
        mstr = mask.stride()
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    rows = gq * L
    block_m, block_n, block_d, block_dv, num_warps = _blocks(D, Dv, rows, q.dtype, block_n, num_warps)
    n_mblk = triton.cdiv(rows, block_m)
    n_tiles = triton.cdiv(T, block_n)
    if num_splits is None:
        num_splits = _num_splits(q.device, B * Hkv * n_mblk, n_tiles)
    num_splits = max(1, min(int(num_splits), n_tiles, 65535))  # 65535: grid dim 1 limit
    tiles_per_split = triton.cdiv(n_tiles, num_splits)
    num_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    partial = num_splits > 1
    if partial:
        part_m = torch.empty((B * Hkv, num_splits, rows), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B * Hkv, num_splits, rows, Dv), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused

    (kc, ks, km, kr), kstr = K.args()
    (vc, vs, vm, vr), vstr = V.args()
    kconst, vconst = K.consts(), V.consts()
    flags = _dtype_flags(q.dtype)
    grid = (B * Hkv, num_splits, n_mblk)
    _attn_fwd_kernel[grid](
        q, kc, ks, km, kr, K.levels, vc, vs, vm, vr, V.levels, mask, out, part_m, part_l, part_acc,
        *q.stride(), *kstr, *vstr, *mstr, out.stride(0), out.stride(1), out.stride(2),
        Hkv, gq, L, T, K.nq, V.nq, tiles_per_split, num_splits, sm_scale,
        K_BITS=kconst["BITS"], K_GROUP=kconst["GROUP"], K_AXIS=kconst["AXIS"], K_FMT=kconst["FMT"],
        V_BITS=vconst["BITS"], V_GROUP=vconst["GROUP"], V_AXIS=vconst["AXIS"], V_FMT=vconst["FMT"],
        D=D, DV=Dv, PAD_ROWS=PAD, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
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


def qk(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_mn: Tensor, k_res: Tensor, k_meta: Sequence[int],
       *, block_n: Optional[int] = None) -> Tensor:
    """q [B, Hq, L, D] @ K^T -> scores [B, Hq, L, T] in q's dtype, over packed keys with Hkv heads
    (the twin of `reference.qk`). Grid: (B * Hkv * cdiv(T, BLOCK_N), cdiv(Hq / Hkv * L, BLOCK_M))."""
    _check_q(q)
    if ref.hadamard_block(k_meta):
        if k_res.dtype != q.dtype:
            raise ValueError(f"q and keys must have the same dtype; got {q.dtype} and {k_res.dtype}")
        q32, k_res, k_meta = _keys_in_basis(q, k_res, k_meta)
        return qk(q32, k_codes, k_scale, k_mn, k_res, k_meta, block_n=block_n).to(q.dtype)
    B, Hq, L, D = q.shape
    K = _Packed("k", k_codes, k_scale, k_mn, k_res, k_meta, B, Hq)
    if K.dim != D:
        raise ValueError(f"q head_dim {D} and key head_dim {K.dim} differ")
    if k_res.dtype != q.dtype:
        raise ValueError(f"q and keys must have the same dtype; got {q.dtype} and {k_res.dtype}")
    Hkv, T = K.heads, K.ntok
    gq = Hq // Hkv
    out = torch.empty((B, Hq, L, T), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    rows = gq * L
    block_m, block_n, block_d, _, num_warps = _blocks(D, 16, rows, q.dtype, block_n, None)
    n_tiles = triton.cdiv(T, block_n)
    (kc, ks, km, kr), kstr = K.args()
    kconst = K.consts()
    _qk_kernel[(B * Hkv * n_tiles, triton.cdiv(rows, block_m))](
        q, kc, ks, km, kr, K.levels, out, *q.stride(), *kstr, out.stride(0), out.stride(1), out.stride(2),
        Hkv, gq, L, T, K.nq, n_tiles,
        K_BITS=kconst["BITS"], K_GROUP=kconst["GROUP"], K_AXIS=kconst["AXIS"], K_FMT=kconst["FMT"], D=D, PAD_ROWS=PAD,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **_dtype_flags(q.dtype), num_warps=num_warps,
    )
    return out


def pv(p: Tensor, v_codes: Tensor, v_scale: Tensor, v_mn: Tensor, v_res: Tensor, v_meta: Sequence[int],
       *, num_splits: Optional[int] = None, block_n: Optional[int] = None) -> Tensor:
    """probs [B, Hq, L, T] @ V -> [B, Hq, L, Dv] in p's dtype, over packed values with Hkv heads
    (the twin of `reference.pv`). Grid: (B * Hkv, num_splits, cdiv(Hq / Hkv * L, BLOCK_M)); with
    several splits the fp32 partial sums are added by torch."""
    _check_q(p, "p")
    if ref.hadamard_block(v_meta):
        if v_res.dtype != p.dtype:
            raise ValueError(f"p and values must have the same dtype; got {p.dtype} and {v_res.dtype}")
        v_res, v_meta, gv = _values_in_basis(v_res, v_meta)
        out = pv(p.float(), v_codes, v_scale, v_mn, v_res, v_meta, num_splits=num_splits, block_n=block_n)
        return ref.rotate(out, gv).to(p.dtype)
    B, Hq, L, T = p.shape
    V = _Packed("v", v_codes, v_scale, v_mn, v_res, v_meta, B, Hq)
    if V.ntok != T:
        raise ValueError(f"p has {T} keys, the values hold {V.ntok} tokens")
    if v_res.dtype != p.dtype:
        raise ValueError(f"p and values must have the same dtype; got {p.dtype} and {v_res.dtype}")
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
    n_tiles = triton.cdiv(T, block_n)
    if num_splits is None:
        num_splits = _num_splits(p.device, B * Hkv * n_mblk, n_tiles)
    num_splits = max(1, min(int(num_splits), n_tiles, 65535))
    tiles_per_split = triton.cdiv(n_tiles, num_splits)
    num_splits = triton.cdiv(n_tiles, tiles_per_split)
    partial = num_splits > 1
    part = torch.empty((B * Hkv, num_splits, rows, Dv), dtype=torch.float32, device=p.device) if partial else out
    (vc, vs, vm, vr), vstr = V.args()
    vconst = V.consts()
    _pv_kernel[(B * Hkv, num_splits, n_mblk)](
        p, vc, vs, vm, vr, V.levels, out, part, *p.stride(), *vstr, out.stride(0), out.stride(1), out.stride(2),
        Hkv, gq, L, T, V.nq, tiles_per_split, num_splits,
        V_BITS=vconst["BITS"], V_GROUP=vconst["GROUP"], V_AXIS=vconst["AXIS"], V_FMT=vconst["FMT"], DV=Dv,
        PAD_ROWS=PAD,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DV=block_dv, WRITE_PARTIAL=partial, **_dtype_flags(p.dtype),
        num_warps=num_warps,
    )
    if partial:
        # (B*Hkv, splits, GQ*L, Dv) -> (B, Hkv, GQ, L, Dv) -> (B, Hq, L, Dv)
        out.copy_(part.sum(1).view(B, Hkv, gq, L, Dv).reshape(B, Hq, L, Dv))
    return out
