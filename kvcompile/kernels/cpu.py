"""Decode attention over the packed cache on the CPU, compiled by Inductor: the CPU's default for the calls
it serves (usable); the torch reference, reference.attention, stays the oracle, and serves every other call
(KVCOMPILE_KERNELS=torch everywhere; ops.kernels lists the modes).

Two ways in: the op calls `attention`, which compiles the torch ops below once per pair of layouts and fixed
sizes without Dynamo (`_trace`: make_fx on fake tensors with symbolic token counts, then compile_fx; the
shape guards checked by a generated function; shared by every layer: seconds to compile); with
KVCOMPILE_KERNELS=inline and the inductor compiler, `decompose_attention` writes kvquant::attention as the
same ops inside the model's own graph instead (no call per layer, but every layer's attention is compiled
on its own symbolic sizes: sympy-bound, about 10-20 s per layer and graph on a 2-core CPU).

The reference dequantizes the whole cache to full precision, then calls SDPA: it reads the packed
bytes, writes a full-precision copy and reads that again. Here attention is written as reductions over
the packed tensors, and torch.compile (Inductor) fuses unpack -> decode -> multiply -> reduce into
vectorised C++ loop nests that read the codes, scales and minimums once and write no full-precision K
or V. The full-precision window is read as it is, by reductions of the same loop nest (not two calls of
a BLAS matmul: at a decode's sizes, a few hundred tokens, its dispatch costs as much as its work).

How the loops vectorise. Sub-byte codes are packed low bits first: channel d = per * j + i sits in byte
(or 3-byte word) j at bit position i (reference.pack). Indexed by d, the byte is j = d // per, which no
vector unit loads directly; so every reduction here runs over the codes "planar", with i as a dim of its
own and j, the bytes of a row, innermost: `(codes[..., None, :] >> bits * i) & mask`, one contiguous
load per row and a shift by a loop constant, in int32 lanes (AVX-512 has no 8-bit shift: at::vec emulates
one with shuffles; 130 -> 113 us for the compiled graph of one SmolLM2 kivi-2 layer at ~700 tokens, 2-core
EPYC). What multiplies the codes (the query, or the weights of the softmax) is permuted to the same (i, j)
order once per call and stored in that order (`_stored`: Inductor's force_stride_order), so that Inductor's
loop order follows the codes. The values' loop runs along whole rows, every group of channels in one vector,
each word's weight picked by compares of the loop index (`_spread`): one group per vector left lanes idle (8
of 16 at kivi-2's groups of 32) and made twice as many chains of dependent adds, one per group (113 -> 72 us).

Every format's dequantization is linear in its scale and minimum: deq(c, s, m) = deq(c, 1, 0) * s + m
(m only where the format stores one; tests/test_kernels.py checks each). So per-channel scales
(kivi's keys, groups of G tokens) fold into the query once per group, q·(c∘s + m) = (q∘s)·c + q·m, and
per-token scales multiply a partial sum per group of channels, (p_t s_t) c_t for the values.

Arithmetic: float32 throughout (the scores, a softmax of its own that gives 0 for a row every key of
which is masked, as SDPA does), rounded once to q's dtype: within the reference's own error against
float64, not bit-exact to it. For few queries (decode, L <= MAX_QUERIES), where attention is bound by
reading the cache; a longer prefill keeps the reference's SDPA.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..layout import CHANNEL_AXIS, PAD, TOKEN_AXIS, Layout, Packed
from ..methods import FORMATS, codes_per_word
from . import reference as ref

MAX_QUERIES = 16  # decode and short chunks; longer prefills are compute-bound: the reference's SDPA
RECOMPILE_LIMIT = 256


def _stored(x: Tensor) -> Tensor:
    """x written to memory contiguous in its own dim order (so that loops reading it run along its last
    dim), not recomputed inside its consumer's loops. A hint: without Inductor's prim, x as it is."""
    prim = getattr(torch.ops.prims, "inductor_force_stride_order", None)
    stride, step = [], 1
    for n in reversed(x.shape):
        stride.append(step)
        step = step * n
    if prim is None or not all(isinstance(t, int) for t in stride):  # symbolic strides: Inductor cannot order them
        return x
    return prim(x, stride[::-1])


def _planar(x: Tensor, per: int) -> Tensor:
    """[..., D] -> [..., per, D / per]: channel d = per * j + i at [..., i, j] (the codes' order)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // per, per).transpose(-1, -2)  # sizes explicit: no -1 to solve


def _unplanar(x: Tensor) -> Tensor:
    """Inverse of _planar: [..., per, J] -> [..., per * J]."""
    return x.transpose(-1, -2).reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def _codes(codes: Tensor, lay: Layout) -> Tensor:
    """Packed rows [..., J bytes] -> their codes [..., per, J words] (uint8, planar: _planar's order)
    decoded to float32 with scale 1 and minimum 0 (deq(c, 1, 0))."""
    bits = lay.bits
    if bits == 8:
        c = codes[..., None, :]
    elif bits == 3:  # 8 codes in each little-endian 24-bit word of 3 bytes
        b = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 3, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        c = _shifted(word, 3).to(torch.uint8)
    else:
        c = _shifted(codes, bits)
    if lay.fmt.levels is not None:
        return _looked_up(c, _TABLES[lay.fmt.name, bits])
    one = torch.ones((), dtype=torch.float32, device=codes.device)
    return lay.fmt.dequantize(c, one, torch.zeros_like(one), bits)


def _shifted(words: Tensor, bits: int) -> Tensor:
    """words [..., J] -> [..., per, J]: code i of each word, (word >> bits * i) & (2^bits - 1). Both operands
    expanded to the output's shape first: the shift's meta function broadcasts only concrete sizes, and the
    token dim is symbolic where `_trace` traces it."""
    per = words.element_size() * 8 // bits if words.dtype == torch.uint8 else 24 // bits
    words = words.to(torch.int32)
    shape = (*words.shape[:-1], per, words.shape[-1])
    shifts = torch.arange(0, per * bits, bits, dtype=words.dtype, device=words.device)[:, None].expand(shape)
    return torch.bitwise_and(torch.bitwise_right_shift(words[..., None, :].expand(shape), shifts), (1 << bits) - 1)


def _looked_up(c: Tensor, table: tuple) -> Tensor:
    """table[c] (float32) for codes c (uint8): a binary search of selects on c as float32 (exact: small
    integers), 2^bits - 1 compares and selects of constants. The same values as the gather `table[c.long()]`,
    which Inductor's C++ loops cannot vectorise (an indirect load: ~8x slower at 4 bits than kivi's affine
    decode); selects on uint8 masks vectorise too, but convert each mask to float's lanes (slower still)."""
    x = c.float()
    return _bisected(len(table), lambda i: x < i, lambda i: table[i])


def _bisected(n: int, below: Callable, leaf: Callable):
    """leaf(i) where i in [0, n) is the one the masks below(m) (true where i < m) place, as a binary search of
    n - 1 torch.where selects: what Inductor's loops vectorise, where an index by i would be a gather."""

    def pick(lo: int, hi: int):
        if hi - lo == 1:
            return leaf(lo)
        mid = (lo + hi) // 2
        return torch.where(below(mid), pick(lo, mid), pick(mid, hi))

    return pick(0, n)


def _rows(p: Packed, t: Tensor) -> Tensor:
    """The rows of inner tensor t (codes, or a per-token scale or minimum) holding packed tokens [skip, nq)."""
    return t[:, :, PAD + p.skip:PAD + p.nq]


def _channel_codes(p: Packed, ngc: int) -> Tensor:
    """The codes of packed tokens [skip, nq) of a layout grouped along channels, decoded (_codes), in their
    ngc groups: [B, H, n, ngc, per, Jg]."""
    codes = _rows(p, p.codes)
    B, H, n, J = codes.shape
    return _codes(codes.reshape(B, H, n, ngc, J // ngc), p.layout)


def _scores(qg: Tensor, k: Packed, groups: Optional[Tuple] = None) -> Tensor:
    """qg [B, H, rows, D] (float32, scaled) against the packed keys -> [B, H, rows, nq - skip]. groups: for
    keys grouped along tokens, (skip // G, nq // G - skip // G) if the caller has them (`_args`)."""
    lay = k.layout
    B, H, rows, D = qg.shape
    per = codes_per_word(lay.bits)
    if lay.axis == TOKEN_AXIS:  # one scale (and minimum) per channel per G tokens: fold into q per group
        G = lay.group  # nq is whole groups; skip need not be: whole groups from the one it falls in
        g0, ng = groups or (k.skip // G, k.nq // G - k.skip // G)
        s = k.scale[:, :, PAD + g0:PAD + g0 + ng].float()
        codes = k.codes[:, :, PAD + g0 * G:PAD + k.nq]
        qs = _planar(qg[:, :, :, None] * s[:, :, None], per)  # [B, H, rows, ng, per, J]
        qs = _stored(qs.permute(3, 0, 1, 2, 4, 5)).permute(1, 2, 3, 0, 4, 5)  # stored groups outermost: static strides
        c = _codes(codes.reshape(B, H, ng, G, codes.shape[-1]), lay)  # [B, H, ng, G, per, J]
        out = (qs[:, :, :, :, None] * c[:, :, None]).sum((-1, -2))  # [B, H, rows, ng, G]
        if lay.fmt.has_min:
            m = k.mn[:, :, PAD + g0:PAD + g0 + ng].float()
            out = out + (qg[:, :, :, None] * m[:, :, None]).sum(-1)[..., None]
        return out.reshape(B, H, rows, ng * G)[..., k.skip - g0 * G:]
    # one scale (and minimum) per token per group of Gc channels: a partial sum per group, times its scale
    Gc = lay.group
    ngc = D // Gc
    qp = _stored(_planar(qg.reshape(B, H, rows, ngc, Gc), per))  # [B, H, rows, ngc, per, Jg]
    c = _channel_codes(k, ngc)  # [B, H, n, ngc, per, Jg]
    part = (qp[:, :, :, None] * c[:, :, None]).sum((-1, -2))  # [B, H, rows, n, ngc]
    out = (part * _rows(k, k.scale).float()[:, :, None]).sum(-1)
    if lay.fmt.has_min:
        qsum = qg.reshape(B, H, rows, ngc, Gc).sum(-1)  # [B, H, rows, ngc]
        out = out + (qsum[:, :, :, None] * _rows(k, k.mn).float()[:, :, None]).sum(-1)
    return out


def _weighted(e: Tensor, v: Packed, D: int) -> Tensor:
    """Softmax weights e [B, H, rows, nq - skip] (float32) times the packed values -> [B, H, rows, D]."""
    lay = v.layout  # CHANNEL_AXIS (usable): one scale (and minimum) per token per group of Gc channels
    B, H, rows, n = e.shape
    ngc = D // lay.group
    s = _rows(v, v.scale).float()  # [B, H, n, ngc]
    ps = _spread(e[..., None] * s[:, :, None], lay.group // codes_per_word(lay.bits))  # [B, H, rows, n, W]
    c = _codes(_rows(v, v.codes), lay)  # [B, H, n, per, W]: word w's scale is its group's, ps[..., w]
    out = _unplanar((ps[:, :, :, :, None] * c[:, :, None]).sum(3))  # [B, H, rows, D]
    if lay.fmt.has_min:
        m = (e[..., None] * _rows(v, v.mn).float()[:, :, None]).sum(3)  # [B, H, rows, ngc]
        out = (out.reshape(B, H, rows, ngc, lay.group) + m[..., None]).reshape(B, H, rows, D)
    return out


def _spread(x: Tensor, width: int) -> Tensor:
    """x [..., n] -> [..., n * width]: x[..., j // width] at j, as selects on j (a binary search, n - 1 of them):
    each a vector compare of the loop's index in Inductor's loops, where indexing by j // width would be a
    gather (a scalar load per lane)."""
    j = torch.arange(x.shape[-1] * width, dtype=torch.int32, device=x.device)
    return _bisected(x.shape[-1], lambda i: j < i * width, lambda i: x[..., i:i + 1])


def _attend(q: Tensor, k: Packed, v: Packed, mask: Optional[Tensor], is_causal: bool, scale: float,
            groups: Optional[Tuple] = None) -> Tensor:
    dtype = q.dtype
    q, k, v, back = ref.in_basis(q, k, v, float32=True)  # NFH: attend in the transformed basis
    B, Hq, L, D = q.shape
    Hkv = k.res.shape[1]
    rows = Hq // Hkv * L  # the query rows of one KV head: (query head, query) pairs
    qg = q.reshape(B, Hkv, rows, D) * scale
    kr, vr = ref.unpad(k.res), ref.unpad(v.res)
    s = (qg[:, :, :, None] * kr[:, :, None]).sum(-1)  # the window: [B, Hkv, rows, Nr]
    if k.layout.quantized:
        s = torch.cat([_scores(qg, k, groups), s], dim=-1)
    T = s.shape[-1]
    if mask is not None:
        m = mask.expand(B, Hq, L, T).reshape(B, Hkv, rows, T)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    if is_causal:
        qi = torch.arange(rows, device=q.device) % L
        s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > qi[:, None], float("-inf"))
    top = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(top == float("-inf"), 0.0, top))
    total = e.sum(-1, keepdim=True)
    nvq = T - vr.shape[2]  # values: packed tokens first, then the window (their own split)
    out = (e[..., nvq:, None] * vr[:, :, None]).sum(3)  # [B, Hkv, rows, D]
    if v.layout.quantized:
        out = out + _weighted(e[..., :nvq], v, vr.shape[-1])
    out = out / torch.where(total == 0.0, 1.0, total)
    return back(out.reshape(B, Hq, L, out.shape[-1])).to(dtype)


_TABLES = {}  # (format, bits) -> its levels as Python floats: constants of the graphs that decode it (_looked_up)


def _tables(*layouts: Layout) -> None:
    """Make the tables the layouts' formats decode with, outside the graphs that read them: as tensors, the
    quantizer's inputs (levels and bounds), and as Python floats, the decode's constants (_TABLES)."""
    for lay in layouts:
        if not lay.quantized:
            continue
        fmt = FORMATS[lay.fmt.plain or lay.fmt.name]  # a transformed format's codes decode as its plain one's
        if fmt.levels is not None:
            _TABLES[fmt.name, lay.bits] = tuple(fmt.levels(lay.bits, "cpu").tolist())
            fmt.bounds(lay.bits, "cpu")


# the graphs here are called only as their callers traced them (`_args`, `quantize`: contiguous tensors of the
# sizes their guards or keys accept), not by Dynamo: the compiled wrapper's own size and stride asserts would
# check again what the caller made sure of (~0.6 us each, nine a call of SmolLM2's kivi-2 attention)
_CALLED_DIRECTLY = {"size_asserts": False}


class _Graph(NamedTuple):
    """One compiled attention graph and the guards on the sizes it was traced for (None: it takes any)."""

    fn: Callable
    guards: Optional[Callable]


@functools.lru_cache(maxsize=None)
def _graphs(lk: Layout, lv: Layout, static: tuple) -> List[_Graph]:
    """The graphs compiled so far for one pair of layouts and everything `_static` keeps fixed: a list that
    `attention` extends when no graph's guards accept a call's token counts (at most RECOMPILE_LIMIT)."""
    _tables(lk, lv)
    return []


def _args(q: Tensor, k: Packed, v: Packed, mask: Optional[Tensor]) -> list:
    """The flat inputs of a compiled graph: tensors (contiguous: the graphs are traced for contiguous inputs,
    and only their token dims are symbolic) and the token counts. Kivi's keys also pass their first packed
    group and number of groups (skip // G, nq // G - skip // G) as counts of their own: traced from nq and
    skip, each floor division would leave guards of its own (`_attend`'s `groups`)."""
    args = [q.contiguous(), *(t.contiguous() for t in k.tensors), k.nq, k.skip]
    if k.layout.quantized and k.layout.axis == TOKEN_AXIS:
        G = k.layout.group
        args += [k.skip // G, k.nq // G - k.skip // G]
    args += [*(t.contiguous() for t in v.tensors), v.nq, v.skip]
    if mask is not None:
        args.append(mask.contiguous())
    return args


def _unflat(lk: Layout, lv: Layout, xs) -> tuple:
    """`_args`' inverse: (q, k, v, mask, groups) as `_attend` takes them."""
    xs = list(xs)
    q, k, groups = xs[0], Packed(*xs[1:5], lk, *xs[5:7]), None
    xs = xs[7:]
    if lk.quantized and lk.axis == TOKEN_AXIS:
        groups, xs = tuple(xs[:2]), xs[2:]
    v = Packed(*xs[:4], lv, *xs[4:6])
    return q, k, v, (xs[6] if len(xs) > 6 else None), groups


def _trace(lk: Layout, lv: Layout, is_causal: bool, scale: float, args: list) -> _Graph:
    """Compile `_attend` for inputs like `args` (`_args`) without Dynamo: traced to aten ops on fake tensors
    whose token sizes and counts are symbols (make_fx), compiled by Inductor (compile_fx), and called with
    the real tensors and ints directly. What the trace assumed about those symbols (that a count is 0, that
    the mask has as many tokens as the keys) comes back as the shape environment's guards, an expression
    checked at each call (as Dynamo's guards would be, without its frame and cache lookup: ~160 us of a
    call in a decode step on a 2-core CPU)."""
    from torch._dynamo.source import LocalSource
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    env = ShapeEnv(duck_shape=False)  # no equality assumed between sizes that happen to be equal
    mode = FakeTensorMode(shape_env=env)
    fakes = []
    for i, a in enumerate(args):
        src = LocalSource(f"t{i}")
        if isinstance(a, Tensor):  # [B, H, tokens, X] cache tensors and the mask [..., T]: only tokens vary
            dims = [DimDynamic.STATIC] * a.dim()
            if i > 0:  # q's sizes are all static; the mask (last, after an int) varies in its last dim
                dims[-1 if i == len(args) - 1 else 2] = DimDynamic.DYNAMIC
            ctx = StatelessSymbolicContext(dynamic_sizes=dims, constraint_sizes=[None] * a.dim())
            fakes.append(mode.from_tensor(a, source=src, symbolic_context=ctx))
        else:
            sym = env.create_symbol(a, src, dynamic_dim=DimDynamic.DYNAMIC)
            fakes.append(env.create_symintnode(sym, hint=a, source=src))

    def attend(*xs):
        q, k, v, mask, groups = _unflat(lk, lv, xs)
        return _attend(q, k, v, mask, is_causal, scale, groups)

    with mode, torch.no_grad():
        gm = make_fx(attend, tracing_mode="real")(*fakes)
    fn = compile_fx(gm, fakes, config_patches=_CALLED_DIRECTLY)
    names = [f"t{i}" for i in range(len(args))]
    return _Graph(fn, _guard_function(env.produce_guards(fakes, [LocalSource(n) for n in names]), names))


def _guard_function(guards: List[str], names: List[str]) -> Optional[Callable]:
    """The shape environment's guards (Python source over L['t<i>']) as one function of the graph's inputs,
    or None if there are none. Guards on strides are left out: `_args` passes contiguous tensors, whose
    strides follow from their sizes, as those guards say (and the compiled graph asserts its inputs' sizes
    and strides itself). Each size is read once, into a local (the guards read some ten times each: ~14 us
    a call of SmolLM2's kivi-2 attention on a 2-core CPU, against ~131 us for the graph)."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    kept = [re.sub(r"L\['(t\d+)'\]", r"\1", g) for g in guards if ".stride()" not in g]
    if not kept:
        return None
    # each guard parenthesised: one can be a disjunction (a broadcast: `a == 1 or a == b`)
    code = re.sub(r"(t\d+)\.size\(\)\[(\d+)\]", r"\1_\2", " and ".join(f"({g})" for g in kept))
    sizes = sorted(set(re.findall(r"\b(t\d+)_(\d+)\b", code)))
    body = "".join(f"    {t}_{d} = {t}.shape[{d}]\n" for t, d in sizes)
    scope = dict(SYMPY_INTERP)
    exec(f"def guards({', '.join(names)}):\n{body}    return {code}\n", scope)
    return scope["guards"]


@functools.lru_cache(maxsize=None)
def _compiled_quantize(lay: Layout, shape: tuple, dtype: torch.dtype):
    """reference.quantize for one layout and one input shape and dtype (contiguous, on the CPU), compiled by
    Inductor without Dynamo: traced to aten ops (make_fx) and handed to compile_fx. Every size is static, so
    a call runs the compiled graph with no guards to check: the key is everything a guard would have
    checked. A decode step quantizes the same few token counts at every step (one; a window's worth at a key
    flush), a handful of graphs, where Dynamo's lookup and frame cost ~50-90 us a call, more than the
    quantization itself (tens of microseconds for one token of every head: two per layer and step)."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    _tables(lay)
    x = torch.zeros(shape, dtype=dtype)
    with torch.no_grad():
        gm = make_fx(lambda x: ref.quantize(x, lay))(x)
        # the scale is rounded to the cache's dtype and read back in float32: Inductor would keep the float32
        # value inside its loop (a half-precision scale's codes would differ from the reference's) unless told
        return compile_fx(gm, [x], config_patches={**_CALLED_DIRECTLY, "emulate_precision_casts": True})


def quantizes(x: Tensor, lay: Layout) -> bool:
    """Whether the compiled quantizer serves x [B, H, N, D]: the token counts a decode step quantizes at every
    step or flush (up to MAX_QUERIES: one token, or a short chunk's; a window's worth, R, or a group, G: kivi's
    keys leave the residual R at a time). Other counts (a prefill's, hundreds or thousands, or the tail of a
    prompt past the window) take the reference, once: milliseconds of eager work, where compiling a graph for
    a token count that the decode never meets again would cost a second or more of the first token's time."""
    n = x.shape[2]
    return 0 < n <= MAX_QUERIES or n in (lay.residual, lay.group)


def quantize(x: Tensor, lay: Layout):
    """reference.quantize(x, lay) of x [B, H, N, D] on the CPU, compiled: the same float32 operations fused
    into one loop nest (bit-exact to the reference: tests/test_kernels.py), one graph per token count."""
    codes, scale, mn = _compiled_quantize(lay, tuple(x.shape), x.dtype)(x.contiguous())
    return codes, scale, mn


def _static(q: Tensor, k: Packed, v: Packed, mask: Optional[Tensor], is_causal: bool, scale: float) -> tuple:
    """What a compiled attention graph keeps static: every size but the tokens', the dtypes, the mask's kind,
    causality and the scale."""
    return (tuple(q.shape), q.dtype, tuple(k.res.shape[:2]), k.res.shape[-1], v.res.shape[-1], k.res.dtype,
            None if mask is None else (mask.dtype, tuple(mask.shape[:-1])), is_causal, scale)


def _static_int(n) -> Optional[int]:
    """n as an int where it is one, or a size the shape environment knows; None for a symbolic size."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(n) if is_concrete_int(n) else None


def decompose_attention(q, k_codes, k_scale, k_mn, k_res, k_layout, k_nq, k_skip, v_codes, v_scale, v_mn, v_res,
                        v_layout, v_nq, v_skip, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    """kvquant::attention written as the torch ops of `_attend`, for Inductor to compile into the model's own
    graph (compile_fx's decomposition table, backend.py): no nested compiled call, no dispatch, one C++
    kernel source for the whole decode step. NotImplemented (the op stays) where the fast path does not serve."""
    k = Packed.from_op(k_codes, k_scale, k_mn, k_res, k_layout, k_nq, k_skip)
    v = Packed.from_op(v_codes, v_scale, v_mn, v_res, v_layout, v_nq, v_skip)
    L = _static_int(q.shape[2])
    if L is None or not usable(q, k, v, dropout_p, queries=L):
        return NotImplemented
    _tables(k.layout, v.layout)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attend(q, k, v, attn_mask, bool(is_causal), s)


def _serves(lay: Layout, role: str, head_dim: int) -> bool:
    """Whether the loops above read this layout: values grouped along their channels, groups of whole
    bytes (words) of codes."""
    if not lay.quantized:
        return True
    if lay.axis == TOKEN_AXIS:
        return role == "k"
    return lay.axis == CHANNEL_AXIS and head_dim % lay.group == 0 and lay.group % codes_per_word(lay.bits) == 0


def usable(q: Tensor, k: Packed, v: Packed, dropout_p: float, queries: Optional[int] = None) -> bool:
    """Whether the fast path serves this call: CPU, few queries, no dropout, a layout it reads."""
    L = q.shape[2] if queries is None else queries
    return (q.device.type == "cpu" and L <= MAX_QUERIES and dropout_p == 0.0 and not q.requires_grad
            and _serves(k.layout, "k", k.res.shape[-1]) and _serves(v.layout, "v", v.res.shape[-1])
            and (k.layout.quantized or v.layout.quantized))


def attention(q: Tensor, k: Packed, v: Packed, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
              scale: Optional[float] = None) -> Tensor:
    """SDPA of q [B, Hq, L, D] over packed keys and values (Hkv divides Hq) -> [B, Hq, L, Dv]: the first
    compiled graph whose guards accept the call's token counts, or a new one (`_trace`)."""
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    graphs = _graphs(k.layout, v.layout, _static(q, k, v, attn_mask, is_causal, s))
    args = _args(q, k, v, attn_mask)
    for g in graphs:
        if g.guards is None or g.guards(*args):
            return g.fn(*args)
    if len(graphs) >= RECOMPILE_LIMIT:
        raise RuntimeError(f"kvquant: the CPU decode attention compiled {RECOMPILE_LIMIT} graphs for layouts "
                           f"{k.layout.key} / {v.layout.key}, none of which accepts token counts "
                           f"{k.nq, k.skip, v.nq, v.skip} (residuals {k.res.shape[2]}, {v.res.shape[2]})")
    graphs.append(_trace(k.layout, v.layout, bool(is_causal), s, args))
    return graphs[-1].fn(*args)
