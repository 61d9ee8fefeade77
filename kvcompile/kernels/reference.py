"""Torch reference twins of the kernels: the CPU path and the test oracle.

Shapes (B batch, H heads, N tokens, D head_dim, Hq query heads, L query length, T = Nq + Nr):
  x            [B, H, N, D]                cache dtype
  codes        [B, H, N, D * bits / 8]     uint8, codes packed low bits first (3-bit codes: 8 in
                                           3 bytes, as one little-endian 24-bit word)
  scale, mn    [B, H, N / G, D]            (axis 2: groups of G tokens, one channel)
               [B, H, N, D / G]            (axis 3: groups of G channels, one token)
                                           (mn: last dim 0 for the symmetric formats)
  res          [B, H, Nr, D]               full-precision residual (newest tokens)

The state stores each of codes, scale, mn and res with PAD unused leading rows along dim 2 (see
state.py: it keeps every dynamic size >= 2, so Dynamo never specializes a size to 0 or 1 and a
generation compiles a bounded, small number of graphs). Functions named `*_padded` take padded
tensors; the others take plain ones. The packed storage (codes, scale, mn) may have spare rows
after its Nq tokens, so that appending writes in place; ops are told Nq (`meta[3]`).

Storage formats (`fmt`, methods/__init__.py; an op's meta is (bits, group, axis, nq[, fmt]) and a
4-element meta means KIVI):

KIVI, asymmetric b-bit quantization of a group x: mn = min(x), scale = (max(x) - mn) / (2^b - 1),
code = clamp(floor((x - mn) / scale + 0.5), 0, 2^b - 1), dequantized code * scale + mn.
Arithmetic is float32; scale and mn are stored in the cache dtype, and codes are computed with the
stored scale, so that dequantization inverts exactly what was stored. A constant group has
scale 0 and dequantizes to mn exactly.

NF, NFH, INT8, FP8 (methods nqkv, nqkv with hadamard=True, int8, fp8): symmetric, one scale per group
and no minimum (mn has width 0); the per-group arithmetic is in methods/nqkv.py, int8.py and fp8.py
(NFH: NF in the basis of each block's Hadamard transform, nqkv.fwht before quantizing and after
dequantizing). 8-bit codes take one byte each; 3-bit codes 3 bytes per 8 codes.

The Triton twins (triton_quantize.py, triton_attention.py) implement every format.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..methods import FP8, INT8, KIVI, NF, NFH, fp8, int8, nqkv

TOKEN_AXIS = 2
CHANNEL_AXIS = 3
PAD = 2


def unpad(t: Tensor) -> Tensor:
    return t[:, :, PAD:]


def pad(t: Tensor) -> Tensor:
    """Prepend PAD zero rows along dim 2 (a new contiguous tensor)."""
    B, H, _, X = t.shape
    return torch.cat([t.new_zeros((B, H, PAD, X)), t], dim=2)


_SHIFTS3 = tuple(range(0, 24, 3))


def pack(codes: Tensor, bits: int) -> Tensor:
    """[..., D] integer codes in [0, 2^bits) -> [..., D * bits / 8] uint8, low bits first.
    3 bits: each 8 codes form a 24-bit word (code i in bits 3i..3i+2) stored as 3 bytes, low first."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 3:
        c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
        word = c[..., 0]
        for i in range(1, 8):
            word = word | (c[..., i] << _SHIFTS3[i])
        out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1).to(torch.uint8)
        return out.reshape(*codes.shape[:-1], codes.shape[-1] * 3 // 8)
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack`: [..., D * bits / 8] uint8 -> [..., D] uint8 codes."""
    if bits == 8:
        return packed
    if bits == 3:
        b = packed.to(torch.int32).reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        c = torch.stack([(word >> s) & 7 for s in _SHIFTS3], dim=-1).to(torch.uint8)
        return c.reshape(*packed.shape[:-1], packed.shape[-1] * 8 // 3)
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    c = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _grouped(x: Tensor, group: int, axis: int) -> Tensor:
    B, H, N, D = x.shape
    if axis == TOKEN_AXIS:
        return x.reshape(B, H, N // group, group, D)  # reduce over dim 3
    return x.reshape(B, H, N, D // group, group)  # reduce over dim 4


def _reduce_dim(axis: int) -> int:
    return 3 if axis == TOKEN_AXIS else 4


_SYMMETRIC = {NF: nqkv, NFH: nqkv, INT8: int8, FP8: fp8}


def _symmetric(fmt: int):
    """The method module holding the per-group arithmetic of a symmetric format."""
    if fmt not in _SYMMETRIC:
        raise ValueError(f"unknown storage format {fmt}; valid: {KIVI} (kivi), {NF} (nf), {NFH} (nf of Hadamard "
                         f"blocks), {INT8} (int8), {FP8} (fp8)")
    return _SYMMETRIC[fmt]


def quantize(x: Tensor, bits: int, group: int, axis: int, fmt: int = KIVI) -> Tuple[Tensor, Tensor, Tensor]:
    """x [B, H, N, D] -> (codes, scale, mn), see the module docstring for the layouts and formats."""
    B, H, N, D = x.shape
    xg = _grouped(x.float(), group, axis)
    rd = _reduce_dim(axis)
    if fmt != KIVI:
        if fmt == NFH:  # blocks run along the channels (the last dim of xg)
            xg = nqkv.fwht(xg)
        q, scale = _symmetric(fmt).quantize(xg, bits, x.dtype, rd)
        scale = scale.squeeze(rd)
        codes = pack(q.reshape(B, H, N, D), bits)
        return codes.contiguous(), scale.contiguous(), scale.new_zeros((*scale.shape[:3], 0))
    qmax = (1 << bits) - 1
    mn = xg.amin(dim=rd, keepdim=True)
    mx = xg.amax(dim=rd, keepdim=True)
    scale = ((mx - mn) / qmax).to(x.dtype)
    s = scale.float()
    q = torch.floor((xg - mn) / s + 0.5).clamp_(0, qmax)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    codes = pack(q.to(torch.uint8).reshape(B, H, N, D), bits)
    return codes.contiguous(), scale.squeeze(rd).contiguous(), mn.squeeze(rd).to(x.dtype).contiguous()


def dequantize(codes: Tensor, scale: Tensor, mn: Tensor, bits: int, group: int, axis: int, head_dim: int,
               fmt: int = KIVI) -> Tensor:
    """(codes, scale, mn) -> [B, H, N, D] in the dtype of `scale`."""
    B, H, N, _ = codes.shape
    rd = _reduce_dim(axis)
    if fmt != KIVI:
        q = _grouped(unpack(codes, bits).reshape(B, H, N, head_dim), group, axis)
        x = _symmetric(fmt).dequantize(q, scale.unsqueeze(rd), bits)
        if fmt == NFH:
            x = nqkv.fwht(x)
        return x.reshape(B, H, N, head_dim).to(scale.dtype)
    q = unpack(codes, bits).float().reshape(B, H, N, head_dim)
    qg = _grouped(q, group, axis)
    x = qg * scale.float().unsqueeze(rd) + mn.float().unsqueeze(rd)
    return x.reshape(B, H, N, head_dim).to(scale.dtype)


def used_rows(codes: Tensor, scale: Tensor, mn: Tensor, group: int, axis: int, nq) -> Tuple[Tensor, Tensor, Tensor]:
    """The padded codes, scale and mn cut to their first Nq tokens (storage may hold spare capacity)."""
    ns = nq // group if axis == TOKEN_AXIS else nq
    return codes[:, :, :PAD + nq], scale[:, :, :PAD + ns], mn[:, :, :PAD + ns]


def full_padded(codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, bits: int, group: int, axis: int,
                nq=None, fmt: int = KIVI, skip=0) -> Tensor:
    """The whole cache [B, H, Nq - skip + Nr, D] from padded inner tensors: dequantized tokens, then the
    residual. `nq`: how many tokens the packed storage holds (None: all its rows, no spare capacity);
    `fmt`: the storage format; `skip`: how many of the nq a sliding window has dropped. Takes `*meta`
    after the tensors."""
    if nq is not None:
        codes, scale, mn = used_rows(codes, scale, mn, group, axis, nq)
    x = full(unpad(codes), unpad(scale), unpad(mn), unpad(res), bits, group, axis, fmt)
    return x[:, :, skip:].contiguous() if skip else x


def full(codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, bits: int, group: int, axis: int,
         fmt: int = KIVI) -> Tensor:
    """The whole cache [B, H, Nq + Nr, D]: dequantized tokens, then the residual.
    bits >= 16 means nothing is quantized (method "none"). There is no branch on Nq == 0: under
    Dynamo it would become a guard and specialize the size."""
    if bits >= 16:
        return res
    return torch.cat([dequantize(codes, scale, mn, bits, group, axis, res.shape[-1], fmt), res], dim=2)


def rotate(x: Tensor, block: int) -> Tensor:
    """x @ diag(H_block, H_block, ...) over the last dim (nqkv.fwht), in float32."""
    shape = x.shape
    return nqkv.fwht(x.float().reshape(*shape[:-1], shape[-1] // block, block)).reshape(shape)


def hadamard_block(meta) -> int:
    """The block size of an NFH cache tensor (nqkv with hadamard=True), 0 for any other."""
    return int(meta[1]) if len(meta) >= 5 and int(meta[4]) == NFH and int(meta[0]) < 16 else 0


def in_basis(t: Tuple[Tensor, Tensor, Tensor, Tensor], meta: Tuple[int, ...]):
    """An NFH cache tensor (nqkv with hadamard=True) seen in its Hadamard basis: (padded tensors, meta,
    block) whose `full_padded` is the cache times H (the NF codes as stored, the residual transformed),
    so attention need not transform the whole cache back every step: q k^T = (q H)(k H)^T and
    sum_j p_j v_j = (sum_j p_j (v_j H)) H, with H symmetric and H H = I. Other tensors: unchanged, 0."""
    g = hadamard_block(meta)
    if not g:
        return t, meta, 0
    codes, scale, mn, res = t
    return (codes, scale, mn, rotate(res, g).to(res.dtype)), (*meta[:4], NF, *meta[5:]), g


def _repeat_heads(x: Tensor, hq: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hq, T, D], each KV head serving Hq / Hkv consecutive query heads."""
    B, H, T, D = x.shape
    if hq == H:
        return x
    return x[:, :, None].expand(B, H, hq // H, T, D).reshape(B, hq, T, D)


def attention(
    q: Tensor,
    k: Tuple[Tensor, Tensor, Tensor, Tensor],
    v: Tuple[Tensor, Tensor, Tensor, Tensor],
    k_meta: Tuple[int, ...],
    v_meta: Tuple[int, ...],
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """scaled_dot_product_attention of q [B, Hq, L, D] over the (packed) keys and values.

    k, v: padded (codes, scale, mn, res) with Hkv heads; Hkv divides Hq (GQA/MQA).
    k_meta, v_meta: (bits, group, axis, nq[, fmt]), nq the number of quantized tokens (the packed storage
    may have spare rows after them), fmt the storage format (KIVI if absent). Returns [B, Hq, L, Dv],
    contiguous. NFH keys / values are attended in their Hadamard basis (`in_basis`): the query and the
    residual are transformed, and the output transformed back, in the cache dtype.
    """
    k, k_meta, gk = in_basis(k, k_meta)
    v, v_meta, gv = in_basis(v, v_meta)
    if gk:
        q = rotate(q, gk).to(q.dtype)
    K = full_padded(*k, *k_meta)
    V = full_padded(*v, *v_meta)
    hq = q.shape[1]
    if enable_gqa and hq != K.shape[1]:  # as the replaced call did (SDPA's GQA path rounds differently)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, K, V, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=True)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, _repeat_heads(K, hq), _repeat_heads(V, hq), attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale,
        )
    if gv:
        out = rotate(out, gv).to(out.dtype)
    return out.contiguous()


def qk(q: Tensor, k: Tuple[Tensor, Tensor, Tensor, Tensor], k_meta: Tuple[int, ...]) -> Tensor:
    """q [B, Hq, L, D] @ K^T -> scores [B, Hq, L, T] (eager attention's first matmul); NFH in its basis."""
    k, k_meta, gk = in_basis(k, k_meta)
    if gk:
        q = rotate(q, gk).to(q.dtype)
    K = _repeat_heads(full_padded(*k, *k_meta), q.shape[1])
    return torch.matmul(q, K.transpose(2, 3)).contiguous()


def pv(p: Tensor, v: Tuple[Tensor, Tensor, Tensor, Tensor], v_meta: Tuple[int, ...]) -> Tensor:
    """probs [B, Hq, L, T] @ V -> [B, Hq, L, Dv] (eager attention's second matmul); NFH in its basis."""
    v, v_meta, gv = in_basis(v, v_meta)
    V = _repeat_heads(full_padded(*v, *v_meta), p.shape[1])
    out = torch.matmul(p, V)
    return (rotate(out, gv).to(out.dtype) if gv else out).contiguous()
