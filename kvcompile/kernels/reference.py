"""Torch reference twins of the kernels: the CPU path and the test oracle.

Shapes (B batch, H heads, N tokens, D head_dim, Hq query heads, L query length, T cache tokens):
  x            [B, H, N, D]                cache dtype
  codes        [B, H, N, D * bits / 8]     uint8, codes packed low bits first (3-bit codes: 8 in
                                           3 bytes, as one little-endian 24-bit word)
  scale, mn    [B, H, N / G, D]            (TOKEN_AXIS: groups of G tokens, one channel)
               [B, H, N, D / G]            (CHANNEL_AXIS: groups of G channels, one token)
                                           (mn: last dim 0 for the formats that store no minimum)

`quantize` / `dequantize` take plain (unpadded) tensors and a Layout; the read functions (`full`,
`attention`, `qk`, `pv`) take `Packed` cache tensors (layout.py: padded, with their counts). The
arithmetic of each storage format is its method's (`layout.fmt`, methods/*.py); a format with a
transform (NFH) is transformed before quantizing and after dequantizing. The Triton twins
(triton_quantize.py, triton_attention.py) implement every format.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..layout import PAD, TOKEN_AXIS, Layout, Packed


def unpad(t: Tensor) -> Tensor:
    return t[:, :, PAD:]


def pad(t: Tensor) -> Tensor:
    """Prepend PAD zero rows along dim 2 (a new contiguous tensor)."""
    B, H, _, X = t.shape
    return torch.cat([t.new_zeros((B, H, PAD, X)), t], dim=2)


def drop(t: Tensor, n) -> Tensor:
    """Padded t [B, H, PAD + N, X] without its first n rows after the pad: [B, H, PAD + N - n, X], the pad
    rows kept (a new contiguous tensor). Gathered by an index rather than cut as cat(pad, t[:, :, PAD + n:]):
    under tracing, n symbolic, that slice could be 0 or 1 rows long and its contiguity would depend on n, each
    a guard (so a whole-model graph per outcome); every size here is >= PAD."""
    rows = torch.arange(t.shape[2] - n, device=t.device)
    return t.index_select(2, torch.where(rows < PAD, rows, rows + n))


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


def _grouped(x: Tensor, layout: Layout) -> Tuple[Tensor, int]:
    """x [B, H, N, D] with its groups along a dim of their own, and that dim."""
    B, H, N, D = x.shape
    g = layout.group
    if layout.axis == TOKEN_AXIS:
        return x.reshape(B, H, N // g, g, D), 3
    return x.reshape(B, H, N, D // g, g), 4


def quantize(x: Tensor, layout: Layout) -> Tuple[Tensor, Tensor, Tensor]:
    """x [B, H, N, D] -> (codes, scale, mn) in `layout`'s storage format (module docstring)."""
    fmt = layout.fmt
    xg, rd = _grouped(x.float(), layout)
    if fmt.transform is not None:  # per-token blocks: the group is the last dim
        xg = fmt.transform(xg)
    q, scale, mn = fmt.quantize(xg, layout.bits, x.dtype, rd)
    scale = scale.squeeze(rd)
    mn = scale.new_zeros((*scale.shape[:3], 0)) if mn is None else mn.squeeze(rd)
    return pack(q.reshape(x.shape), layout.bits).contiguous(), scale.contiguous(), mn.contiguous()


def dequantize(codes: Tensor, scale: Tensor, mn: Tensor, layout: Layout, head_dim: int) -> Tensor:
    """(codes, scale, mn) -> [B, H, N, D] in the dtype of `scale`."""
    fmt = layout.fmt
    B, H, N, _ = codes.shape
    q, rd = _grouped(unpack(codes, layout.bits).reshape(B, H, N, head_dim), layout)
    x = fmt.dequantize(q, scale.unsqueeze(rd), mn.unsqueeze(rd) if fmt.has_min else None, layout.bits)
    if fmt.transform is not None:
        x = fmt.transform(x)
    return x.reshape(B, H, N, head_dim).to(scale.dtype)


def qdq(x: Tensor, layout: Layout) -> Tensor:
    """x quantized and dequantized at once (the eager reference of the semantics: fakequant.py)."""
    return dequantize(*quantize(x, layout), layout, x.shape[-1])


def full(p: Packed) -> Tensor:
    """The whole cache [B, H, T, D] of a packed tensor: tokens [skip, nq) of the packed storage
    dequantized, then the residual. There is no branch on nq == 0: under Dynamo it would become a
    guard and specialize the size."""
    lay, res = p.layout, unpad(p.res)
    if not lay.quantized:
        return res
    ns = lay.scale_rows(p.nq)
    x = dequantize(p.codes[:, :, PAD:PAD + p.nq], p.scale[:, :, PAD:PAD + ns], p.mn[:, :, PAD:PAD + ns], lay,
                   res.shape[-1])
    x = torch.cat([x, res], dim=2)
    return x[:, :, p.skip:].contiguous() if p.skip else x


def rotate(x: Tensor, layout: Layout) -> Tensor:
    """x with every block of `layout.group` channels of its last dim transformed as the layout's format
    transforms its groups (NFH: x @ diag(H, H, ...)), in float32."""
    g = layout.group
    return layout.fmt.transform(x.float().reshape(*x.shape[:-1], x.shape[-1] // g, g)).reshape(x.shape)


def in_basis(q: Optional[Tensor], k: Optional[Packed], v: Optional[Packed], float32: bool = False
             ) -> Tuple[Optional[Tensor], Optional[Packed], Optional[Packed], Callable[[Tensor], Tensor]]:
    """Attention over a format stored in a transformed basis (NFH: each block times H, H symmetric and
    H H = I) runs in that basis, so that the cache is never transformed back: q k^T = (q H)(k H)^T and
    sum_j p_j v_j = (sum_j p_j (v_j H)) H.

    Returns (q, k, v, back): q transformed if the keys are; each transformed cache tensor with its
    residual transformed and its codes read as the format's plain one; `back` transforms an output back
    if the values are transformed. With float32=False every tensor keeps its dtype (the reference);
    with True (the Triton launchers) q, the residuals and the output come back in float32."""
    def keep(like: Tensor, x: Tensor) -> Tensor:
        return x.float() if float32 else x.to(like.dtype)

    def plain(p: Optional[Packed]) -> Optional[Packed]:
        if p is None:
            return None
        if p.layout.fmt.transform is None:
            return p._replace(res=keep(p.res, p.res))
        return p._replace(res=keep(p.res, rotate(p.res, p.layout)), layout=p.layout._replace(format=p.layout.fmt.plain))

    if q is not None:
        q = keep(q, rotate(q, k.layout) if k is not None and k.layout.fmt.transform else q)
    if v is not None and v.layout.fmt.transform:
        vl = v.layout
        return q, plain(k), plain(v), lambda out: keep(out, rotate(out, vl))
    return q, plain(k), plain(v), lambda out: out


def transformed(*packed: Packed) -> bool:
    """Whether any of these cache tensors is stored in a transformed basis (in_basis)."""
    return any(p.layout.fmt.transform is not None for p in packed)


def repeat_heads(x: Tensor, hq: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hq, T, D], each KV head serving Hq / Hkv consecutive query heads."""
    B, H, T, D = x.shape
    if hq == H:
        return x
    return x[:, :, None].expand(B, H, hq // H, T, D).reshape(B, hq, T, D)


def attention(q: Tensor, k: Packed, v: Packed, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """scaled_dot_product_attention of q [B, Hq, L, D] over packed keys and values with Hkv heads (Hkv
    divides Hq: GQA/MQA) -> [B, Hq, L, Dv], contiguous. Transformed formats attend in their basis
    (in_basis), in the cache dtype."""
    q, k, v, back = in_basis(q, k, v)
    K, V = full(k), full(v)
    hq = q.shape[1]
    if enable_gqa and hq != K.shape[1]:  # as the replaced call did (SDPA's GQA path rounds differently)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, K, V, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=True)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_heads(K, hq), repeat_heads(V, hq), attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale,
        )
    return back(out).contiguous()


def qk(q: Tensor, k: Packed) -> Tensor:
    """q [B, Hq, L, D] @ K^T -> scores [B, Hq, L, T] (eager attention's first matmul)."""
    q, k, _, _ = in_basis(q, k, None)
    return torch.matmul(q, repeat_heads(full(k), q.shape[1]).transpose(2, 3)).contiguous()


def pv(p: Tensor, v: Packed) -> Tensor:
    """probs [B, Hq, L, T] @ V -> [B, Hq, L, Dv] (eager attention's second matmul)."""
    _, _, v, back = in_basis(None, None, v)
    return back(torch.matmul(p, repeat_heads(full(v), p.shape[1]))).contiguous()
