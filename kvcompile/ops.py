"""Every torch.library op of kvcompile (namespace `kvquant::`), each with its fake.

The functions of this module take `Packed` cache tensors (layout.py); the ops under them take the
schema types torch.library allows: the inner tensors, the Layout as its key string, and the counts
(`Packed.op_args` / `Packed.from_op`). Each op picks its implementation by device (`kernels()`): Triton
kernels on CUDA; on the CPU the compiled decode attention and quantizer of kernels/cpu.py where they serve,
else the torch reference (kernels/reference.py), the oracle of both. Outputs are contiguous and the fakes
give exactly those shapes and strides.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from .kernels import reference as ref
from .layout import PAD, Layout, Packed

KERNELS = ("auto", "triton", "torch", "cpu", "inline")


def kernels() -> str:
    """KVCOMPILE_KERNELS, which implementation the ops take:
      auto    (default) Triton kernels on CUDA; on the CPU the compiled decode attention (kernels/cpu.py)
              where it serves the call, the torch reference for everything else
      cpu     the same on the CPU; the reference on CUDA
      inline  as cpu, and with the inductor compiler the decode attention is compiled into the model's own
              graph (a decomposition of kvquant::attention: no call per layer, but minutes of compiling)
      triton  the Triton kernels everywhere (on a CPU: with TRITON_INTERPRET=1, for tests)
      torch   the torch reference everywhere"""
    mode = os.environ.get("KVCOMPILE_KERNELS", "auto")
    if mode not in KERNELS:
        raise ValueError(f"KVCOMPILE_KERNELS must be one of {', '.join(KERNELS)}; got {mode!r}")
    return mode


def implementation(t: Tensor) -> str:
    """Which implementation serves an op on t: "triton", "cpu" (the CPU's compiled kernels, kernels/cpu.py,
    where they serve the call) or "torch" (the reference), by kernels() and t's device (KVCOMPILE_KERNELS is
    read once per op: ~0.8 us a read, and a decode step calls three ops per layer)."""
    mode = kernels()
    if mode == "triton" or (mode == "auto" and t.is_cuda):
        return "triton"
    if mode in ("auto", "cpu", "inline") and t.device.type == "cpu" and not t.requires_grad:
        return "cpu"
    return "torch"


def use_triton(t: Tensor, *packed: Packed) -> bool:
    """Whether the Triton kernels run for tensors on t's device (kernels())."""
    return implementation(t) == "triton"


_CPU_FAILED: set = set()  # (kernel, layouts) whose compiled CPU kernel failed: the reference serves them


def _cpu_kernel(name: str, layouts: Tuple[Layout, ...], *args) -> Optional[Tensor]:
    """kernels/cpu.<name>(*args), one of the CPU's compiled kernels; None if it failed to compile: a
    KVQuantWarning says so and the reference serves those layouts from then on (the same arithmetic)."""
    if (name, layouts) in _CPU_FAILED:
        return None
    from .kernels import cpu

    try:
        out = getattr(cpu, name)(*args)
    except Exception as e:  # noqa: BLE001 - Inductor's own failure: the reference computes the same thing
        import warnings

        from .errors import KVQuantWarning

        _CPU_FAILED.add((name, layouts))
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        warnings.warn(KVQuantWarning(f"the CPU's compiled {name} failed for layouts "
                                     f"{' / '.join(lay.key for lay in layouts)} ({msg}); the torch reference "
                                     f"serves them instead (still quantized; KVCOMPILE_KERNELS=torch takes it "
                                     f"everywhere)"))
        return None
    _count(f"cpu_{name}_calls")
    return out


def _cpu_attention(q: Tensor, k: Packed, v: Packed, attn_mask, dropout_p, is_causal, scale) -> Optional[Tensor]:
    """The CPU's compiled decode attention where it serves the call (None where it does not)."""
    from .kernels import cpu

    if not cpu.usable(q, k, v, dropout_p):
        return None
    return _cpu_kernel("attention", (k.layout, v.layout), q, k, v, attn_mask, is_causal, scale)


_LIB = torch.library.Library("kvquant", "DEF")


def _op(name: str, mutates_args=()):
    """Define kvquant::<name> with the decorated function's schema (torch.library.infer_schema) and the function
    as its kernel on every device (it picks its implementation itself). A torch.library.Library op rather than
    torch.library.custom_op: custom_op's Python layers cost ~70 us more per call (about 105 us vs 36 us for
    compact_, 2-core CPU), and a decode step calls three ops per layer. Returns the op's OpOverload."""

    def define(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(torch.ops.kvquant, name).default

    return define


def _fake(op):
    """Register the decorated function as `op`'s fake (shapes and dtypes only, for tracing)."""
    return torch.library.register_fake(op, lib=_LIB)


def _count(name: str) -> None:
    counters["kvquant"][name] += 1


# ----------------------------------------------------------------------------------------------
# writes: compact_ (residual -> packed rows), grow, write_ (static buffers)
# ----------------------------------------------------------------------------------------------


@_op("compact_", mutates_args=("codes", "scale", "mn"))
def _compact_op(codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, layout: str, nq: int, skip: int) -> None:
    lay = Layout.from_key(layout)
    n = lay.n_quantize(res.shape[2] - PAD)
    if n <= 0:  # (kivi's keys at most steps: nothing leaves the window)
        return
    row, srow, x, impl = PAD + nq, PAD + lay.scale_rows(nq), res[:, :, PAD:PAD + n], implementation(res)
    if impl == "triton":
        from .kernels import triton_quantize

        _count("triton_quantize_calls")
        triton_quantize.quantize(x, lay, out=(codes, scale, mn), row=row, scale_row=srow)
        return
    c, s, m = _quantized(x, lay, impl)
    codes.narrow(2, row, n).copy_(c)  # (narrow: cheaper than indexing's parse of a tuple of slices)
    scale.narrow(2, srow, s.shape[2]).copy_(s)
    mn.narrow(2, srow, m.shape[2]).copy_(m)


@_fake(_compact_op)
def _(codes, scale, mn, res, layout, nq, skip) -> None:
    return None


def compact_(p: Packed) -> Tensor:
    """Quantize the oldest residual tokens that the layout's method no longer keeps in full precision and
    write them into the packed storage in place, after its nq rows (the caller makes sure there is
    room). Returns the new padded residual: the rest of the residual, copied by torch ops (in a compiled
    step, Inductor writes the copy into the step's own graph; the op returned it once, a copy and an
    allocation of its own per layer and step)."""
    _compact_op(*p.op_args())
    return ref.drop(p.res, p.layout.n_quantize(p.res.shape[2] - PAD))


@_op("grow", mutates_args=())
def _grow_op(codes: Tensor, scale: Tensor, mn: Tensor, layout: str, nq: int, capacity: int, start: int
             ) -> Tuple[Tensor, Tensor, Tensor]:
    lay = Layout.from_key(layout)
    out = _grow_fake(codes, scale, mn, layout, nq, capacity, start)
    r0, r1 = lay.scale_rows(start), lay.scale_rows(nq)
    for new, old, a, b in zip(out, (codes, scale, mn), (start, r0, r0), (nq, r1, r1)):
        new.zero_()
        new[:, :, PAD:PAD + b - a] = old[:, :, PAD + a:PAD + b]
    return out


@_fake(_grow_op)
def _grow_fake(codes, scale, mn, layout, nq, capacity, start):
    B, H = codes.shape[:2]
    rows = PAD + Layout.from_key(layout).scale_rows(capacity)
    return (
        codes.new_empty((B, H, PAD + capacity, codes.shape[3])),
        scale.new_empty((B, H, rows, scale.shape[3])),
        mn.new_empty((B, H, rows, mn.shape[3])),
    )


def grow(p: Packed, capacity, start=0) -> Tuple[Tensor, Tensor, Tensor]:
    """New packed storage (codes, scale, mn) with room for `capacity` tokens, holding rows [start, nq)
    of p's (a sliding window frees the rows of tokens it dropped; `start` covers whole scale rows)."""
    return _grow_op(p.codes, p.scale, p.mn, p.layout.key, p.nq, capacity, start)


def _quantized(x: Tensor, lay: Layout, impl: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    impl = impl or implementation(x)
    if impl == "triton":
        from .kernels import triton_quantize

        _count("triton_quantize_calls")
        return triton_quantize.quantize(x, lay)
    from .kernels import cpu

    out = _cpu_kernel("quantize", (lay,), x, lay) if impl == "cpu" and cpu.quantizes(x, lay) else None
    return ref.quantize(x, lay) if out is None else out


@_op("quantize", mutates_args=())
def _quantize_op(x: Tensor, layout: str) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(t.clone() for t in _quantized(x, Layout.from_key(layout)))


@_fake(_quantize_op)
def _(x, layout):
    lay = Layout.from_key(layout)
    B, H, N, D = x.shape
    cw, sw, mw = lay.widths(D)
    rows = lay.scale_rows(N)
    return (x.new_empty((B, H, N, cw), dtype=torch.uint8), x.new_empty((B, H, rows, sw)),
            x.new_empty((B, H, rows, mw)))


def quantize(x: Tensor, layout: Layout) -> Tuple[Tensor, Tensor, Tensor]:
    """x [B, H, N, D] -> (codes, scale, mn) in the layout's format (the Triton quantizer where the kernels
    run, else the reference; N a multiple of G for keys grouped along tokens)."""
    return _quantize_op(x, layout.key)


@_op("write_", mutates_args=("codes", "scale", "mn"))
def _write_op(codes: Tensor, scale: Tensor, mn: Tensor, layout: str, new: Tensor, pos: Tensor) -> None:
    lay, new = Layout.from_key(layout), new.to(scale.dtype)
    c, s, m = _quantized(new, lay)  # quantized by the kernel where it runs, scattered to the positions by torch
    idx = pos.to(codes.device) + PAD
    codes.index_copy_(2, idx, c)
    scale.index_copy_(2, idx, s)
    mn.index_copy_(2, idx, m)


@_fake(_write_op)
def _(codes, scale, mn, layout, new, pos) -> None:
    return None


def write_(p: Packed, new: Tensor, pos: Tensor) -> None:
    """Quantize tokens new [B, H, L, D], each on its own (a per-token layout), and write them at token
    positions `pos` [L] of the packed storage, in place (a fixed-size buffer: StaticCache): the Triton
    quantizer where the kernels run (use_triton), then an index_copy_ of the rows."""
    _write_op(p.codes, p.scale, p.mn, p.layout.key, new, pos)


# ----------------------------------------------------------------------------------------------
# reads: dequantize, attention, qk, pv
# ----------------------------------------------------------------------------------------------


@_op("dequantize", mutates_args=())
def _dequantize_op(codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, layout: str, nq: int, skip: int
                   ) -> Tensor:
    return ref.full(Packed.from_op(codes, scale, mn, res, layout, nq, skip)).contiguous()


@_fake(_dequantize_op)
def _(codes, scale, mn, res, layout, nq, skip) -> Tensor:
    B, H, Nr, D = res.shape
    return res.new_empty((B, H, nq - skip + Nr - PAD, D))


def dequantize(p: Packed) -> Tensor:
    """The full-precision cache [B, H, T, D]. An op rather than torch code so that tracing it (the
    state's dequantize-then-run fallback under Dynamo) adds no guards on the token counts: broadcasting
    a count that happens to be 1 would specialize it and recompile."""
    return _dequantize_op(*p.op_args())


@_op("attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k_codes: Tensor, k_scale: Tensor, k_mn: Tensor, k_res: Tensor, k_layout: str, k_nq: int, k_skip: int,
    v_codes: Tensor, v_scale: Tensor, v_mn: Tensor, v_res: Tensor, v_layout: str, v_nq: int, v_skip: int,
    attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
) -> Tensor:
    k = Packed.from_op(k_codes, k_scale, k_mn, k_res, k_layout, k_nq, k_skip)
    v = Packed.from_op(v_codes, v_scale, v_mn, v_res, v_layout, v_nq, v_skip)
    impl = implementation(q)
    if impl == "triton" and dropout_p == 0.0:
        from .kernels import triton_attention

        _count("triton_attention_calls")
        return triton_attention.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    out = _cpu_attention(q, k, v, attn_mask, dropout_p, is_causal, scale) if impl == "cpu" else None
    if out is not None:
        return out
    return ref.attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)


@_fake(_attention_op)
def _(q, k_codes, k_scale, k_mn, k_res, k_layout, k_nq, k_skip, v_codes, v_scale, v_mn, v_res, v_layout, v_nq,
      v_skip, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Tensor:
    B, Hq, L, _ = q.shape
    return q.new_empty((B, Hq, L, v_res.shape[-1]))


def attention(q: Tensor, k: Packed, v: Packed, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """SDPA of q [B, Hq, L, D] over packed K/V with Hkv heads -> [B, Hq, L, Dv]. `enable_gqa` says how
    the replaced SDPA call saw the heads; the reference follows it so that method "none" is exact."""
    return _attention_op(q, *k.op_args(), *v.op_args(), attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _matmul_op(name: str, out_cols):
    """The op `kvquant::<name>`, one of eager attention's matmuls ("qk" or "pv") over a packed tensor:
    the Triton kernel of that name or the reference's. out_cols(x, res, nq, skip): the output's last
    size, for the fake."""

    @_op(name, mutates_args=())
    def op(x: Tensor, codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, layout: str, nq: int, skip: int
           ) -> Tensor:
        p = Packed.from_op(codes, scale, mn, res, layout, nq, skip)
        if use_triton(x, p):
            from .kernels import triton_attention

            _count(f"triton_{name}_calls")
            return getattr(triton_attention, name)(x, p)
        return getattr(ref, name)(x, p)

    @_fake(op)
    def _(x, codes, scale, mn, res, layout, nq, skip) -> Tensor:
        return x.new_empty((*x.shape[:3], out_cols(x, res, nq, skip)))

    return op


_qk_op = _matmul_op("qk", lambda q, res, nq, skip: nq - skip + res.shape[2] - PAD)  # scores over T tokens
_pv_op = _matmul_op("pv", lambda p, res, nq, skip: res.shape[-1])  # values' head_dim


def qk(q: Tensor, k: Packed) -> Tensor:
    """q [B, Hq, L, D] @ K^T -> [B, Hq, L, T] over packed keys with Hkv heads."""
    return _qk_op(q, *k.op_args())


def pv(p: Tensor, v: Packed) -> Tensor:
    """probs [B, Hq, L, T] @ V -> [B, Hq, L, Dv] over packed values with Hkv heads."""
    return _pv_op(p, *v.op_args())
