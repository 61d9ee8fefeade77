"""The quantized KV state: a traceable wrapper tensor subclass.

Its logical shape and dtype are those of the full-precision cache [B, H, T, D], so model code that
reads `keys.shape[-2]` keeps working. Its inner tensors are those of a `Packed` (layout.py: codes,
scale, mn, res, each with PAD leading rows), its flatten context its `Layout`; `packed()` hands both,
with the counts, to the ops.

Nq is not stored: it is T - Nr, from the state's logical shape. Tokens leaving the residual are
written into the spare rows in place (kvquant::compact_); when there is no room the storage grows
by a few percent (Layout.capacity), so a step does not copy the packed cache and the bytes held stay
within a few percent of the packed size. A compiled step grows its states on the way out, eagerly,
where the next step would not fit (_with_room, from __tensor_unflatten__): growing inside the graph
would be a branch on sizes, a whole-model graph for each outcome. A state is an append-only buffer:
the state a step read stays valid (its Nq rows are never rewritten), but two continuations of one
state would write the same spare rows, so branch from a `clone()`.

A sliding-window layer's state (Layout.window) also carries `skip`, an empty [PAD + S, 0] tensor whose
size S counts the oldest packed rows the window has dropped. They are not freed at once (that would
rewrite storage a previous step may still read): every read skips them, and the storage leaves them
behind when it is next reallocated (kv_compact), so the bytes held stay those of the window plus the
few percent of spare rows. T = Nq - S + Nr. A size rather than a number, so that Dynamo sees it as a
dynamic size like the others (Packed.skip).

A static state (Layout.static: transformers' StaticCache) is a fixed-size buffer: M packed rows, no
residual, written in place at given positions (kv_static_write); its sizes are not marked dynamic.
A static state with a full-precision window (Layout.overlay: kivi, or residual_length > 0) also keeps R
full-precision rows in `res` and their token positions in `wpos` ([B, PAD + R] int64, -1 where a row
holds nothing): a position a window row holds is read from it, every other from the packed rows. The
token counts are data there (the positions written), not sizes, so a decode step is one graph whatever
it flushes; see kv_static_write.

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

import warnings
from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import ops
from .kernels import reference as ref
from .errors import KVQuantWarning
from .layout import FULL, PAD, Layout, Packed, index_dims

aten = torch.ops.aten


def _mark_dynamic(t: Tensor, dims: tuple) -> None:
    """torch._dynamo.maybe_mark_dynamic(t, d) for each of dims, on t alone: the marks that function records,
    set at once. On a traceable subclass (KVState) it also repeats itself on every inner tensor of t's rank, by
    t's dim numbers (not the inner tensors' own): ~4.5 us a dim, and every step rebuilds 2 states per layer from
    a compiled graph's outputs (~1.2 ms of a SmolLM2 decode step on a 2-core CPU, with the rest of
    __tensor_unflatten__). tests/test_state.py checks the marks against maybe_mark_dynamic's."""
    t._dynamo_weak_dynamic_indices = set(dims)
    t._has_dynamo_dim_marking = True


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
                skip: Optional[Tensor] = None, wpos: Optional[Tensor] = None) -> "KVState":
        if outer_size is None:  # no spare capacity
            B, H, Nr, D = res.shape
            dropped = skip.shape[0] - PAD if skip is not None else 0
            outer_size = layout.logical_shape(B, H, codes.shape[2] - dropped + Nr - 2 * PAD, D)
        return Tensor._make_wrapper_subclass(
            cls, outer_size, strides=outer_stride, dtype=res.dtype, device=res.device, requires_grad=False
        )

    def __init__(self, codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, layout: Layout,
                 outer_size: Optional[torch.Size] = None, outer_stride: Optional[tuple] = None,
                 skip: Optional[Tensor] = None, wpos: Optional[Tensor] = None) -> None:
        if layout.window and skip is None:
            skip = codes.new_empty((PAD, 0))
        if not layout.window and skip is not None:
            raise ValueError("kvcompile: only a sliding-window layout has dropped rows (skip)")
        self.codes, self.scale, self.mn, self.res, self.kv_layout = codes, scale, mn, res, layout
        if layout.overlay != (wpos is not None):
            raise ValueError("kvcompile: a static state has window positions (wpos) exactly when its layout keeps a "
                             "full-precision window (Layout.overlay)")
        self.skip, self.wpos = skip, wpos
        if layout.static:  # fixed sizes: decode compiles once
            return
        # Token counts grow every step, and batch sizes vary between generations: tell Dynamo up front, so
        # the first decode graph is already dynamic in them instead of recompiling once per inner size as
        # each first changes (sizes 0 and 1 stay specialized: the pad rows keep the token counts >= 2).
        for t in (codes, scale, mn, res):
            _mark_dynamic(t, (0, 2))
        _mark_dynamic(self, layout.dynamic_dims)
        if skip is not None:
            _mark_dynamic(skip, (0,))

    def __tensor_flatten__(self):
        return _NAMES + (("skip",) if self.kv_layout.window else ()) + (("wpos",) if self.kv_layout.overlay else ()), \
            self.kv_layout

    @staticmethod
    def __tensor_unflatten__(inner: dict, layout: Layout, outer_size, outer_stride) -> "KVState":
        s = KVState(inner["codes"], inner["scale"], inner["mn"], inner["res"], layout, outer_size, outer_stride,
                    inner.get("skip"), inner.get("wpos"))
        # a compiled graph's output state is rebuilt here, eagerly, after every call: the place to make room
        # for the next step (tracing rebuilds states too, of fake or functional tensors, or under a mode such
        # as make_fx's: left as they are)
        real = type(s.codes) is Tensor and type(s.res) is Tensor and torch._C._len_torch_dispatch_stack() == 0
        return _with_room(s) if real and not torch.compiler.is_compiling() else s

    def __repr__(self) -> str:  # never dequantizes
        lay = self.kv_layout
        if lay.overlay:
            return (f"KVState(method={lay.method!r}, role={lay.role!r}, bits={lay.bits}, shape={tuple(self.shape)}, "
                    f"dtype={self.dtype}, static buffer, capacity={self.codes.shape[2] - PAD}, "
                    f"full_precision_window={self.res.shape[2] - PAD}, nbytes={self.packed_nbytes()})")
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
    def canonical_shape(self) -> tuple:
        """(B, H, T, D): the cache as it is stored, whatever the model's layout (self.shape) is."""
        B, H, _, D = self.res.shape
        return B, H, self.shape[self.kv_layout.token_dim], D

    @property
    def n_quantized(self):
        """Nq, the rows of packed storage in use, S dropped ones included (a SymInt under tracing)."""
        return self.canonical_shape[2] + self.n_skip - (self.res.shape[2] - PAD)

    def packed_nbytes(self) -> int:
        """Bytes the state really holds: codes + scales + minimums (spare rows included) + residual (+ a static
        window's positions)."""
        return sum(t.numel() * t.element_size() for t in _inner(self) if t is not self.skip)

    def packed(self) -> Packed:
        """The inner tensors, layout and counts, as the ops take them (a static state with a window: all its
        packed rows, then its window rows, whatever positions they hold: see _overlay_cols)."""
        if self.kv_layout.overlay:
            return Packed(self.codes, self.scale, self.mn, self.res, self.kv_layout, self.codes.shape[2] - PAD, 0)
        return Packed(self.codes, self.scale, self.mn, self.res, self.kv_layout, self.n_quantized, self.n_skip)

    def dequantize(self) -> Tensor:
        """The full-precision cache, in the model's layout (a new tensor)."""
        full = _overlay_full(self) if self.kv_layout.overlay else ops.dequantize(self.packed())
        return self.kv_layout.from_canonical(full).contiguous()

    # -- uncompiled code (transformers' cache methods, a user's inspection) ---------------------------
    # Under Dynamo these defer to torch (the pass rewrites what the graph does with a state); run eagerly,
    # the cache operations keep the state packed, and everything else reads a dequantized copy that
    # refuses writes (they could not reach the packed storage).

    def __getitem__(self, idx: Any) -> Tensor:
        if _tracing(self):
            return super().__getitem__(idx)
        kept = _eager_index(self, idx)
        return kept if kept is not None else ReadOnly(self.dequantize()[idx])

    def __setitem__(self, idx: Any, value: Any) -> None:
        if _tracing(self):
            return super().__setitem__(idx, value)
        if self.kv_layout.static and isinstance(value, Tensor) and _static_index(self, idx):
            kv_static_setitem(self, idx, value)
            return
        raise RuntimeError(
            f"kvcompile: cannot write into a quantized KV state with state[{idx!r}] = ...: its tokens are packed "
            f"codes (a {self.kv_layout.method} cache); replace the cache tensor instead (e.g. layer.keys = "
            f"new_tensor), or start a new cache")

    def numpy(self, *, force: bool = False) -> Any:
        """The dequantized cache as a NumPy array."""
        return self.dequantize().numpy(force=force)

    def tolist(self) -> Any:
        """The dequantized cache as nested lists."""
        return self.dequantize().tolist()

    def _map(self, fn) -> "KVState":
        out = [fn(t) for t in (self.codes, self.scale, self.mn, self.res)]
        skip = _carrier(out[0], self.n_skip) if self.skip is not None else None
        B, H, T, D = self.canonical_shape
        return KVState(*out, self.kv_layout, outer_size=self.kv_layout.logical_shape(out[3].shape[0], H, T, D),
                       skip=skip, wpos=fn(self.wpos) if self.wpos is not None else None)

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
        states = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, KVState)]
        eager = not _tracing(states[0])
        if eager and func in _MODEL_OPS:
            warn_eager(func)
        args, kwargs = pytree.tree_map_only(KVState, KVState.dequantize, (args, kwargs))
        out = func(*args, **kwargs)
        if eager and _is_view(func):  # a view of a temporary copy: writes through it would be lost
            out = pytree.tree_map_only(Tensor, ReadOnly, out)
        return out


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
    if dim % s.dim() != 0 or s.kv_layout.groups[0] != "b":  # beam reorder selects along the batch
        return NotImplemented
    return s._map(lambda t: t.index_select(0, index.to(t.device)))


def _copy_(dst: KVState, src: Any, non_blocking: bool = False) -> Any:
    """State-to-state copy of the same layout and sizes (AOTAutograd writes mutated inputs back so), or
    a fixed-size state rewritten whole from a full-precision tensor (StaticSlidingWindowLayer rolls its
    buffer so): every token quantized again, as written."""
    if isinstance(dst, KVState) and dst.kv_layout.static and isinstance(src, Tensor) \
            and not isinstance(src, KVState) and src.shape == dst.shape:
        kv_static_copy(dst, src)
        return dst
    if not (isinstance(dst, KVState) and isinstance(src, KVState) and dst.kv_layout == src.kv_layout
            and all(a.shape == b.shape for a, b in zip(_inner(dst), _inner(src)))):
        return NotImplemented
    for a, b in zip(_inner(dst), _inner(src)):
        a.copy_(b, non_blocking=non_blocking)
    return dst


def _index_copy_(s: KVState, dim: int, index: Tensor, source: Tensor) -> Any:
    """A fixed-size state written in place (StaticCache's update; Dynamo runs it on fake states while
    tracing, before the pass rewrites it into kv_static_write)."""
    if not (s.kv_layout.static and dim % s.dim() == s.kv_layout.token_dim and not isinstance(source, KVState)):
        return NotImplemented
    kv_static_write(s, dim, index, source)
    return s


def _scatter_(s: KVState, dim: int, index: Tensor, src: Tensor) -> Any:
    """`s.scatter_(d, pos.view(..).expand_as(new), new)` on a fixed-size state along its tokens dim: the
    positions are the index's along that dim (the pass matched it so: match._broadcast_positions; run
    uncompiled, an index that is not them broadcast is refused)."""
    lay = s.kv_layout
    d = dim % s.dim()
    if not lay.static or d != lay.token_dim or isinstance(src, KVState) or index.shape != src.shape:
        return NotImplemented
    pos = index[tuple(slice(None) if i == d else slice(0, 1) for i in range(index.dim()))]
    if not _tracing(s) and not torch.equal(pos.expand_as(index), index):
        return NotImplemented
    kv_static_write(s, d, pos.reshape(-1), src)
    return s


def _zero_(s: KVState) -> Any:
    """`buf.zero_()` on a fixed-size state (a decoder resetting its cache buffers): every token 0 (zero
    codes, scales and minimums dequantize to 0 in every format, as kv_static_empty's do)."""
    if not s.kv_layout.static:
        return NotImplemented
    for t in _inner(s):
        t.fill_(-1) if t is s.wpos else t.zero_()  # (a window row at position -1 holds nothing)
    return s


def _index_put_(s: KVState, indices: list, values: Tensor, accumulate: bool = False) -> Any:
    """`s[:, :, pos] = new` on a fixed-size state (positions along the tokens dim, every other dim whole)."""
    lay = s.kv_layout
    hit = [d for d, i in enumerate(indices) if i is not None]
    if not lay.static or accumulate or hit != [lay.token_dim] or isinstance(values, KVState) \
            or values.dim() > s.dim():
        return NotImplemented
    pos = indices[lay.token_dim]
    shape = list(s.shape)
    shape[lay.token_dim] = pos.numel()
    kv_static_write(s, lay.token_dim, pos, values.expand(shape))  # (torch drops the value's leading 1s)
    return s


def _cat(tensors: list, dim: int = 0) -> Any:
    """`torch.cat([state, new], dim=2)` run uncompiled (a frame Dynamo ran eagerly): the new tokens are
    appended, so the cache stays quantized. The quantization the compiled graph would have done after
    the previous step is done first, so attention sees what it would have under compile."""
    if len(tensors) != 2 or not isinstance(tensors[0], KVState) or isinstance(tensors[1], KVState) \
            or dim % tensors[0].dim() != tensors[0].kv_layout.token_dim or _tracing(tensors[0]) \
            or tensors[0].kv_layout.static:
        return NotImplemented
    past, new = tensors
    warn_eager(aten.cat.default)
    return kv_append(kv_compact(past), new)


def _repeat_interleave(s: KVState, repeats: Any, dim: Optional[int] = None, *, output_size: Any = None) -> Any:
    if dim is None or dim % s.dim() != 0 or s.kv_layout.groups[0] != "b" or not isinstance(repeats, int):
        return NotImplemented  # generate()'s batch expansion
    return s._map(lambda t: t.repeat_interleave(repeats, dim=0))


def _tracing(s: KVState) -> bool:
    """Whether `s` is being traced (Dynamo or AOTAutograd) rather than run."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(s.codes)


def _eager_index(s: KVState, idx: Any) -> Optional[KVState]:
    """The cache operations transformers runs on a cache tensor, kept packed: `x[..., :n, :]` (crop),
    `x[:, :, start:]` (a sliding window's restriction) and `x[indices, ...]` (batch selection).
    None for any other index (read from a dequantized copy)."""
    dims = index_dims(idx, s.dim())
    if dims is None:
        return None
    first, tdim = dims[0], s.kv_layout.token_dim
    if isinstance(first, Tensor) and first.dim() == 1 and all(d == FULL for d in dims[1:]):
        index = first.nonzero().squeeze(1) if first.dtype == torch.bool else first
        out = _index_select(s, 0, index) if not index.dtype.is_floating_point else NotImplemented
        return None if out is NotImplemented else out
    cut = dims[tdim]
    if s.kv_layout.overlay:  # (a static buffer with a window: read from a dequantized copy)
        return None
    if not (isinstance(cut, slice) and cut.step in (None, 1)
            and all(d == FULL for i, d in enumerate(dims) if i != tdim)):
        return None
    T = s.shape[tdim]
    start, stop, _ = cut.indices(T)
    if start == 0:
        return kv_crop(s, stop)
    if stop == T and s.kv_layout.window:
        return kv_window(s, start)
    return None


def _static_index(s: KVState, idx: Any) -> bool:
    """Whether `s[idx] = x` is a write kv_static_setitem takes: positions (a tensor, an int or a slice of
    ints) in the tokens dim, a batch prefix in a leading batch dim, every other dim whole."""
    dims = index_dims(idx, s.dim())
    if dims is None:
        return False
    lay = s.kv_layout
    for d, i in enumerate(dims):
        if d == lay.token_dim:
            if isinstance(i, slice) and (i.stop is None or i.step not in (None, 1)):
                return False
            if not isinstance(i, (slice, int, Tensor)):
                return False
        elif i != FULL and not (d == 0 and lay.groups[0] == "b" and isinstance(i, slice) and i.start in (None, 0)
                                 and i.step in (None, 1)):
            return False
    return True


def _is_view(func) -> bool:
    """Whether an aten op returns a view of an input (its schema's return aliases an argument)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


# ops that mean model code (attention, a cache update) runs on the cache outside compiled code
_MODEL_OPS = {aten.cat.default, aten.bmm.default, aten.mm.default, aten.matmul.default,
              aten._scaled_dot_product_flash_attention_for_cpu.default, aten.scaled_dot_product_attention.default,
              aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default}


def warn_eager(func) -> None:
    """A quantized cache used by uncompiled model code: say so (once per cause), naming the likely cause."""
    from torch._dynamo.utils import counters

    hit = any("recompile limit" in str(k) for k in counters["unimplemented"])
    cause = ("Dynamo's recompile limit was reached for the model's frame (torch._dynamo.config.recompile_limit; "
             "TORCH_LOGS=recompiles shows why it recompiled)" if hit else
             "the model's frame runs uncompiled: a recompile limit, torch._dynamo.disable, a model called outside "
             "the torch.compile'd module, or a frame Dynamo skipped")
    warnings.warn(
        f"kvquant: the quantized KV cache is used by uncompiled code ({func}); it stays quantized and results are "
        f"correct, but attention dequantizes the whole cache every step (slow). Likely cause: {cause}.",
        KVQuantWarning, stacklevel=3)


class ReadOnly(Tensor):
    """A dequantized copy of (part of) a KVState, as uncompiled code reading the cache gets it: every read
    works, every write raises (it would not reach the packed state)."""

    value: Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, value: Tensor) -> "ReadOnly":
        if isinstance(value, ReadOnly):
            return value
        return Tensor._make_wrapper_subclass(cls, value.shape, strides=value.stride(), dtype=value.dtype,
                                             device=value.device, requires_grad=False)

    def __init__(self, value: Tensor) -> None:
        self.value = value.value if isinstance(value, ReadOnly) else value

    def __tensor_flatten__(self):
        return ("value",), None

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: Any, outer_size: Any, outer_stride: Any) -> "ReadOnly":
        return ReadOnly(inner["value"])

    def __repr__(self) -> str:
        return f"ReadOnly({self.value!r})"

    def __setitem__(self, idx: Any, value: Any) -> None:
        _refuse_write("__setitem__")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        for arg, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, ReadOnly):
                _refuse_write(func)
        args, kwargs = pytree.tree_map_only(ReadOnly, lambda t: t.value, (args, kwargs))
        out = func(*args, **kwargs)
        return pytree.tree_map_only(Tensor, ReadOnly, out) if _is_view(func) else out


def _refuse_write(what: Any) -> None:
    raise RuntimeError(
        f"kvcompile: {what} writes into a dequantized copy of a quantized KV state, which would be lost (the state "
        f"holds packed codes): .clone() it first to get a tensor of your own, or replace the cache tensor")


def _inner(s: KVState) -> tuple:
    return (s.codes, s.scale, s.mn, s.res) + ((s.skip,) if s.skip is not None else ()) + \
        ((s.wpos,) if s.wpos is not None else ())


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
    aten.index_put_.default: _index_put_,
    aten.scatter_.src: _scatter_,
    aten.zero_.default: _zero_,
    aten.cat.default: _cat,
    aten.repeat_interleave.self_int: _repeat_interleave,
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
    packed storage (grown first if it has no room, leaving a sliding window's dropped rows behind: a
    branch on sizes, so a graph of its own; a compiled decode step does not take it, see _with_room)."""
    lay = s.kv_layout
    if not lay.quantized:
        return s
    p = s.packed()
    need = p.nq + lay.n_quantize(p.res.shape[2] - PAD)
    if need > p.codes.shape[2] - PAD:
        p = _grown(p, need)
    res = ops.compact_(p)
    return KVState(p.codes, p.scale, p.mn, res, lay, outer_size=s.shape,
                   skip=_carrier(p.codes, p.skip) if lay.window else None)


def _grown(p: Packed, need) -> Packed:
    """p in new packed storage with room for `need` rows (Layout.capacity), less the rows a sliding window
    dropped, which it leaves behind."""
    lay = p.layout
    start = (p.skip // lay.drop_quantum) * lay.drop_quantum if lay.window else 0
    codes, scale, mn = ops.grow(p, lay.capacity(need - start), start)
    return p._replace(codes=codes, scale=scale, mn=mn, nq=p.nq - start, skip=p.skip - start)


def _with_room(s: KVState) -> KVState:
    """s, grown (eagerly) where the next decode step's compaction would not fit its packed storage.

    kv_compact grows a state that has no room, but that is a branch on sizes inside the model's graph:
    Dynamo guards each outcome, and a step that grows keys, values or both would recompile the whole model
    (up to four graphs of about a minute each on a 2-core CPU, stalling a generation mid-way; kivi's keys
    and values grow at different steps). Run on every state a compiled step returns, this keeps the
    in-graph branch on its no-growth side for one-token steps: the same copy, made between steps."""
    lay = s.kv_layout
    if not lay.quantized or lay.static:
        return s
    p = s.packed()
    need = p.nq + lay.n_quantize(p.res.shape[2] - PAD + 1)
    if need <= p.codes.shape[2] - PAD:
        return s
    p = _grown(p, need)
    return KVState(p.codes, p.scale, p.mn, p.res, lay, outer_size=s.shape, outer_stride=s.stride(),
                   skip=_carrier(p.codes, p.skip) if lay.window else None)


def kv_window(s: KVState, start: int) -> KVState:
    """`s[:, :, start:]` of a sliding-window layer's state (`start` < 0: keep the newest -start tokens):
    the oldest tokens are dropped, from the packed rows first (counted in S, see the module doc), then
    from the residual. Nothing is requantized: the tokens kept are those of `s`, bit for bit."""
    B, H, T, D = s.canonical_shape
    drop = torch.sym_max(T + start, 0) if start < 0 else torch.sym_min(start, T)
    from_packed = torch.sym_min(drop, s.n_quantized - s.n_skip)
    from_res = drop - from_packed
    # no branch on from_res > 0 (a guard, so another graph): the residual is copied, a few rows
    res = ref.drop(s.res, from_res)
    return KVState(s.codes, s.scale, s.mn, res, s.kv_layout, outer_size=s.kv_layout.logical_shape(B, H, T - drop, D),
                   skip=_carrier(s.codes, s.n_skip + from_packed))


def kv_crop(s: KVState, n: int) -> KVState:
    """`s[:, :, :n]` run eagerly (transformers' crop, assisted decoding): the first n tokens, in new storage
    (the old state stays valid). A kivi key group the cut splits cannot stay packed: its kept tokens move
    to the full-precision window with the values they had (dequantized), and are quantized again with
    their new group when it next flushes (fakequant's crop does the same)."""
    B, H, T, D = s.canonical_shape
    n = max(0, min(int(n), T))
    outer = s.kv_layout.logical_shape(B, H, n, D)
    lay, p = s.kv_layout, s.packed()
    held = p.nq - p.skip
    if n >= held:
        res = p.res[:, :, :PAD + n - held]
        return KVState(*(t.clone() for t in (p.codes, p.scale, p.mn, res)), lay, outer_size=outer,
                       skip=_carrier(p.codes, p.skip) if lay.window else None)
    keep = p.skip + n  # packed rows, the dropped ones included
    q = lay.drop_quantum
    rows = keep // q * q
    skip = min(p.skip, rows)
    whole = -(-keep // q) * q  # the groups holding rows [rows, keep), dequantized whole, then cut
    moved = ref.full(p._replace(nq=whole, skip=max(p.skip, rows), res=p.res[:, :, :PAD]))[:, :, :keep - max(p.skip, rows)]
    codes, scale, mn = (t.clone() for t in (p.codes, p.scale, p.mn))  # rows after `rows` are spare now
    return KVState(codes, scale, mn, ref.pad(moved), lay, outer_size=outer,
                   skip=_carrier(codes, skip) if lay.window else None)


def kv_store(full: Tensor, layout: Layout) -> KVState:
    """A state from a full-precision cache tensor in the model's layout (prefill), compacted."""
    full = layout.to_canonical(full)
    B, H, _, D = full.shape
    return kv_compact(KVState(*_empty_packed(full, layout, B, H, D), ref.pad(full), layout))


def kv_static_empty(buffer: Tensor, layout: Layout) -> KVState:
    """A fixed-size state in place of a zero-filled cache buffer (StaticCache's; the model's layout): M
    packed rows of zeros (which dequantize to 0, as the buffer held) and no residual; with a window
    (Layout.overlay), room for M tokens in whole groups and R empty full-precision rows."""
    B, H, M, D = layout.to_canonical(buffer).shape
    cw, sw, mw = layout.widths(D)
    q = layout.drop_quantum
    C = -(-M // q) * q
    rows = PAD + layout.scale_rows(C)
    codes = buffer.new_zeros((B, H, PAD + C, cw), dtype=torch.uint8)
    scale, mn = buffer.new_zeros((B, H, rows, sw)), buffer.new_zeros((B, H, rows, mw))
    if not layout.overlay:
        return KVState(codes, scale, mn, buffer.new_zeros((B, H, PAD, D)), layout)
    return KVState(codes, scale, mn, buffer.new_zeros((B, H, PAD + layout.residual, D)), layout,
                   outer_size=layout.logical_shape(B, H, M, D),
                   wpos=torch.full((B, PAD + layout.residual), -1, dtype=torch.int64, device=buffer.device))


def kv_static_from(buffer: Tensor, layout: Layout) -> KVState:
    """A fixed-size state holding a full-precision buffer's contents (a buffer swapped for a state:
    buffers.py), as if they had been written so: every token quantized on its own, or, with a window, the
    tokens up to the last nonzero one written at once (the method's policy then says which stay full
    precision)."""
    s = kv_static_empty(buffer, layout)
    full = layout.to_canonical(buffer)
    M = s.canonical_shape[2]
    if not layout.overlay:
        ops.write_(s.packed(), full, torch.arange(M, device=buffer.device))
        return s
    used = full.ne(0).flatten(3).any(-1).any(1).any(0).nonzero()  # token rows any batch row or head wrote
    if used.numel():
        n = int(used.max()) + 1
        _overlay_write(s, torch.arange(n, device=buffer.device), full[:, :, :n])
    return s


def kv_static_write(s: KVState, dim: int, pos: Tensor, new: Tensor) -> KVState:
    """`s.index_copy_(dim, pos, new)` on a fixed-size state (dim: the model's tokens dim; new in the model's
    layout), in place: the tokens are quantized as they are written (every token on its own), or, with a
    window (Layout.overlay), join it (_overlay_write). Returns what attention reads this step: `s`, or
    with a window a view of it whose window rows also hold this step's tokens and those the write moved
    to the packed rows (attention reads a step's cache before that step's quantization)."""
    pos = pos.reshape(-1)  # (a scatter_'s positions keep their unit dims)
    if s.kv_layout.overlay:
        return _overlay_write(s, pos, s.kv_layout.to_canonical(new))
    ops.write_(s.packed(), s.kv_layout.to_canonical(new), pos)
    return s


def kv_static_copy(s: KVState, src: Tensor) -> KVState:
    """`s.copy_(src)` on a fixed-size state from a full-precision tensor of its shape (StaticSlidingWindowLayer
    rolls its buffer so): every token written again (kv_static_write), all at once."""
    return kv_static_write(s, s.kv_layout.token_dim, torch.arange(s.canonical_shape[2], device=src.device), src)


def kv_static_setitem(s: KVState, idx: Any, new: Tensor) -> KVState:
    """`s[idx] = new` on a fixed-size state, idx a token index (a tensor of positions, an int, a slice) in the
    tokens dim and whole dims elsewhere, but for a leading batch prefix (`cache[:bsz, start:stop] = x`, the
    reference Llama's): the tokens are quantized as written, into the first bsz rows. Returns what
    attention reads (kv_static_write)."""
    lay = s.kv_layout
    dims = index_dims(idx, s.dim())
    pos = dims[lay.token_dim]
    if isinstance(pos, slice):
        pos = torch.arange(pos.start or 0, pos.stop, device=new.device)
    elif not isinstance(pos, Tensor):  # one position: `new` has no tokens dim
        new = new.unsqueeze(lay.token_dim) if new.dim() == s.dim() - 1 else new
        pos = torch.arange(pos, pos + 1, device=new.device)
    pos = pos.to(new.device).reshape(-1)
    new = lay.to_canonical(new)
    if lay.overlay:
        return _overlay_write(s, pos, new)
    p = s.packed()
    batch = dims[0] if lay.groups[0] == "b" else FULL
    if batch != FULL:
        rows = slice(batch.start, batch.stop)
        p = p._replace(codes=p.codes[rows], scale=p.scale[rows], mn=p.mn[rows])
    ops.write_(p, new, pos)
    return s


def kv_prefix(s: KVState, batch: Any = None, tokens: Any = None) -> KVState:
    """`s[:batch, ..., :tokens, ...]` of a fixed-size state (the reference Llama's `cache_k[:bsz, :pos]`), in
    place: the first `batch` rows' inner tensors, and the first `tokens` packed rows in use (the rows after
    them are spare to the ops). None: the whole dim."""
    B, H, M, D = s.canonical_shape
    b = B if batch is None else torch.sym_min(batch, B)
    t = M if tokens is None else torch.sym_min(tokens, M)
    inner = [x[:b] if batch is not None else x for x in (s.codes, s.scale, s.mn, s.res)]
    wpos = None if s.wpos is None else s.wpos[:b] if batch is not None else s.wpos
    return KVState(*inner, s.kv_layout, outer_size=s.kv_layout.logical_shape(b, H, t, D), wpos=wpos)


# -- a static state with a full-precision window (Layout.overlay) ---------------------------------------
# Its `res` rows hold the tokens the method keeps in full precision, each at the token position `wpos`
# says; reads take those positions from them and every other from the packed rows. A write joins the new
# tokens to the window rows, moves the rows the method quantizes now into the packed rows (kivi's keys in
# whole groups), and keeps the rest, a position p in row p mod R (the window holds at most R consecutive
# positions). No branch depends on the counts: a decode step is one graph whatever it flushes.


def _overlay_write(s: KVState, pos: Tensor, new: Tensor) -> KVState:
    """Write tokens new [b, H, L, D] (b <= B: a batch prefix) at positions pos [L] of a static state with a
    window, in place; returns the view attention reads (kv_static_write). Positions are written as
    appends (StaticCache, a decode loop): a write at p makes the window forget what it held at p and after."""
    lay = s.kv_layout
    B, H, _, D = s.canonical_shape
    b, L = new.shape[0], new.shape[2]
    pos = pos.to(s.wpos.device, torch.int64).reshape(1, L).expand(B, L)
    if b < B:  # the other batch rows get no tokens
        new = torch.cat([new, new.new_zeros((B - b, *new.shape[1:]))])
        pos = torch.where(torch.arange(B, device=pos.device)[:, None] < b, pos, -1)
    ring, wpos = s.res, s.wpos
    W = ring.shape[2] - PAD
    first = torch.where(pos >= 0, pos, torch.iinfo(torch.int64).max).amin(1, keepdim=True)
    rpos = wpos[:, PAD:]
    rpos = torch.where(rpos < first, rpos, -1)
    stage = torch.cat([ring[:, :, PAD:], new.to(ring.dtype)], dim=2)  # [B, H, W + L, D]
    spos = torch.cat([rpos, pos], dim=1)  # [B, W + L]
    nq = lay.n_quantize(spos.amax(1) + 1)  # [B]: tokens [0, nq) are packed after this write
    _flush(s, stage, spos, nq)
    keep = spos >= nq[:, None]
    slot = torch.where(keep, spos % W, -1) + PAD  # (-1: a pad row, never read)
    ring.scatter_(2, slot[:, None, :, None].expand(B, H, W + L, D), stage)
    wpos.copy_(torch.full_like(wpos, -1).scatter_(1, slot, torch.where(keep, spos, -1)))
    return KVState(s.codes, s.scale, s.mn, ref.pad(stage), lay, outer_size=s.shape,
                   wpos=torch.cat([spos.new_full((B, PAD), -1), spos], dim=1))


def _flush(s: KVState, stage: Tensor, spos: Tensor, nq: Tensor) -> None:
    """Quantize the window rows stage [B, H, N, D] at positions spos [B, N] that the packed rows take now
    (spos < nq), into them, in place: per-token formats row by row; kivi's keys in whole groups of G
    consecutive positions (gathered by position first: a group leaves the window whole, as on a growing
    cache). Rows that do not leave are written to a pad row (never read)."""
    lay = s.kv_layout
    B, H, N, D = stage.shape
    leave = (spos >= 0) & (spos < nq[:, None])
    q = lay.drop_quantum
    if q == 1:
        tok = grp = torch.where(leave, spos, -1) + PAD
        codes, scale, mn = ops.quantize(stage, lay)
    else:
        n = (N // q + 2) * q  # whole groups covering N consecutive positions from a group's start
        lo = torch.where(leave, spos, s.codes.shape[2]).amin(1) // q * q  # [B]
        rel = torch.where(leave, spos - lo[:, None], n)
        rel = torch.where(rel < n, rel, n)
        dense = stage.new_zeros((B, H, n + 1, D)).scatter_(2, rel[:, None, :, None].expand(B, H, N, D), stage)
        whole = torch.zeros((B, n + 1), device=stage.device).scatter_(1, rel, 1.0)[:, :n].view(B, n // q, q)
        whole = whole.bool().all(-1)  # [B, groups]: every position of the group leaves now
        codes, scale, mn = ops.quantize(dense[:, :, :n], lay)
        start = lo[:, None] + torch.arange(0, n, q, device=stage.device)
        grp = torch.where(whole, start // q, -1) + PAD
        tok = torch.where(whole.repeat_interleave(q, 1), lo[:, None] + torch.arange(n, device=stage.device), -1) + PAD
    for dst, src, idx in ((s.codes, codes, tok), (s.scale, scale, grp), (s.mn, mn, grp)):
        dst.scatter_(2, idx[:, None, :, None].expand(*src.shape), src.to(dst.dtype))


def _overlay_cols(s: KVState) -> Tuple[int, Tensor]:
    """(C, cols): the packed rows of a static state with a window, and the position each window row serves
    ([B, R]; C, a spare column, where a row holds nothing). The ops read the C packed rows, then the window
    rows (KVState.packed); a read moves the window's columns to their positions."""
    C = s.codes.shape[2] - PAD
    wp = s.wpos[:, PAD:]
    return C, torch.where(wp >= 0, wp, C)


def _overlay_full(s: KVState) -> Tensor:
    """The dequantized cache [B, H, M, D] of a static state with a window."""
    B, H, M, D = s.canonical_shape
    C, cols = _overlay_cols(s)
    p = s.packed()
    x = ops.dequantize(p._replace(res=p.res[:, :, :PAD]))
    x = torch.cat([x, x.new_zeros((B, H, 1, D))], dim=2)
    return x.scatter(2, cols[:, None, :, None].expand(B, H, -1, D), ref.unpad(s.res).to(x.dtype))[:, :, :M]


def _scores(x: Tensor, s: KVState) -> Tensor:
    """x [B, Hq, L, D] @ K^T over a state -> [B, Hq, L, T] (kvquant::qk; a window's columns moved to their
    positions)."""
    out = ops.qk(x, s.packed())
    if not s.kv_layout.overlay:
        return out
    C, cols = _overlay_cols(s)
    B, Hq, L, _ = out.shape
    at = cols[:, None, None, :].expand(B, Hq, L, cols.shape[1])
    packed = torch.cat([out[..., :C], out.new_zeros((B, Hq, L, 1))], dim=-1)
    return packed.scatter(-1, at, out[..., C:])[..., :s.canonical_shape[2]]


def _weighted(p: Tensor, s: KVState) -> Tensor:
    """probs [B, Hq, L, T] @ V over a state -> [B, Hq, L, Dv] (kvquant::pv; a window's positions' weights
    moved to its rows)."""
    if not s.kv_layout.overlay:
        return ops.pv(p, s.packed())
    C, cols = _overlay_cols(s)
    B, Hq, L, T = p.shape
    at = cols[:, None, None, :].expand(B, Hq, L, cols.shape[1])
    p = torch.cat([p, p.new_zeros((B, Hq, L, C + 1 - T))], dim=-1)
    window = p.gather(-1, at)
    return ops.pv(torch.cat([p.scatter(-1, at, 0.0)[..., :C], window], dim=-1), s.packed())


def _overlay_sdpa(q: Tensor, k: KVState, v: KVState, attn_mask: Optional[Tensor], dropout_p: float,
                  is_causal: bool, scale: Optional[float]) -> Tensor:
    """SDPA over static states with a window, as its two matmuls (kvquant::qk and ::pv over the packed rows
    and the window; keys and values keep different windows, so one fused op over both cannot serve them)."""
    w = _scores(q, k).float() * (q.shape[-1] ** -0.5 if scale is None else scale)
    L, T = w.shape[-2:]
    if is_causal:
        w = w.masked_fill(~torch.ones(L, T, dtype=torch.bool, device=w.device).tril(), float("-inf"))
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else w + attn_mask
    w = torch.softmax(w, dim=-1)
    if dropout_p:
        w = torch.nn.functional.dropout(w, dropout_p)
    return _weighted(w.to(q.dtype), v)


def kv_append(past: KVState, new: Tensor) -> KVState:
    """Append new tokens (in the model's layout) to the full-precision residual (lossless, no compaction)."""
    B, H, T, D = past.canonical_shape
    lay = past.kv_layout
    new = lay.to_canonical(new)
    # plain torch ops, not an op of ours: Inductor writes the copy into the step's own graph (an op cost a
    # dispatch per layer and tensor, ~45 us each on a 2-core CPU)
    res = torch.cat([past.res, new.to(past.res.dtype)], dim=2)
    return KVState(past.codes, past.scale, past.mn, res, lay,
                   outer_size=lay.logical_shape(B, H, T + new.shape[2], D), skip=past.skip)


def kv_sdpa(query: Tensor, key: KVState, value: KVState, attn_mask: Optional[Tensor] = None,
            dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
            enable_gqa: bool = False) -> Tensor:
    """Drop-in for F.scaled_dot_product_attention over states (GQA whatever enable_gqa says)."""
    if key.kv_layout.overlay or value.kv_layout.overlay:
        return _overlay_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
    return ops.attention(query, key.packed(), value.packed(), attn_mask, dropout_p, is_causal, scale, enable_gqa)


def kv_qk(query: Tensor, key: KVState, x_perm: tuple = (), out_perm: tuple = ()) -> Tensor:
    """Drop-in for attention's scores `query @ K^T` over a state: `query` [..., L, D] with its leading dims
    running (batch, heads) as the cache's (GQA: query heads repeating each KV head) -> [..., L, T].
    x_perm / out_perm: an einsum's operand and output orders (match.Read)."""
    return _read(_scores, query, key, x_perm, out_perm)


def kv_pv(probs: Tensor, value: KVState, x_perm: tuple = (), out_perm: tuple = ()) -> Tensor:
    """Drop-in for attention's output `probs @ V` over a state: probs [..., L, T] -> [..., L, Dv]."""
    return _read(_weighted, probs, value, x_perm, out_perm)


def _read(op, x: Tensor, s: KVState, x_perm: tuple, out_perm: tuple) -> Tensor:
    if x_perm:
        x = x.permute(x_perm)
    lead, L = x.shape[:-2], x.shape[-2]
    out = op(x.reshape(s.res.shape[0], -1, L, x.shape[-1]), s)  # [B, Hq, L, X]: the ops' layout
    out = out.reshape(*lead, L, out.shape[-1])
    return out.permute(out_perm) if out_perm else out


def kv_full(s: KVState) -> Tensor:
    """The full-precision cache in the model's layout: what attention reads where it cannot read the packed
    state (match.Read.fused False: RoPE applied to the cached keys, a scale, a baddbmm)."""
    return s.dequantize()


def nbytes(t: Tensor) -> int:
    """Bytes a cache tensor holds: the packed size of a state, numel * itemsize otherwise."""
    if isinstance(t, KVState):
        return t.packed_nbytes()
    return t.numel() * t.element_size()
