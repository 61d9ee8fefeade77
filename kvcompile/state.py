"""The quantized KV state: a traceable wrapper tensor subclass.

Its logical shape and dtype are those of the full-precision cache [B, H, T, D], so model code that
reads `keys.shape[-2]` keeps working. Its inner tensors (see kernels/reference.py for layouts):

  codes  uint8 [B, H, C, D*bits/8]  packed codes of the Nq oldest tokens, then C - Nq spare rows
                                    (3-bit codes: 8 in 3 bytes)
  scale  [B, H, C/G, D] or [B, H, C, D/G], cache dtype
  mn     same shape as scale (kivi), or [B, H, C, 0] (the symmetric methods store no minimum)
  res    [B, H, Nr, D]  the newest Nr tokens in full precision;  T = Nq + Nr

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
dynamic size like the others (the ops get it as the 6th element of their meta).

A static state (Layout.static: transformers' StaticCache) is a fixed-size buffer: M packed rows, no
residual, written in place at given positions (kv_static_write); its sizes are not marked dynamic.

Each is stored with PAD (= 2) unused leading rows along dim 2 (kernels/reference.py: PAD). Dynamo
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
from .methods import Layout

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
            dropped = skip.shape[0] - ref.PAD if skip is not None else 0
            outer_size = (B, H, codes.shape[2] - dropped + Nr - 2 * ref.PAD, D)
        return Tensor._make_wrapper_subclass(
            cls, outer_size, strides=outer_stride, dtype=res.dtype, device=res.device, requires_grad=False
        )

    def __init__(self, codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, layout: Layout,
                 outer_size: Optional[torch.Size] = None, outer_stride: Optional[tuple] = None,
                 skip: Optional[Tensor] = None) -> None:
        if layout.window and skip is None:
            skip = codes.new_empty((ref.PAD, 0))
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
            f"residual_tokens={self.res.shape[2] - ref.PAD}, capacity={self.codes.shape[2] - ref.PAD}, "
            + (f"window={lay.window}, dropped_rows={self.n_skip}, " if lay.window else "")
            + f"nbytes={self.packed_nbytes()})"
        )

    @property
    def n_skip(self):
        """S, the oldest packed rows a sliding window has dropped (0 for other layers; a SymInt under tracing)."""
        return self.skip.shape[0] - ref.PAD if self.skip is not None else 0

    @property
    def n_quantized(self):
        """Nq, the rows of packed storage in use, S dropped ones included (a SymInt under tracing)."""
        return self.shape[2] + self.n_skip - (self.res.shape[2] - ref.PAD)

    def packed_nbytes(self) -> int:
        """Bytes the state really holds: codes + scales + minimums (spare rows included) + residual."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.mn, self.res))

    def dequantize(self) -> Tensor:
        """The full-precision view [B, H, T, D] (a new tensor)."""
        return ops.dequantize(self.codes, self.scale, self.mn, self.res, _meta(self))

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
    return like.new_empty((ref.PAD + skip, 0))


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
        like.new_zeros((B, H, ref.PAD, cw), dtype=torch.uint8),
        like.new_zeros((B, H, ref.PAD, sw)),
        like.new_zeros((B, H, ref.PAD, mw)),
    )


def kv_compact(s: KVState) -> KVState:
    """Quantize the residual tokens the method no longer keeps in full precision, in place in the
    packed storage (grown first if it has no room: a shape branch, so growing steps run a graph of
    their own; a sliding window's dropped rows are left behind then)."""
    lay = s.kv_layout
    if not lay.quantized:
        return s
    nq, skip = s.n_quantized, s.n_skip
    need = nq + lay.n_quantize(s.res.shape[2] - ref.PAD)
    codes, scale, mn = s.codes, s.scale, s.mn
    if need > codes.shape[2] - ref.PAD:
        start = (skip // lay.drop_quantum) * lay.drop_quantum if lay.window else 0
        codes, scale, mn = ops.grow(codes, scale, mn, nq, lay.capacity(need - start), lay.group, lay.axis, start)
        nq, skip = nq - start, skip - start
    res = ops.compact_(codes, scale, mn, s.res, nq, lay.method, lay.bits, lay.group, lay.axis, lay.residual,
                      lay.fmt)
    return KVState(codes, scale, mn, res, lay, outer_size=s.shape,
                   skip=_carrier(codes, skip) if lay.window else None)


def kv_window(s: KVState, start: int) -> KVState:
    """`s[:, :, start:]` of a sliding-window layer's state (`start` < 0: keep the newest -start tokens):
    the oldest tokens are dropped, from the packed rows first (counted in S, see the module doc), then
    from the residual. Nothing is requantized: the tokens kept are those of `s`, bit for bit."""
    B, H, T, D = s.shape
    drop = torch.sym_max(T + start, 0) if start < 0 else torch.sym_min(start, T)
    from_packed = torch.sym_min(drop, s.n_quantized - s.n_skip)
    from_res = drop - from_packed
    # no branch on from_res > 0 (a guard, so another graph): the residual is copied, a few rows
    res = torch.cat([s.res[:, :, :ref.PAD], s.res[:, :, ref.PAD + from_res:]], dim=2)
    return KVState(s.codes, s.scale, s.mn, res, s.kv_layout, outer_size=(B, H, T - drop, D),
                   skip=_carrier(s.codes, s.n_skip + from_packed))


def kv_store(full: Tensor, layout: tuple) -> KVState:
    """A state from a full-precision cache tensor [B, H, T, D] (prefill), compacted.
    `layout` is the fields of a Layout (FX code generation needs literals)."""
    layout = Layout(*layout)
    B, H, _, D = full.shape
    return kv_compact(KVState(*_empty_packed(full, layout, B, H, D), ref.pad(full), layout))


def kv_static_empty(buffer: Tensor, layout: tuple) -> KVState:
    """A fixed-size state in place of a zero-filled cache buffer [B, H, M, D] (StaticCache's): M packed
    rows of zeros (which dequantize to 0, as the buffer held) and no residual."""
    layout = Layout(*layout)
    B, H, M, D = buffer.shape
    cw, sw, mw = layout.widths(D)
    return KVState(buffer.new_zeros((B, H, ref.PAD + M, cw), dtype=torch.uint8),
                   buffer.new_zeros((B, H, ref.PAD + M, sw)), buffer.new_zeros((B, H, ref.PAD + M, mw)),
                   buffer.new_zeros((B, H, ref.PAD, D)), layout)


def kv_static_write(s: KVState, dim: int, pos: Tensor, new: Tensor) -> KVState:
    """`s.index_copy_(dim, pos, new)` on a fixed-size state: the tokens are quantized as they are
    written (every token on its own: Layout.static needs per-token groups, methods.static_reason)."""
    lay = s.kv_layout
    ops.write_(s.codes, s.scale, s.mn, new, pos, lay.bits, lay.group, lay.fmt)
    return s


def kv_append(past: KVState, new: Tensor) -> KVState:
    """Append new tokens [B, H, L, D] to the full-precision residual (lossless, no compaction)."""
    B, H, T, D = past.shape
    return KVState(past.codes, past.scale, past.mn, ops.append(past.res, new), past.kv_layout,
                   outer_size=(B, H, T + new.shape[2], D), skip=past.skip)


def _meta(s: KVState) -> list:
    """The ops' meta: (bits, group, axis, nq, fmt), and S for a sliding-window layer (ops.py)."""
    lay = s.kv_layout
    return [lay.bits, lay.group, lay.axis, s.n_quantized, lay.fmt] + ([s.n_skip] if lay.window else [])


def kv_sdpa(query: Tensor, key: KVState, value: KVState, attn_mask: Optional[Tensor] = None,
            dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
            enable_gqa: bool = False) -> Tensor:
    """Drop-in for F.scaled_dot_product_attention over states (GQA whatever enable_gqa says)."""
    return ops.attention(
        query, key.codes, key.scale, key.mn, key.res, value.codes, value.scale, value.mn, value.res,
        _meta(key), _meta(value), attn_mask, dropout_p, is_causal, scale, enable_gqa,
    )


def kv_qk(query: Tensor, key: KVState) -> Tensor:
    """Drop-in for torch.matmul(query, repeat_kv(key).transpose(-1, -2))."""
    return ops.qk(query, key.codes, key.scale, key.mn, key.res, _meta(key))


def kv_pv(probs: Tensor, value: KVState) -> Tensor:
    """Drop-in for torch.matmul(probs, repeat_kv(value))."""
    return ops.pv(probs, value.codes, value.scale, value.mn, value.res, _meta(value))


def nbytes(t: Tensor) -> int:
    """Bytes a cache tensor holds: the packed size of a state, numel * itemsize otherwise."""
    if isinstance(t, KVState):
        return t.packed_nbytes()
    return t.numel() * t.element_size()
