"""Every torch.library op of kvcompile (namespace `kvquant::`), each with its fake.

Ops take plain tensors only: the quantized state (state.py) is unpacked into its inner tensors
by the Python glue that the FX pass inserts. Each op picks its implementation by device: the
torch reference (kernels/reference.py) on the CPU, Triton kernels on CUDA where one exists.
Outputs are contiguous and the fakes give exactly those shapes and strides.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from .kernels import reference as ref
from .methods import FP8, INT8, KIVI, NF, NFH

KERNELS = ("auto", "triton", "torch")


# Storage formats the Triton kernels read and write (NFH: NF in each block's Hadamard basis).
TRITON_FORMATS = (KIVI, NF, NFH, INT8, FP8)


def use_triton(t: Tensor, *formats: int) -> bool:
    """Triton kernels on CUDA, the torch reference elsewhere. KVCOMPILE_KERNELS=triton forces the
    kernels (on a CPU: with TRITON_INTERPRET=1, for tests), =torch forces the reference.
    A format among `formats` that the kernels do not know takes the reference."""
    mode = os.environ.get("KVCOMPILE_KERNELS", "auto")
    if mode not in KERNELS:
        raise ValueError(f"KVCOMPILE_KERNELS must be one of {', '.join(KERNELS)}; got {mode!r}")
    if any(f not in TRITON_FORMATS for f in formats):
        return False
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def _count(name: str) -> None:
    counters["kvquant"][name] += 1

# `meta` below: (bits, group, axis, nq, fmt[, skip]) of a cache tensor, nq = tokens held by the packed
# storage, fmt its storage format (methods.FORMATS), skip how many of those nq a sliding window has
# dropped (they are not part of the cache; 0 if absent); a 4-element meta means KIVI.


def _fmt(meta: List[int]) -> int:
    return int(meta[4]) if len(meta) > 4 else KIVI


def _skip(meta: List[int]):
    return meta[5] if len(meta) > 5 else 0


def _kernel_meta(*metas: List[int]) -> Optional[List[List[int]]]:
    """The metas as the Triton kernels take them, or None if the kernels cannot read these tensors:
    a format they do not know, or dropped rows at the start of the packed storage (sliding-window
    layers once the window is full: the torch reference reads those)."""
    if any(int(_skip(m)) for m in metas):
        return None
    return [list(m[:5]) for m in metas]


def _mn_width(D: int, group: int, axis: int, fmt: int) -> int:
    if fmt != KIVI:
        return 0
    return D if axis == ref.TOKEN_AXIS else D // group


@torch.library.custom_op("kvquant::quantize", mutates_args=())
def quantize(x: Tensor, bits: int, group: int, axis: int, fmt: int = KIVI) -> Tuple[Tensor, Tensor, Tensor]:
    """x [B, H, N, D] -> (codes uint8 [B, H, N, D*bits/8], scale, mn) in storage format `fmt`;
    see kernels/reference.py."""
    return ref.quantize(x, bits, group, axis, fmt)


@quantize.register_fake
def _quantize_fake(x: Tensor, bits: int, group: int, axis: int, fmt: int = KIVI) -> Tuple[Tensor, Tensor, Tensor]:
    B, H, N, D = x.shape
    codes = x.new_empty((B, H, N, D * bits // 8), dtype=torch.uint8)
    rows, width = (N // group, D) if axis == ref.TOKEN_AXIS else (N, D // group)
    return codes, x.new_empty((B, H, rows, width)), x.new_empty((B, H, rows, _mn_width(D, group, axis, fmt)))


def _n_quantize(method: str, bits: int, group: int, axis: int, residual: int, n_res):
    from .methods import Layout

    return Layout(method, "k" if axis == ref.TOKEN_AXIS else "v", bits, group, axis, residual).n_quantize(n_res)


def _scale_rows(n, group: int, axis: int):
    return n // group if axis == ref.TOKEN_AXIS else n


@torch.library.custom_op("kvquant::compact_", mutates_args=("codes", "scale", "mn"))
def compact_(codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, nq: int, method: str, bits: int, group: int,
             axis: int, residual: int, fmt: int) -> Tensor:
    """Quantize the oldest residual tokens that the method no longer keeps in full precision and write
    them into the packed storage in place, after its `nq` tokens (the caller makes sure it has room),
    in storage format `fmt`. Takes padded tensors; returns the new padded residual."""
    n = _n_quantize(method, bits, group, axis, residual, res.shape[2] - ref.PAD)
    r = ref.unpad(res)
    o, os_ = ref.PAD + nq, ref.PAD + _scale_rows(nq, group, axis)
    if n > 0 and use_triton(res, fmt):
        from .kernels import triton_quantize

        _count("triton_quantize_calls")
        if fmt == KIVI:
            triton_quantize.quantize(r[:, :, :n], bits, group, axis, out=(codes, scale, mn), row=o, scale_row=os_)
        else:
            triton_quantize.quantize_symmetric(r[:, :, :n], bits, group, fmt, out=(codes, scale, mn), row=o,
                                               scale_row=os_)
    elif n > 0:
        c, s, m = ref.quantize(r[:, :, :n], bits, group, axis, fmt)
        codes[:, :, o:o + n] = c
        scale[:, :, os_:os_ + s.shape[2]] = s
        mn[:, :, os_:os_ + m.shape[2]] = m
    return ref.pad(r[:, :, n:])


@compact_.register_fake
def _compact_fake(codes, scale, mn, res, nq, method, bits, group, axis, residual, fmt):
    B, H, Nr, D = res.shape
    n = _n_quantize(method, bits, group, axis, residual, Nr - ref.PAD)
    return res.new_empty((B, H, Nr - n, D))


@torch.library.custom_op("kvquant::write_", mutates_args=("codes", "scale", "mn"))
def write_(codes: Tensor, scale: Tensor, mn: Tensor, new: Tensor, pos: Tensor, bits: int, group: int, fmt: int) -> None:
    """Quantize tokens new [B, H, L, D] one by one (groups along the channels) and write them at token
    positions `pos` [L] of the packed storage, in place (a fixed-size buffer: StaticCache)."""
    c, s, m = ref.quantize(new.to(scale.dtype), bits, group, ref.CHANNEL_AXIS, fmt)
    idx = pos.to(codes.device) + ref.PAD
    codes.index_copy_(2, idx, c)
    scale.index_copy_(2, idx, s)
    mn.index_copy_(2, idx, m)


@write_.register_fake
def _write_fake(codes, scale, mn, new, pos, bits, group, fmt) -> None:
    return None


@torch.library.custom_op("kvquant::grow", mutates_args=())
def grow(codes: Tensor, scale: Tensor, mn: Tensor, nq: int, capacity: int, group: int, axis: int, start: int = 0
         ) -> Tuple[Tensor, Tensor, Tensor]:
    """New packed storage with room for `capacity` tokens, holding tokens [start, nq) of the old (a
    sliding window frees the rows of tokens it dropped; `start` covers whole scale rows)."""
    out = _grow_fake(codes, scale, mn, nq, capacity, group, axis, start)
    r0, r1 = _scale_rows(start, group, axis), _scale_rows(nq, group, axis)
    for new, old, a, b in zip(out, (codes, scale, mn), (start, r0, r0), (nq, r1, r1)):
        new.zero_()
        new[:, :, ref.PAD:ref.PAD + b - a] = old[:, :, ref.PAD + a:ref.PAD + b]
    return out


@grow.register_fake
def _grow_fake(codes, scale, mn, nq, capacity, group, axis, start=0):
    B, H = codes.shape[:2]
    rows = ref.PAD + _scale_rows(capacity, group, axis)
    return (
        codes.new_empty((B, H, ref.PAD + capacity, codes.shape[3])),
        scale.new_empty((B, H, rows, scale.shape[3])),
        mn.new_empty((B, H, rows, mn.shape[3])),
    )


@torch.library.custom_op("kvquant::dequantize", mutates_args=())
def dequantize(codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, meta: List[int]) -> Tensor:
    """The full-precision cache [B, H, Nq + Nr, D] from padded (codes, scale, mn, res);
    meta = (bits, group, axis, nq[, fmt]).

    An op rather than torch code so that tracing it (the state's dequantize-then-run fallback under
    Dynamo) adds no guards on the token counts: broadcasting a count that happens to be 1 would
    specialize it and recompile."""
    return ref.full_padded(codes, scale, mn, res, *meta).contiguous()


@dequantize.register_fake
def _dequantize_fake(codes, scale, mn, res, meta) -> Tensor:
    B, H, Nr, D = res.shape
    return res.new_empty((B, H, meta[3] - _skip(meta) + Nr - ref.PAD, D))


@torch.library.custom_op("kvquant::append", mutates_args=())
def append(res: Tensor, new: Tensor) -> Tensor:
    """The residual [B, H, Nr, D] with new tokens [B, H, L, D] appended (in the residual's dtype)."""
    return torch.cat([res, new.to(res.dtype)], dim=2)


@append.register_fake
def _append_fake(res: Tensor, new: Tensor) -> Tensor:
    B, H, Nr, D = res.shape
    return res.new_empty((B, H, Nr + new.shape[2], D))


@torch.library.custom_op("kvquant::attention", mutates_args=())
def attention(
    q: Tensor,
    k_codes: Tensor, k_scale: Tensor, k_mn: Tensor, k_res: Tensor,
    v_codes: Tensor, v_scale: Tensor, v_mn: Tensor, v_res: Tensor,
    k_meta: List[int], v_meta: List[int],
    attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
) -> Tensor:
    """SDPA of q [B, Hq, L, D] over packed K/V with Hkv heads -> [B, Hq, L, Dv]. `enable_gqa` says how
    the replaced SDPA call saw the heads; the reference follows it so that method "none" is exact."""
    kmeta = _kernel_meta(k_meta, v_meta)
    if kmeta and use_triton(q, _fmt(k_meta), _fmt(v_meta)) and dropout_p == 0.0:
        from .kernels import triton_attention

        _count("triton_attention_calls")
        return triton_attention.attention(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res,
                                          *kmeta, attn_mask=attn_mask,
                                          is_causal=is_causal, scale=scale)
    return ref.attention(
        q, (k_codes, k_scale, k_mn, k_res), (v_codes, v_scale, v_mn, v_res), tuple(k_meta), tuple(v_meta),
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
    )


@attention.register_fake
def _attention_fake(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, k_meta, v_meta,
                    attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Tensor:
    B, Hq, L, _ = q.shape
    return q.new_empty((B, Hq, L, v_res.shape[-1]))


@torch.library.custom_op("kvquant::qk", mutates_args=())
def qk(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_mn: Tensor, k_res: Tensor, k_meta: List[int]) -> Tensor:
    """q [B, Hq, L, D] @ K^T -> [B, Hq, L, T] over packed keys with Hkv heads."""
    kmeta = _kernel_meta(k_meta)
    if kmeta and use_triton(q, _fmt(k_meta)):
        from .kernels import triton_attention

        _count("triton_qk_calls")
        return triton_attention.qk(q, k_codes, k_scale, k_mn, k_res, *kmeta)
    return ref.qk(q, (k_codes, k_scale, k_mn, k_res), tuple(k_meta))


@qk.register_fake
def _qk_fake(q, k_codes, k_scale, k_mn, k_res, k_meta) -> Tensor:
    B, Hq, L, _ = q.shape
    return q.new_empty((B, Hq, L, k_meta[3] - _skip(k_meta) + k_res.shape[2] - ref.PAD))


@torch.library.custom_op("kvquant::pv", mutates_args=())
def pv(p: Tensor, v_codes: Tensor, v_scale: Tensor, v_mn: Tensor, v_res: Tensor, v_meta: List[int]) -> Tensor:
    """probs [B, Hq, L, T] @ V -> [B, Hq, L, Dv] over packed values with Hkv heads."""
    kmeta = _kernel_meta(v_meta)
    if kmeta and use_triton(p, _fmt(v_meta)):
        from .kernels import triton_attention

        _count("triton_pv_calls")
        return triton_attention.pv(p, v_codes, v_scale, v_mn, v_res, *kmeta)
    return ref.pv(p, (v_codes, v_scale, v_mn, v_res), tuple(v_meta))


@pv.register_fake
def _pv_fake(p, v_codes, v_scale, v_mn, v_res, v_meta) -> Tensor:
    B, Hq, L, _ = p.shape
    return p.new_empty((B, Hq, L, v_res.shape[-1]))
