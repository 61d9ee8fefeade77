"""Find KV caches in a Dynamo (torch-level) FX graph by what they do, and the attention that reads them.

A cache is a tensor carried from one call to the next, grown along one axis each call, and read by
attention along that axis. Four kinds of update (`CacheUpdate.kind`), each rewritten by its own
function in rewrite.py:

  growing   `torch.cat([past, new], dim=a)` returned from the graph (Dynamo stores it back where the model
            keeps its cache: a transformers Cache, a tuple, an attribute); `past` is the previous call's
            tensor (a graph input) or, at the first call, an empty tensor made in the graph
  sliding   the same, but only the newest tokens are returned: `cat[..., start:, ...]` along `a`
  fresh     a first call's cache with no cat: a computed tensor that is returned and read by attention
  static    a buffer written in place at token positions (`buf.index_copy_(a, pos, new)`, `buf[..., pos] =
            new`, `buf[:bsz, start:stop] = new`), read whole or as a prefix (`buf[:bsz, :n]`) by attention
            (transformers' StaticCache, module buffers, tensor attributes, buffers passed in)

The cache's layout is not assumed: axes.py labels every dim of the cache and follows them through layout
and value ops to the attention ops (SDPA, matmul / bmm / baddbmm, einsum), which say which dim holds the
tokens, heads, head dim and batch. That gives the cache's logical layout (Layout.logical, e.g. "bthd")
and, per read, whether the fused attention can read the packed cache directly (a layout view of it,
read as SDPA, q @ K^T, P @ V or an einsum of those), or must read it dequantized (the keys go through
RoPE or a scale first, a baddbmm: quantized storage, attention in full precision).

The tokens appended must be the attention's queries (self-attention); an encoder-decoder's
cross-attention appends the encoder's tokens and is left alone, as is anything the analysis cannot
prove is attention, with the first real reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from ..layout import index_dims, logical_dims
from .axes import LAYOUT_METHODS, UNIT, Labels, cache_labels, known_equal, propagate, shape, slot_sizes, val

_CAT = {torch.cat, torch.concat, torch.concatenate}
_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_SIZE_METHODS = {"size", "dim"}
_SIZE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ZEROS = {torch.zeros, torch.zeros_like, torch.empty}
NO_ATTENTION = "no attention op reads it"


def rank(node) -> Optional[int]:
    s = shape(node)
    return len(s) if s is not None else None


def describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def sdpa_args(node: fx.Node) -> Dict[str, object]:
    """F.scaled_dot_product_attention's arguments by name."""
    out = dict(zip(_SDPA_ARGS, node.args))
    out.update(node.kwargs)
    return out


def _is_call(node: fx.Node, method: Optional[str] = None, fns=None) -> bool:
    if method is not None:
        return node.op == "call_method" and node.target == method
    return node.op == "call_function" and node.target in fns


def _is_baddbmm(node: fx.Node) -> bool:
    return _is_call(node, fns={torch.baddbmm}) or _is_call(node, "baddbmm")


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL) or \
        (node.op == "call_method" and node.target in _MATMUL_METHODS)


@dataclass
class Read:
    """One attention op reading a tensor derived from the cache."""

    kind: str  # "sdpa", "matmul" (matmul, @, bmm), "baddbmm", "einsum"
    node: fx.Node  # the attention op
    operand: fx.Node  # the cache-derived tensor it reads
    labels: Labels
    slot: str = ""  # sdpa: "key" / "value"; the others: "qk" / "pv"
    fused: bool = False  # reads the packed cache directly (else its dequantized full-precision value)
    why_dequantized: str = ""
    other: Optional[fx.Node] = None  # the query (qk) or the probabilities (pv)
    x_perm: Tuple[int, ...] = ()  # einsum: `other` permuted to [batch..., heads, L, X]
    out_perm: Tuple[int, ...] = ()  # einsum: the canonical output permuted to the einsum's
    prefix: Dict[str, Any] = field(default_factory=dict)  # {"t" / "b": stop}: it reads the first `stop` only


@dataclass
class CacheUpdate:
    kind: str  # "growing", "sliding", "fresh", "static"
    cache: fx.Node  # the tensor holding the whole cache after this call's update (cat, fresh tensor, buffer)
    past: Optional[fx.Node] = None  # the previous call's cache (a graph input), if any
    new: Optional[fx.Node] = None  # the tokens appended or written
    returned: Optional[fx.Node] = None  # what the graph returns for the cache to keep (growing, sliding, fresh)
    axis: Optional[int] = None  # the dim of the cache that grows (cat / write dim)
    window_start: int = 0  # sliding: the returned cat[..., start:, ...]
    write: Optional[fx.Node] = None  # static: the index_copy_ / index_put_ / setitem
    write_at: Tuple = ()  # static: ("positions", pos) or ("index", idx) (_write_args)
    role: Optional[str] = None  # "k" / "v"
    logical: str = ""  # the cache's layout in canonical letters (Layout.logical)
    heads: int = 0  # H where a dim merges heads with another (Layout.heads)
    reads: List[Read] = field(default_factory=list)
    size_uses: List[fx.Node] = field(default_factory=list)
    reason: Optional[str] = None  # why it is left alone; None if matched
    note: str = ""  # said in the report (e.g. attention reads the dequantized cache: why)

    @property
    def matched(self) -> bool:
        return self.reason is None


# ---------------------------------------------------------------------------------------------
# candidates


def _output_args(graph: fx.Graph) -> set:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return set(out.all_input_nodes)


def _cat_args(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, int]]:
    if not _is_call(node, fns=_CAT):
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not isinstance(dim, int):
        return None
    past, new = tensors
    r = rank(node)
    if not (isinstance(past, fx.Node) and isinstance(new, fx.Node)) or r is None or r < 2 or rank(new) != r:
        return None
    return past, new, dim % r


def _window_start(node: fx.Node, cat: fx.Node, axis: int) -> Optional[int]:
    """`start` if `node` is `cat[..., start:, ...]` along `axis` (every other dim whole), start a constant;
    0 for an identity slice (`cat[..., 0:, :]`, `cat[:, :, :]`)."""
    if not (_is_call(node, fns={operator.getitem}) and node.args[0] is cat):
        return None
    idx = index_dims(node.args[1], rank(cat))
    full = slice(None, None, None)
    if idx is None or any(i != full for d, i in enumerate(idx) if d != axis):
        return None
    cut = idx[axis]
    if isinstance(cut, slice) and (cut.start is None or isinstance(cut.start, int)) and cut.stop is None \
            and cut.step in (None, 1):
        return cut.start or 0
    return None


def find_cache_updates(graph: fx.Graph, graph_break: Optional[str] = None) -> List[CacheUpdate]:
    """Every growing, sliding and fresh cache update, classified (module docstring). `graph_break`: where
    and why Dynamo ended this graph early, named for a cache that no attention of the graph reads."""
    outputs = _output_args(graph)
    updates = []
    for node in graph.nodes:
        cat = _cat_args(node)
        if cat is None:
            fresh = _fresh(node, outputs)
            if fresh is not None:
                updates.append(fresh)
            continue
        past, new, axis = cat
        if not _carried(past):
            continue  # a cat of computed tensors (RoPE's rotate-half, a mask): no cache
        upd = CacheUpdate("growing", node, past, new, returned=node, axis=axis)
        if node not in outputs:
            windows = [u for u in node.users if _window_start(u, node, axis) is not None]
            if len(windows) == 1 and windows[0] in outputs:
                upd.returned, upd.window_start = windows[0], _window_start(windows[0], node, axis)
                upd.kind = "sliding" if upd.window_start else "growing"  # 0: an identity slice
            elif any(_is_call(u, fns={operator.getitem}) and u in outputs for u in node.users):
                upd.reason = ("only a slice of it is returned, and not its newest tokens along the axis it grows "
                              "(`cache[..., start:, ...]`, as a sliding-window cache keeps)")
            else:
                upd.reason = "its result is not a graph output, so it is not a cache that outlives the call"
        if upd.reason is None:
            _analyze(upd, skip={upd.returned})
        if upd.reason == NO_ATTENTION and graph_break:
            upd.reason = (f"no attention op reads it in this graph, which ends at a graph break ({graph_break}): the "
                          f"cache update and the attention that reads it must be in one graph")
        elif upd.reason is not None and _not_a_cache(upd):
            continue  # a cat that is no KV cache (tokens, masks): not worth a report line
        updates.append(upd)
    _partners(updates)
    return updates


def _carried(past: fx.Node) -> bool:
    """Whether a cat's first operand is carried from the previous call: a graph input, or the empty
    tensor a lazily initialised cache starts from."""
    v = val(past)
    return past.op == "placeholder" or (isinstance(v, torch.Tensor) and v.numel() == 0)


def _not_a_cache(upd: CacheUpdate) -> bool:
    """A cat of tensors that attention never reads, at any remove: no cache of ours, not reported."""
    return rank(upd.cache) not in (3, 4) or not _reaches_attention(upd.cache)


def _reaches_attention(node: fx.Node, depth: int = 12) -> bool:
    """Whether attention (SDPA, a matmul, baddbmm, einsum) reads `node` through any ops at all, within depth."""
    def attends(u: fx.Node, n: fx.Node) -> bool:
        return _is_call(u, fns=_SDPA) or _is_matmul(u) or _is_baddbmm(u) or _is_call(u, fns={torch.einsum})

    return _users_reach(node, attends, lambda u: True, depth)


def _users_reach(node: fx.Node, hit, follow, depth: int) -> bool:
    """Breadth first over node's users, at most `depth` removes: whether hit(user, the node it reads) holds for
    one, going on through the users that follow(user) admits."""
    todo, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in todo:
            for u in n.users:
                if hit(u, n):  # every edge: a node may read one input as keys and another not
                    return True
                if u not in seen and follow(u):
                    seen.add(u)
                    nxt.append(u)
        todo = nxt
    return False


def _fresh(node: fx.Node, outputs: set) -> Optional[CacheUpdate]:
    """A first-call cache with no cat (a hand-written decoder's prefill returns its K and V): a computed
    tensor that is returned and read by attention. Only kept if fully matched."""
    if node.op not in ("call_function", "call_method") or rank(node) not in (3, 4) or node not in outputs:
        return None
    if _is_call(node, fns=_CAT) or not _reaches_attention(node):
        return None
    upd = CacheUpdate("fresh", node, None, node, returned=node)
    _analyze(upd, skip=set())
    return upd if upd.matched and upd.reads else None


def find_static_updates(graph: fx.Graph) -> List[CacheUpdate]:
    """Every buffer written in place at token positions, classified: `buf.index_copy_(a, pos, new)`,
    `buf.index_put_(indices, new)` and `buf[idx] = new` (_write_args), on a graph input (a module buffer,
    a tensor attribute, a buffer passed in, a state) or on a zero-filled buffer the graph creates and
    returns (StaticCache's lazy init). A full-precision buffer rewritten whole (`buf.copy_(x)`: a rolled
    sliding window) that attention reads is reported, left alone."""
    outputs = _output_args(graph)
    updates = []
    for node in graph.nodes:
        write = _write_args(node)
        if write is None:
            continue
        buf, dim, new, at = write
        if not (isinstance(buf, fx.Node) and isinstance(new, fx.Node) and rank(buf) in (3, 4)
                and rank(new) == rank(buf) and (isinstance(dim, int) or at[0] == "whole")):
            continue
        upd = CacheUpdate("static", buf, buf if buf.op == "placeholder" else None, new,
                          axis=dim % rank(buf) if isinstance(dim, int) else None, write=node, write_at=at)
        if at[0] == "whole":
            upd.reason = (f"{describe(node)} rewrites the full-precision buffer whole (a rolled sliding window, or a "
                          f"prompt longer than the window); kvcompile quantizes a buffer written at token positions")
            if _read_by_attention(buf):
                updates.append(upd)
            continue
        if buf.op != "placeholder" and not (_is_call(buf, fns=_ZEROS) and buf in outputs):
            if _read_by_attention(buf):  # a computed tensor written in place: no cache of its own unless read so
                upd.reason = (f"the buffer {describe(buf)} is neither created zero-filled in this graph and returned, "
                              f"nor a graph input")
                updates.append(upd)
            continue
        updates.append(upd)
        if node.users:
            upd.reason = f"the result of {describe(node)} is used (instead of the buffer it writes)"
        else:
            _analyze(upd, skip={node})
    _partners(updates)
    return updates


def _write_args(node: fx.Node) -> Optional[Tuple[Any, Any, Any, Tuple]]:
    """(buffer, dim, new tokens, where) of a write at token positions, or None; `where` is ("positions",
    pos) for `buf.index_copy_(dim, pos, new)`, `buf.index_put_((None, .., pos), new)` (ExecuTorch's) and
    `buf.scatter_(dim, pos.view(..).expand_as(new), new)` (pos then keeps its unit dims),
    ("index", idx) for `buf[idx] = new`, ("whole", None) for `buf.copy_(x)` of a full-precision buffer
    (dim None)."""
    args = node.args
    if node.op == "call_method" and node.target == "index_copy_" and len(args) == 4:
        return args[0], args[1], args[3], ("positions", args[2])
    if node.op == "call_method" and node.target == "scatter_" and len(args) == 4 and isinstance(args[1], int) \
            and not node.kwargs:
        pos = _broadcast_positions(args[2], args[1])
        return (args[0], args[1], args[3], ("positions", pos)) if pos is not None else None
    index_put = (node.op == "call_method" and node.target == "index_put_") or \
        (node.op == "call_function" and node.target in (torch.index_put_, torch.ops.aten.index_put_.default,
                                                        torch.ops.aten.index_put_))
    if index_put and len(args) == 3 and isinstance(args[1], (list, tuple)):
        hit = [d for d, i in enumerate(args[1]) if i is not None]
        if len(hit) == 1 and isinstance(args[1][hit[0]], fx.Node):
            return args[0], hit[0], args[2], ("positions", args[1][hit[0]])
        return None
    if _is_call(node, fns={operator.setitem}) and len(args) == 3 and isinstance(args[0], fx.Node) \
            and rank(args[0]) is not None:
        return args[0], _write_index(args[1], rank(args[0])), args[2], ("index", args[1])
    if node.op == "call_method" and node.target == "copy_" and len(args) == 2 and isinstance(args[0], fx.Node) \
            and isinstance(args[1], fx.Node) and shape(args[0]) == shape(args[1]) \
            and not _is_state(val(args[0])):  # a state rewritten whole quantizes as written (static_rewrites)
        return args[0], None, args[1], ("whole", None)
    return None


def _broadcast_positions(index: Any, dim: int) -> Optional[fx.Node]:
    """The positions of `buf.scatter_(dim, index, new)` when the index is them broadcast over the other dims
    (`pos.view(1, 1, n, 1).expand_as(new)`): the tensor before the expand, whose only non-1 size is `dim`'s;
    None for any other index (a scatter that is no write at token positions)."""
    if not (isinstance(index, fx.Node) and index.op == "call_method" and index.target in ("expand", "expand_as")
            and isinstance(index.args[0], fx.Node)):
        return None
    base = shape(index.args[0])
    if base is None or len(base) != rank(index):
        return None
    d = dim % len(base)
    return index.args[0] if all(s == 1 for i, s in enumerate(base) if i != d) else None


def _read_by_attention(node: fx.Node, depth: int = 6) -> bool:
    """Whether attention reads `node` as its keys or values through layout ops only (a buffer that is a KV
    cache, not a recurrent state that only feeds the layer's later input)."""
    def as_kv(u: fx.Node, n: fx.Node) -> bool:
        if _is_call(u, fns=_SDPA):
            return n in (sdpa_args(u).get("key"), sdpa_args(u).get("value"))
        return _is_matmul(u) and len(u.args) > 1 and u.args[1] is n

    def layout_op(u: fx.Node) -> bool:
        return (u.op == "call_method" and u.target in LAYOUT_METHODS) or _is_call(u, fns={operator.getitem})

    return _users_reach(node, as_kv, layout_op, depth)


def _is_state(v: Any) -> bool:
    from ..state import KVState

    return isinstance(v, KVState)


def _write_index(idx, ndim: int) -> Optional[int]:
    """The dim `buf[idx] = new` writes token positions along, or None: one dim indexed by positions (a
    tensor, or a slice `start:stop`), every other dim whole but for a batch prefix `:bsz` in dim 0
    (`buf[:, :, pos] = k`: gpt-fast's; `cache_k[:bsz, start:start + n] = xk`: the reference Llama's)."""
    dims = index_dims(idx, ndim)
    if dims is None:
        return None
    full = slice(None, None, None)
    cut = [d for d, i in enumerate(dims) if i != full]
    if len(cut) == 2 and _is_prefix(dims[0]):
        cut = cut[1:]
    if len(cut) != 1:
        return None
    i = dims[cut[0]]
    positions = isinstance(i, fx.Node) and isinstance(val(i), torch.Tensor) and val(i).dim() == 1
    if positions or (isinstance(i, slice) and i.stop is not None and i.step in (None, 1)):
        return cut[0]
    return None


def _is_prefix(i) -> bool:
    return isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1)


def fold_aliases(graph: fx.Graph) -> int:
    """Replace each no-op cast by its input, and each use of an in-place op's result by the tensor it wrote:
    `.to(x)` / `.type_as(x)` of a tensor already of that dtype and device, and `buf.index_copy_(..)`, return
    the tensor itself (`self.cache_k = self.cache_k.to(xq)`: the reference Llama's; `k =
    self.k.index_copy_(2, pos, k)`: litgpt's), so the graph is the same, and a buffer written through them
    is seen to be the graph input it is."""
    n = 0
    for node in list(graph.nodes):
        if _is_alias(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            n += 1
        elif _returns_self(node) and node.users:
            node.replace_all_uses_with(node.args[0])
            n += 1
    return n


def _returns_self(node: fx.Node) -> bool:
    """An in-place op (`x.index_copy_(..)`, `torch.ops.aten.index_put_(x, ..)`), whose result is `x` itself."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("__") \
        and bool(node.args) and isinstance(node.args[0], fx.Node) and val(node) is val(node.args[0]) \
        and val(node) is not None


def _is_alias(node: fx.Node) -> bool:
    if not (node.op == "call_method" and node.target in ("to", "type_as") and node.args
            and isinstance(node.args[0], fx.Node)) or set(node.kwargs) - {"dtype", "device", "non_blocking"}:
        return False
    a, b = val(node.args[0]), val(node)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a is b


def static_rewrites(graph: fx.Graph) -> List[fx.Node]:
    """`buf.copy_(x)` into a fixed-size quantized state that is a graph input (StaticSlidingWindowLayer
    rolls its buffer so): the state quantizes x as it is written (state._copy_); only reported."""
    from ..state import KVState

    return [n for n in graph.nodes if n.op == "call_method" and n.target == "copy_" and n.args
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"
            and isinstance(val(n.args[0]), KVState) and val(n.args[0]).kv_layout.static]


# ---------------------------------------------------------------------------------------------
# the analysis of one update: follow its dims to the attention


def _analyze(upd: CacheUpdate, skip: set) -> None:
    """Fill upd.reads, size_uses, role, logical, heads, note, or set upd.reason."""
    cache = upd.cache
    labels: Dict[fx.Node, Labels] = {cache: cache_labels(cache)}
    sizes = slot_sizes(cache)
    node = cache.next
    while node.op != "output":
        inputs = [a for a in node.all_input_nodes if a in labels]
        if inputs and node not in skip:
            reason = _visit(upd, node, inputs, labels, sizes)
            if reason:
                upd.reason = reason
                return
        node = node.next
    extra = [a for a in node.all_input_nodes if a in labels and a is not cache and a not in skip]
    if extra:
        upd.reason = f"{describe(extra[0])}, computed from it, is a graph output"
        return
    if not upd.reads:
        upd.reason = NO_ATTENTION
        return
    upd.reason = _roles(upd, sizes) or _cross_attention(upd)


def _visit(upd: CacheUpdate, node: fx.Node, inputs: List[fx.Node], labels: Dict[fx.Node, Labels],
           sizes: Dict) -> Optional[str]:
    """Classify one node that reads the cache or a tensor derived from it."""
    cache = upd.cache
    if (_is_call(node, fns={getattr}) and node.args[1] in _SIZE_ATTRS) or \
            (node.op == "call_method" and node.target in _SIZE_METHODS):
        if node.args[0] is cache:
            upd.size_uses.append(node)
        return None
    read = _read(node, inputs, labels)
    if isinstance(read, str):
        return read
    if read is not None:
        upd.reads.append(read)
        return None
    src = inputs[0]
    out = propagate(node, src, labels[src], sizes, labels)
    if out is None:
        return f"it is used by {describe(node)}, which is not a layout, value or attention op kvcompile understands"
    labels[node] = out
    return None


def _read(node: fx.Node, inputs: List[fx.Node], labels: Dict[fx.Node, Labels]):
    """A Read if `node` is an attention op reading a cache-derived input, a reason if it reads one the
    wrong way, None if it is no attention op."""
    if _is_call(node, fns=_SDPA):
        a = sdpa_args(node)
        slots = [s for s in ("query", "key", "value") if a.get(s) in inputs]
        if slots not in (["key"], ["value"]):
            return f"it is passed to {describe(node)} as the {' and '.join(slots)}"
        operand = a[slots[0]]
        return Read("sdpa", node, operand, labels[operand], slot=slots[0], other=a.get("query"))
    if _is_matmul(node) or _is_baddbmm(node):
        kind = "matmul" if _is_matmul(node) else "baddbmm"
        if kind == "matmul":
            lhs, rhs = node.args[0], node.args[1]
        else:  # torch.baddbmm(input, batch1, batch2) or input.baddbmm(batch1, batch2), by name or position
            args = dict(zip(("input", "batch1", "batch2"), node.args))
            args.update(node.kwargs)
            lhs, rhs = args.get("batch1"), args.get("batch2")
            if args.get("input") in inputs:
                return f"it is the bias of {describe(node)}"
        if lhs in inputs or rhs not in inputs:
            return f"it is the left operand of {describe(node)} (attention reads the cache on the right: q @ K^T, P @ V)"
        return Read(kind, node, rhs, labels[rhs], other=lhs)
    if _is_call(node, fns={torch.einsum}):
        ops = node.args[1:] if len(node.args) > 2 else tuple(node.args[1])
        if len(ops) != 2 or sum(o in inputs for o in ops) != 1 or not isinstance(node.args[0], str):
            return f"it is read by {describe(node)}, an einsum kvcompile does not read as attention"
        k = 0 if ops[0] in inputs else 1
        return Read("einsum", node, ops[k], labels[ops[k]], other=ops[1 - k])
    return None


# ---------------------------------------------------------------------------------------------
# roles: which atom holds the tokens, heads, head dim, batch


def _letters_of(read: Read, t_atom) -> Tuple[Optional[Dict], str]:
    """{atom: letter} for the cache atoms the read sees, and the read's slot ("qk" / "pv" for matmuls), or
    (None, reason)."""
    dims = read.labels.dims
    if read.kind == "sdpa":
        if len(dims) != 4:
            return None, f"{describe(read.node)} reads a {len(dims)}-D tensor"
        b, h, t, d = dims
        got = {}
        if b != (UNIT,):
            if len(b) != 1:
                return None, f"its batch dim is {b} in {describe(read.node)}"
            got[b[0]] = "b"
        heads = [a for a in h if a[0] == "c"]
        if len(heads) > 1 or any(a[0] not in ("c", "r", "u") for a in h) or (h and h[0][0] == "r"):
            return None, f"its heads reach {describe(read.node)} as {h}"
        if heads:
            got[heads[0]] = "h"
        if len(t) != 1 or len(d) != 1 or t[0][0] != "c" or d[0][0] != "c":
            return None, f"its tokens and head dim reach {describe(read.node)} as {t} and {d}"
        got[t[0]], got[d[0]] = "t", "d"
        return got, read.slot
    if read.kind in ("matmul", "baddbmm"):
        if len(dims) < 2:
            return None, f"{describe(read.node)} reads a vector"
        last, second = dims[-1], dims[-2]
        if t_atom is not None:  # the tokens axis is known (the cat's): qk reads K^T, pv reads V
            if last not in ((t_atom,), ) and second not in ((t_atom,), ):
                return None, f"{describe(read.node)} does not contract or return the cache's tokens axis"
            qk = last == (t_atom,)
        else:  # a fresh cache: the probabilities (a softmax) multiply the values
            qk = not _from_softmax(read.other)
        slot, t, d = ("qk", last, second) if qk else ("pv", second, last)
        if len(t) != 1 or len(d) != 1 or d[0][0] != "c":
            return None, f"its tokens and head dim reach {describe(read.node)} as {t} and {d}"
        got = {t[0]: "t", d[0]: "d"}
        lead = [a for dd in dims[:-2] for a in dd if a != UNIT]
        cache_atoms = [a for a in lead if a[0] == "c"]
        if any(a[0] not in ("c", "r") for a in lead) or len(cache_atoms) > 2 or \
                ("r" in [a[0] for a in lead] and lead[-1][0] != "r"):
            return None, f"its leading dims reach {describe(read.node)} as {dims[:-2]}"
        repeated = bool(lead) and lead[-1][0] == "r"
        if len(cache_atoms) == 2:
            got[cache_atoms[0]], got[cache_atoms[1]] = "b", "h"
        elif len(cache_atoms) == 1:
            got[cache_atoms[0]] = "h" if repeated else "b"
        return got, slot
    if read.kind == "einsum":
        return _einsum_letters(read, t_atom)
    return None, f"{describe(read.node)}"


def _einsum_letters(read: Read, t_atom) -> Tuple[Optional[Dict], str]:
    eq = read.node.args[0].replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None, f"the einsum {eq!r} of {describe(read.node)} has no explicit output"
    ins, out = eq.split("->")
    subs = ins.split(",")
    ops = read.node.args[1:] if len(read.node.args) > 2 else tuple(read.node.args[1])
    k = 0 if ops[0] is read.operand else 1
    ks, xs = subs[k], subs[1 - k]
    dims = read.labels.dims
    if len(ks) != len(dims) or any(len(d) != 1 for d in dims) or len(set(ks)) != len(ks):
        return None, f"the einsum {eq!r} of {describe(read.node)} reads the cache's dims merged or repeated"
    atoms = dict(zip(ks, (d[0] for d in dims)))
    contracted = [c for c in ks if c in xs and c not in out]
    kept = [c for c in ks if c in out and c not in xs]
    shared = [c for c in ks if c in xs and c in out]
    if len(contracted) != 1 or len(kept) != 1 or any(atoms[c][0] != "c" for c in contracted + kept):
        return None, f"the einsum {eq!r} of {describe(read.node)} is not q K^T or P V over the cache"
    # qk: contracts the head dim, keeps the tokens; pv: contracts the tokens, keeps the head dim
    if t_atom is not None:
        qk = atoms[kept[0]] == t_atom
    else:
        qk = not _from_softmax(read.other)
    t, d = (kept[0], contracted[0]) if qk else (contracted[0], kept[0])
    got = {atoms[t]: "t", atoms[d]: "d"}
    lead = [c for c in ks if c in shared and atoms[c] != UNIT]
    if len(lead) > 2 or any(atoms[c][0] != "c" for c in lead):
        return None, f"the einsum {eq!r} of {describe(read.node)} has more than batch and heads beside"
    if len(lead) == 2:
        got[atoms[lead[0]]], got[atoms[lead[1]]] = "b", "h"
    elif lead:
        got[atoms[lead[0]]] = "b"
    # the other operand: [lead..., l, x] (x: d for qk, t for pv); the output: [lead..., l, t or d]
    ls = [c for c in xs if c not in ks]
    if len(ls) != 1 or set(xs) != set(lead) | {ls[0], d if qk else t} or set(out) != set(lead) | {ls[0], t if qk else d}:
        return None, f"the einsum {eq!r} of {describe(read.node)} is not q K^T or P V over the cache"
    order = lead + [ls[0], d if qk else t]
    read.x_perm = tuple(xs.index(c) for c in order)
    canon = lead + [ls[0], t if qk else d]
    read.out_perm = tuple(canon.index(c) for c in out)
    return got, "qk" if qk else "pv"


def _from_softmax(node: Any, depth: int = 6) -> bool:
    """Whether `node` is (a cast, dropout or copy of) a softmax: attention's probabilities."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        if (node.op == "call_function" and getattr(node.target, "__name__", "") in ("softmax", "_softmax")) or \
                (node.op == "call_method" and node.target == "softmax"):
            return True
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def _roles(upd: CacheUpdate, sizes: Dict) -> Optional[str]:
    """Agree the reads' letters into the cache's logical layout; decide each read's route."""
    t_atom = ("c", upd.axis, 0) if upd.axis is not None else None
    letters: Dict = {}
    roles = set()
    for read in upd.reads:
        got, slot = _letters_of(read, t_atom)
        if got is None:
            return slot
        for atom, letter in got.items():
            if letters.setdefault(atom, letter) != letter:
                return f"its dim {atom[1]} is read as {letters[atom]} and as {letter} by different attention ops"
        if read.kind != "sdpa":
            read.slot = slot
        roles.add("k" if read.slot in ("key", "qk") else "v")
    if len(roles) != 1:
        return "it is read both as keys and as values"
    upd.role = roles.pop()
    if sorted(letters.values()) != sorted(set(letters.values())):
        return f"two of its dims are read as the same thing ({sorted(letters.values())})"
    # every atom of the cache has a letter: the layout, one group per dim of the cache
    groups = []
    for slot in range(rank(upd.cache)):
        parts = [a for a in letters if a[1] == slot]
        whole = ("c", slot, 0)
        if whole in letters and len(parts) == 1:
            groups.append(letters[whole])
        elif sorted(parts) == [("c", slot, 1), ("c", slot, 2)]:
            pair = letters[("c", slot, 1)] + letters[("c", slot, 2)]
            if pair not in ("hd", "bh"):
                return f"its dim {slot} merges {pair[0]} and {pair[1]}, which kvcompile does not store"
            groups.append(f"({pair})")
        elif not parts and known_equal(sizes[whole], 1):
            return f"its dim {slot} has size 1 and no role in attention"
        else:
            return f"attention reads its dim {slot} in parts kvcompile cannot follow"
    if t_atom is not None and letters.get(t_atom) != "t":
        return (f"it grows along dim {upd.axis}, but attention reads its tokens along another dim "
                f"(a cat along the batch or heads, not a cache)")
    upd.logical = "".join(groups)
    h_atoms = [a for a, c in letters.items() if c == "h"]
    upd.heads = int(sizes[h_atoms[0]]) if h_atoms and isinstance(sizes[h_atoms[0]], int) else 0
    if any(len(g) > 1 for g in groups) and not upd.heads:
        return "its heads are merged with another dim and their number is not known"
    # routes: fused where attention reads a layout view of the cache in a form the ops take
    why = set()
    for read in upd.reads:
        read.prefix = {letters.get(atom, "?"): stop for atom, stop in read.labels.prefix}
        read.fused, read.why_dequantized = _fusable(read, upd.kind)
        if not read.fused:
            why.add(read.why_dequantized)
    if why:
        upd.note = f"attention reads it dequantized ({'; '.join(sorted(why))})"
    return None


def _fusable(read: Read, kind: str) -> Tuple[bool, str]:
    if read.prefix and (kind != "static" or set(read.prefix) - {"t", "b"}):
        return False, "attention reads a part of it" if kind == "static" else "attention reads a prefix of it"
    if read.labels.valued:
        return False, read.labels.valued
    if read.labels.scaled:
        return False, "it is scaled before attention"
    if read.kind == "baddbmm":
        return False, "its attention is a baddbmm (scores added to a bias)"
    if read.kind == "matmul":
        if not _query_lines_up(read):
            return False, "the query's leading dims do not line up with the cache's"
        return True, ""
    return True, ""


def _query_lines_up(read: Read) -> bool:
    """matmul: the other operand's leading dims, flattened, run (batch, heads, repeats) as the cache's do:
    the same number of leading dims, each of the cache's a unit (broadcast: a repeat) or the same size."""
    x, k = shape(read.other), shape(read.operand)
    if x is None or k is None or len(x) != len(k):
        return False
    return all(known_equal(a, b) or known_equal(b, 1) for a, b in zip(x[:-2], k[:-2]))


# ---------------------------------------------------------------------------------------------
# across updates


def _partners(updates: List[CacheUpdate]) -> None:
    """SDPA reads keys and values at once: it is fused only if both are fused reads of matched updates."""
    fused = {}
    for upd in updates:
        if upd.matched:
            for read in upd.reads:
                if read.kind == "sdpa":
                    fused.setdefault(read.node, {})[read.slot] = read.fused
    for upd in updates:
        if not upd.matched:
            continue
        for read in upd.reads:
            if read.kind == "sdpa" and read.fused and not all(fused[read.node].get(s) for s in ("key", "value")):
                read.fused = False
                read.why_dequantized = "its attention partner is not read from a quantized cache"
                upd.note = upd.note or f"attention reads it dequantized ({read.why_dequantized})"


def _query_len(read: Read):
    out = shape(read.node)
    if read.kind == "einsum":
        return out[list(read.out_perm).index(len(read.out_perm) - 2)] if read.out_perm else None
    return out[-2] if out is not None and len(out) >= 2 else None


def _cross_attention(upd: CacheUpdate) -> Optional[str]:
    """In self-attention every appended token is also a query: the tokens appended equal the query
    length of each attention reading the cache. Otherwise the keys and values come from another
    sequence (an encoder-decoder's cross-attention): left alone."""
    if upd.kind == "static":
        return None
    new = shape(upd.new)
    n = new[upd.axis] if upd.axis is not None else new[logical_dims(upd.logical).index("t")]
    for read in upd.reads:
        q = _query_len(read)
        if q is None or not known_equal(n, q):
            return (f"it appends {n} tokens while {describe(read.node)} has {q} queries: keys and values from "
                    f"another sequence (cross-attention), which kvcompile leaves alone")
    return None



def count_attention_ops(graph: fx.Graph) -> Tuple[int, int]:
    """(sdpa calls, matmuls): what attention there is in the graph, for the report."""
    sdpa = sum(1 for n in graph.nodes if _is_call(n, fns=_SDPA))
    mm = sum(1 for n in graph.nodes if (_is_matmul(n) or _is_baddbmm(n) or _is_call(n, fns={torch.einsum}))
             and rank(n) in (3, 4))
    return sdpa, mm
