"""The quantized KV state: a traceable wrapper tensor subclass.

Its logical shape and dtype are those of the full-precision cache [B, H, T, D], so model code that
reads `keys.shape[-2]` keeps working. Its inner tensors are those of a `Packed` (layout.py: codes,
scale, mn, res, each with PAD leading rows), its flatten context its `Layout`; `packed()` hands both,
with the counts, to the ops.

Nq is not stored: it is T - Nr, from the state's logical shape. Tokens leaving the residual are
written into the spare rows in place (kvquant::compact_); when there is no room the storage grows
by a few percent (Layout.capacity), so a step does not copy the packed cache and the bytes held stay
within a few percent of the packed size. A state is an append-only buffer: the state a step read
stays valid (its Nq rows are never rewritten), but two continuations of one state would write the
same spare rows, so branch from a `clone()`.

A sliding-window layer's state (Layout.window) also carries `skip`, an empty [PAD + S, 0] tensor whose
size S counts the oldest packed rows the window has dropped. They are not freed at once (that would
rewrite storage a previous step may still read): every read skips them, and the storage leaves them
behind when it is next reallocated (kv_compact), so the bytes held stay those of the window plus the
few percent of spare rows. T = Nq - S + Nr. A size rather than a number, so that Dynamo sees it as a
dynamic size like the others (Packed.skip).

A static state (Layout.static: transformers' StaticCache) is a fixed-size buffer: M packed rows, no
residual, written in place at given positions (kv_static_write); its sizes are not marked dynamic.

Each inner tensor has PAD (= 2) unused leading rows along dim 2 (layout.PAD). Dynamo
specializes input sizes 0 and 1 and would compile a new graph each time a residual empties after a
flush; with the pad no dynamic size is ever below 2, and a generation compiles a small, bounded
number of graphs. The cost is 2 rows per inner tensor (about 0.5% of the cache at T = 1k).

The rewritten graph returns a state where the cache tensor was returned; Dynamo stores it in the
cache object (e.g. `DynamicCache.layers[i].keys`) and the next step receives it as a graph input.
Any torch op the state does not implement runs on its dequantized value: slow, never wrong.
In-place ops on a state are refused, since they would be lost.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import ops
from .kernels import reference as ref
from .layout import PAD, Layout, Packed

aten = torch.ops.aten


class KVState(Tensor):
    codes: Tensor
    scale: Tensor
    mn: Tensor
    res: Tensor
    kv_layout: Layout

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, layout: Layout,
                outer_size: Optional[torch.Size] = None, outer_stride: Optional[tuple] = None,
                skip: Optional[Tensor] = None) -> "KVState":
        if outer_size is None:  # no spare capacity
            B, H, Nr, D = res.shape
            dropped = skip.shape[0] - PAD if skip is not None else 0
            outer_size = (B, H, codes.shape[2] - dropped + Nr - 2 * PAD, D)
        return Tensor._make_wrapper_subclass(
            cls, outer_size, strides=outer_stride, dtype=res.dtype, device=res.device, requires_grad=False
        )

    def __init__(self, codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, layout: Layout,
                 outer_size: Optional[torch.Size] = None, outer_stride: Optional[tuple] = None,
                 skip: Optional[Tensor] = None) -> None:
        if layout.window and skip is None:
            skip = codes.new_empty((PAD, 0))
        if not layout.window and skip is not None:
            raise ValueError("kvcompile: only a sliding-window layout has dropped rows (skip)")
        self.codes, self.scale, self.mn, self.res, self.kv_layout = codes, scale, mn, res, layout
        self.skip = skip
        if layout.static:  # fixed sizes: decode compiles once
            return
        # Token counts grow every step: tell Dynamo up front, so the first decode graph is already
        # dynamic in them instead of recompiling once per inner size as each first changes.
        for t in (self, codes, scale, mn, res):
            torch._dynamo.maybe_mark_dynamic(t, 2)
        if skip is not None:
            torch._dynamo.maybe_mark_dynamic(skip, 0)

    def __tensor_flatten__(self):
        return _NAMES + (("skip",) if self.kv_layout.window else ()), self.kv_layout

    @staticmethod
    def __tensor_unflatten__(inner: dict, layout: Layout, outer_size, outer_stride) -> "KVState":
        return KVState(inner["codes"], inner["scale"], inner["mn"], inner["res"], layout, outer_size, outer_stride,
                       inner.get("skip"))

    def __repr__(self) -> str:  # never dequantizes
        lay = self.kv_layout
        return (
            f"KVState(method={lay.method!r}, role={lay.role!r}, bits={lay.bits}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, quantized_tokens={self.n_quantized - self.n_skip}, "
            f"residual_tokens={self.res.shape[2] - PAD}, capacity={self.codes.shape[2] - PAD}, "
            + (f"window={lay.window}, dropped_rows={self.n_skip}, " if lay.window else "")
            + f"nbytes={self.packed_nbytes()})"
        )

    @property
    def n_skip(self):
        """S, the oldest packed rows a sliding window has dropped (0 for other layers; a SymInt under tracing)."""
        return self.skip.shape[0] - PAD if self.skip is not None else 0

    @property
    def n_quantized(self):
        """Nq, the rows of packed storage in use, S dropped ones included (a SymInt under tracing)."""
        return self.shape[2] + self.n_skip - (self.res.shape[2] - PAD)

    def packed_nbytes(self) -> int:
        """Bytes the state really holds: codes + scales + minimums (spare rows included) + residual."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.mn, self.res))

    def packed(self) -> Packed:
        """The inner tensors, layout and counts, as the ops take them."""
        return Packed(self.codes, self.scale, self.mn, self.res, self.kv_layout, self.n_quantized, self.n_skip)

    def dequantize(self) -> Tensor:
        """The full-precision view [B, H, T, D] (a new tensor)."""
        return ops.dequantize(self.packed())

    def _map(self, fn) -> "KVState":
        out = [fn(t) for t in (self.codes, self.scale, self.mn, self.res)]
        skip = _carrier(out[0], self.n_skip) if self.skip is not None else None
        return KVState(*out, self.kv_layout, outer_size=(out[3].shape[0], *self.shape[1:]), skip=skip)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func._schema.is_mutable:
            raise RuntimeError(
                f"kvcompile: in-place op {func} on a quantized KV state is not supported "
                f"(it would write into a temporary dequantized copy and be lost)"
            )
        args, kwargs = pytree.tree_map_only(KVState, KVState.dequantize, (args, kwargs))
        return func(*args, **kwargs)


def _detach(s: KVState) -> KVState:
    return s._map(torch.Tensor.detach)


def _clone(s: KVState, *, memory_format: Any = None) -> KVState:
    return s._map(torch.clone)


def _to_copy(s: KVState, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None) -> Any:
    if dtype is not None and dtype != s.dtype:
        return NotImplemented  # a dtype change leaves the state: dequantize, then convert
    return s._map(lambda t: t.to(device=device, non_blocking=non_blocking))


def _index_select(s: KVState, dim: int, index: Tensor) -> Any:
    if dim not in (0, -4):  # beam reorder selects along the batch
        return NotImplemented
    return s._map(lambda t: t.index_select(0, index.to(t.device)))


def _copy_(dst: KVState, src: Any, non_blocking: bool = False) -> Any:
    """State-to-state copy of the same layout and sizes (AOTAutograd writes mutated inputs back so), or
    a fixed-size state rewritten whole from a full-precision tensor (StaticSlidingWindowLayer rolls its
    buffer so): every token quantized again, as written."""
    if isinstance(dst, KVState) and dst.kv_layout.static and isinstance(src, Tensor) \
            and not isinstance(src, KVState) and src.shape == dst.shape:
        pos = torch.arange(dst.shape[2], device=src.device)
        return kv_static_write(dst, 2, pos, src)
    if not (isinstance(dst, KVState) and isinstance(src, KVState) and dst.kv_layout == src.kv_layout
            and all(a.shape == b.shape for a, b in zip(_inner(dst), _inner(src)))):
        return NotImplemented
    for a, b in zip(_inner(dst), _inner(src)):
        a.copy_(b, non_blocking=non_blocking)
    return dst


def _index_copy_(s: KVState, dim: int, index: Tensor, source: Tensor) -> Any:
    """A fixed-size state written in place (StaticCache's update; Dynamo runs it on fake states while
    tracing, before the pass rewrites it into kv_static_write)."""
    if not (s.kv_layout.static and dim in (2, -2) and not isinstance(source, KVState)):
        return NotImplemented
    return kv_static_write(s, dim, index, source)


def _inner(s: KVState) -> tuple:
    return (s.codes, s.scale, s.mn, s.res) + ((s.skip,) if s.skip is not None else ())


_NAMES = ("codes", "scale", "mn", "res")


def _carrier(like: Tensor, skip) -> Tensor:
    """The empty tensor whose size carries S (see the module doc)."""
    return like.new_empty((PAD + skip, 0))


_HANDLERS = {
    aten.copy_.default: _copy_,
    aten.detach.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.index_select.default: _index_select,
    aten.index_copy_.default: _index_copy_,
}


# ---------------------------------------------------------------------------------------------
# The Python glue the FX pass inserts. It runs eagerly (compiler="eager") or is traced by
# AOTAutograd, which sees the kvquant:: ops and plain tensor ops.


def _empty_packed(like: Tensor, layout: Layout, B, H, D) -> tuple:
    cw, sw, mw = layout.widths(D)
    return (
        like.new_zeros((B, H, PAD, cw), dtype=torch.uint8),
        like.new_zeros((B, H, PAD, sw)),
        like.new_zeros((B, H, PAD, mw)),
    )


def kv_compact(s: KVState) -> KVState:
    """Quantize the residual tokens the method no longer keeps in full precision, in place in the
    packed storage (grown first if it has no room: a shape branch, so growing steps run a graph of
    their own; a sliding window's dropped rows are left behind then)."""
    lay = s.kv_layout
    if not lay.quantized:
        return s
    p = s.packed()
    need = p.nq + lay.n_quantize(p.res.shape[2] - PAD)
    if need > p.codes.shape[2] - PAD:
        start = (p.skip // lay.drop_quantum) * lay.drop_quantum if lay.window else 0
        codes, scale, mn = ops.grow(p, lay.capacity(need - start), start)
        p = p._replace(codes=codes, scale=scale, mn=mn, nq=p.nq - start, skip=p.skip - start)
    res = ops.compact_(p)
    return KVState(p.codes, p.scale, p.mn, res, lay, outer_size=s.shape,
                   skip=_carrier(p.codes, p.skip) if lay.window else None)


def kv_window(s: KVState, start: int) -> KVState:
    """`s[:, :, start:]` of a sliding-window layer's state (`start` < 0: keep the newest -start tokens):
    the oldest tokens are dropped, from the packed rows first (counted in S, see the module doc), then
    from the residual. Nothing is requantized: the tokens kept are those of `s`, bit for bit."""
    B, H, T, D = s.shape
    drop = torch.sym_max(T + start, 0) if start < 0 else torch.sym_min(start, T)
    from_packed = torch.sym_min(drop, s.n_quantized - s.n_skip)
    from_res = drop - from_packed
    # no branch on from_res > 0 (a guard, so another graph): the residual is copied, a few rows
    res = torch.cat([s.res[:, :, :PAD], s.res[:, :, PAD + from_res:]], dim=2)
    return KVState(s.codes, s.scale, s.mn, res, s.kv_layout, outer_size=(B, H, T - drop, D),
                   skip=_carrier(s.codes, s.n_skip + from_packed))


def kv_store(full: Tensor, layout: Layout) -> KVState:
    """A state from a full-precision cache tensor [B, H, T, D] (prefill), compacted."""
    B, H, _, D = full.shape
    return kv_compact(KVState(*_empty_packed(full, layout, B, H, D), ref.pad(full), layout))


def kv_static_empty(buffer: Tensor, layout: Layout) -> KVState:
    """A fixed-size state in place of a zero-filled cache buffer [B, H, M, D] (StaticCache's): M packed
    rows of zeros (which dequantize to 0, as the buffer held) and no residual."""
    B, H, M, D = buffer.shape
    cw, sw, mw = layout.widths(D)
    return KVState(buffer.new_zeros((B, H, PAD + M, cw), dtype=torch.uint8),
                   buffer.new_zeros((B, H, PAD + M, sw)), buffer.new_zeros((B, H, PAD + M, mw)),
                   buffer.new_zeros((B, H, PAD, D)), layout)


def kv_static_write(s: KVState, dim: int, pos: Tensor, new: Tensor) -> KVState:
    """`s.index_copy_(dim, pos, new)` on a fixed-size state: the tokens are quantized as they are
    written (every token on its own: Layout.static needs per-token groups, methods.static_reason)."""
    ops.write_(s.packed(), new, pos)
    return s


def kv_append(past: KVState, new: Tensor) -> KVState:
    """Append new tokens [B, H, L, D] to the full-precision residual (lossless, no compaction)."""
    B, H, T, D = past.shape
    return KVState(past.codes, past.scale, past.mn, ops.append(past.res, new), past.kv_layout,
                   outer_size=(B, H, T + new.shape[2], D), skip=past.skip)


def kv_sdpa(query: Tensor, key: KVState, value: KVState, attn_mask: Optional[Tensor] = None,
            dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
            enable_gqa: bool = False) -> Tensor:
    """Drop-in for F.scaled_dot_product_attention over states (GQA whatever enable_gqa says)."""
    return ops.attention(query, key.packed(), value.packed(), attn_mask, dropout_p, is_causal, scale, enable_gqa)


def kv_qk(query: Tensor, key: KVState) -> Tensor:
    """Drop-in for torch.matmul(query, repeat_kv(key).transpose(-1, -2))."""
    return ops.qk(query, key.packed())


def kv_pv(probs: Tensor, value: KVState) -> Tensor:
    """Drop-in for torch.matmul(probs, repeat_kv(value))."""
    return ops.pv(probs, value.packed())


def nbytes(t: Tensor) -> int:
    """Bytes a cache tensor holds: the packed size of a state, numel * itemsize otherwise."""
    if isinstance(t, KVState):
        return t.packed_nbytes()
    return t.numel() * t.element_size()
