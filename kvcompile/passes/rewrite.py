"""Rewrite matched cache updates and their attention into kvcompile ops (see match.py): one function per
kind of update, then one pass over the reads.

growing, prefill (the past is not a KVState: the in-graph empty tensor of a lazily initialised cache, or
a full-precision tensor) and fresh: attention keeps reading the full-precision tensor (prefill attention
is full precision); the graph output becomes `kv_store(cat)`, the quantized state.

growing, decode (the past is a KVState graph input):
    cat(past, new)               -> s1 = kv_append(past, new)     (new tokens join the residual)
    attention over cat           -> kv_sdpa / kv_qk / kv_pv over s1 (reads the packed state), or
                                    the original ops over kv_full(s1) where they cannot (match.Read.fused)
    graph output cat             -> s2 = kv_compact(s1)           (quantize what leaves the window)
    size queries of cat          -> the same queries of s1 (same logical shape)

sliding: as growing, but the graph returns `cat[..., start:, ...]`: prefill stores that slice; decode
returns `kv_compact(kv_window(s1, start))`, the order of transformers' own layer.

static (a fixed-size buffer written in place at token positions; methods.static_reason):
    zeros buffer made in the graph -> kv_static_empty(buffer): a state of the same fixed size (StaticCache's
                                    lazy init, prefill)
    a plain graph input buffer     -> nothing in this graph: report.swaps, and buffers.py replaces the buffer
                                    by a state of its contents after this call
    a state graph input            -> buf.index_copy_(d, pos, new) -> kv_static_write(buf, d, pos, new),
                                    buf[idx] = new -> kv_static_setitem(buf, idx, new) (quantized as written);
                                    attention over buf, or over a prefix buf[:bsz, :n] -> as growing's reads,
                                    over kv_prefix(buf, bsz, n) (match.Read.prefix)
    with a full-precision window (Layout.overlay: kivi, residual_length > 0), the reads after the write read
    its result instead: a view whose window also holds this step's tokens (state.kv_static_write)
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch.fx as fx
from torch._dynamo.utils import counters

from ..config import Config
from ..layout import logical_dims
from ..methods import layouts, static_reason
from ..report import Entry, GraphReport, KVQuantWarning, log, new_report
from ..state import (KVState, kv_append, kv_compact, kv_full, kv_prefix, kv_pv, kv_qk, kv_sdpa, kv_static_copy,
                     kv_static_empty, kv_static_setitem, kv_static_write, kv_store, kv_window)
from .match import (CacheUpdate, Read, count_attention_ops, find_cache_updates, find_static_updates, fold_aliases,
                    sdpa_args, static_rewrites, val)

_ROLE = {"k": "keys", "v": "values"}


class _Rewriter:
    """One graph's rewrite: the states the reads will use, and the report entries."""

    def __init__(self, gm: fx.GraphModule, config: Config, report: GraphReport):
        self.graph, self.config, self.report = gm.graph, config, report
        self.output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        self.states: Dict[fx.Node, fx.Node] = {}  # cache node -> the state its reads use (decode)
        self.by_operand: Dict[fx.Node, Tuple[CacheUpdate, Read]] = {}  # an sdpa operand -> its update, read
        self.prefixes: Dict[tuple, fx.Node] = {}  # (state, batch, tokens) -> kv_prefix of it
        self.entries: Dict[fx.Node, Entry] = {}

    def call(self, after: fx.Node, fn, args) -> fx.Node:
        with self.graph.inserting_after(after):
            return self.graph.call_function(fn, args)

    def layout(self, upd: CacheUpdate):
        shape = val(upd.cache).shape
        groups = logical_dims(upd.logical)
        d = dict(zip(groups, shape)).get("d")
        if d is None:  # merged with the heads: "(hd)"
            d = next(s for g, s in zip(groups, shape) if "d" in g) // upd.heads
        both = layouts(self.config, int(d))
        lay = both[0] if upd.role == "k" else both[1]
        merged = any(len(g) > 1 and "h" in g for g in groups)  # Layout.heads: only where a dim merges the heads
        return both, lay._replace(logical=upd.logical, heads=upd.heads if merged else 0, window=upd.kind == "sliding")

    def entry(self, upd: CacheUpdate, status: str, reason: Optional[str] = None) -> Entry:
        e = Entry(upd.cache.name, _ROLE.get(upd.role), status, reason=reason)
        self.entries[upd.cache] = e
        return e

    def state(self, upd: CacheUpdate, read: Read) -> fx.Node:
        """The state `read` reads: the update's, or the prefix of it the read takes (match.Read.prefix)."""
        state = self.states[upd.cache]
        if not read.prefix:
            return state
        key = (state, read.prefix.get("b"), read.prefix.get("t"))
        if key not in self.prefixes:
            with self.graph.inserting_before(read.node):
                self.prefixes[key] = self.graph.call_function(kv_prefix, key)
        return self.prefixes[key]

    def where(self, upd: CacheUpdate, lay) -> str:
        out = ""
        if upd.kind == "sliding":
            out += f", sliding window: keeps cat[..., {upd.window_start}:] along the tokens"
        if lay.logical != "bhtd":
            out += f", layout {lay.logical}"
        return out



# ---------------------------------------------------------------------------------------------
# one function per kind of update


def _growing(rw: _Rewriter, upd: CacheUpdate) -> None:
    _, lay = rw.layout(upd)
    where = rw.where(upd, lay)
    past = val(upd.past) if upd.past is not None else None
    if not isinstance(past, KVState):  # prefill: store what the graph returns
        st = rw.call(upd.returned, kv_store, (upd.returned, lay))
        rw.output.replace_input_with(upd.returned, st)
        rw.entry(upd, f"quantized (prefill: stored{where})")
        return
    if past.kv_layout.logical != lay.logical:
        rw.entry(upd, "left alone", reason=f"the cache it continues has layout {past.kv_layout.logical}, this graph "
                                           f"{lay.logical}")
        return
    s1 = rw.call(upd.cache, kv_append, (upd.past, upd.new))
    last = s1 if upd.kind != "sliding" else rw.call(s1, kv_window, (s1, upd.window_start))
    s2 = rw.call(last, kv_compact, (last,))
    rw.output.replace_input_with(upd.returned, s2)
    for n in upd.size_uses:
        n.replace_input_with(upd.cache, s1)
    rw.states[upd.cache] = s1
    held = past.kv_layout
    if held._replace(window=lay.window) != lay:
        rw.report.warnings.append(
            f"{upd.cache.name}: the cache holds {_ROLE[upd.role]} stored as {held.method} ({held.format}, "
            f"{held.bits} bits, group {held.group}, residual {held.residual}), not as these options say "
            f"({lay.method}: {lay.format}, {lay.bits} bits, group {lay.group}, residual {lay.residual}): it "
            f"continues in the format it holds (start a new cache for the new options)")
    rw.entry(upd, f"quantized (decode: {_routes(upd)}{where})")


def _fresh(rw: _Rewriter, upd: CacheUpdate) -> None:
    _, lay = rw.layout(upd)
    st = rw.call(upd.returned, kv_store, (upd.returned, lay))
    rw.output.replace_input_with(upd.returned, st)
    rw.entry(upd, f"quantized (prefill: stored{rw.where(upd, lay)})")


def _static(rw: _Rewriter, upd: CacheUpdate) -> None:
    both, lay = rw.layout(upd)
    lay = lay._replace(static=True)
    reason = static_reason(rw.config, both)
    buf = val(upd.cache)
    if reason is not None:
        rw.entry(upd, "left alone", reason=reason)
        return
    if upd.past is not None and not isinstance(buf, KVState):  # a buffer from outside the graph: swap it
        inputs = [n for n in rw.graph.nodes if n.op == "placeholder"]
        rw.report.swaps.append((inputs.index(upd.cache), lay))
        rw.entry(upd, f"quantized from the next call (a buffer written in place: replaced by a fixed-size state "
                      f"holding its contents quantized, after this call, which runs in full precision"
                      f"{rw.where(upd, lay)})")
        return
    graph, target = rw.graph, upd.cache
    if upd.past is None:  # prefill: the zero-filled buffer becomes a fixed-size state
        target = rw.call(upd.cache, kv_static_empty, (upd.cache, lay))
        upd.cache.replace_all_uses_with(target, delete_user_cb=lambda n: n is not target)
    how, at = upd.write_at
    with graph.inserting_before(upd.write):
        if how == "positions":  # index_copy_, index_put_
            wrote = graph.call_function(kv_static_write, (target, upd.axis, at, upd.new))
        else:
            wrote = graph.call_function(kv_static_setitem, (target, at, upd.new))
    graph.erase_node(upd.write)
    read = wrote if lay.overlay else target  # a window: the step reads the write's view (kv_static_write)
    if upd.past is None:
        if lay.overlay:  # the prefill's reads, dequantized
            _read_after(graph, target, wrote)
        rw.entry(upd, f"quantized (prefill: static buffer, tokens quantized as written{_window(lay)}"
                      f"{rw.where(upd, lay)})")
        return
    rw.states[upd.cache] = read
    rw.entry(upd, f"quantized (decode: static buffer{_window(lay)}, {_routes(upd)}{rw.where(upd, lay)})")


def _window(lay) -> str:
    return f", a full-precision window of {lay.residual} tokens" if lay.overlay else ""


_REWRITES = {"growing": _growing, "sliding": _growing, "fresh": _fresh, "static": _static}


def _routes(upd: CacheUpdate) -> str:
    fused = [r for r in upd.reads if r.fused]
    if len(fused) == len(upd.reads):
        return "fused attention"
    return ("attention reads it dequantized" if not fused else "fused attention and a dequantized read") + \
        f": {sorted({r.why_dequantized for r in upd.reads if not r.fused})[0]}"


# ---------------------------------------------------------------------------------------------
# the reads


def _rewrite_reads(rw: _Rewriter, updates: List[CacheUpdate]) -> None:
    """Fused reads become kvquant ops over the states; the other reads of a decode update read kv_full."""
    graph, done = rw.graph, set()
    for upd in updates:
        state = rw.states.get(upd.cache)
        if state is None:
            continue
        for read in upd.reads:
            node = read.node
            if not read.fused or node in done:
                continue
            if read.kind == "sdpa":
                a = sdpa_args(node)
                partners = [rw.by_operand.get(a[s]) for s in ("key", "value")]
                if any(p is None or p[0].cache not in rw.states for p in partners):
                    read.fused = False
                    continue
                kw = {k: a[k] for k in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa") if k in a}
                states = [rw.state(*p) for p in partners]
                with graph.inserting_before(node):
                    new = graph.call_function(kv_sdpa, (a["query"], *states), kw)
            else:
                fn = kv_qk if read.slot == "qk" else kv_pv
                state_read = rw.state(upd, read)
                with graph.inserting_before(node):
                    new = graph.call_function(fn, (read.other, state_read, read.x_perm, read.out_perm))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "stack_trace")})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            done.add(node)
            rw.entries[upd.cache].attention.append(f"{read.kind} {node.name}")
            counters["kvquant"]["attention_rewritten"] += 1
        _clean(graph, upd.cache)
        # whatever still reads the cache (dequantized reads, a prefix) reads its full-precision value
        ours = (kv_static_write, kv_static_setitem, kv_append, kv_sdpa, kv_qk, kv_pv, kv_prefix)  # (a static
        # state is its cache node)
        users = [u for u in upd.cache.users if u is not rw.output and u not in upd.size_uses
                 and u is not upd.returned and u.target not in ours]
        order = {n: i for i, n in enumerate(graph.nodes)}
        if state is not upd.cache:  # a static view (a write's result): what comes before it reads the state
            users = [u for u in users if order[u] > order[state]]
        if users:
            with graph.inserting_before(min(users, key=order.__getitem__)):
                full = graph.call_function(kv_full, (state,))
            for u in users:
                u.replace_input_with(upd.cache, full)
        if not upd.cache.users and upd.cache.op != "placeholder":
            graph.erase_node(upd.cache)


def _rewrite_whole(graph: fx.Graph, node: fx.Node) -> str:
    """`state.copy_(x)` -> kv_static_copy(state, x), and what reads the state after it reads its result (with a
    full-precision window, the view holding x: kv_static_write). Returns the state's name."""
    state, src = node.args[:2]
    with graph.inserting_before(node):
        wrote = graph.call_function(kv_static_copy, (state, src))
    node.replace_all_uses_with(wrote)
    graph.erase_node(node)
    _read_after(graph, state, wrote)
    return state.name


def _read_after(graph: fx.Graph, state: fx.Node, wrote: fx.Node) -> None:
    """What uses `state` after the write `wrote` (but the graph's output: the state itself) uses `wrote`."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for u in list(state.users):
        if u.op != "output" and u is not wrote and order[u] > order[wrote]:
            u.replace_input_with(state, wrote)


def _clean(graph: fx.Graph, start: fx.Node) -> None:
    """Erase what the fused reads left dead between the cache and them (repeat_kv, transposes)."""
    order, todo = [], [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op in ("call_method", "call_function") and u not in order:
                order.append(u)
                todo.append(u)
    for n in reversed(order):
        if not n.users and n.graph is graph and n.op != "output" and n.target not in (
                kv_compact, kv_append, kv_window, kv_full, kv_store, kv_static_empty, kv_static_write, kv_static_setitem,
                kv_static_copy):
            graph.erase_node(n)


def rewrite(gm: fx.GraphModule, config: Config, graph_break: Optional[str] = None) -> GraphReport:
    """Rewrite `gm` in place; return what was done. Raises KVQuantOptionError if the options cannot fit a
    matched layer (e.g. a group size that does not divide its head_dim). `graph_break`: where and why
    Dynamo ended this graph early (backend._graph_break), named when it leaves an update unread."""
    graph = gm.graph
    fold_aliases(graph)
    report = new_report(config.method)
    report.sdpa_ops, report.matmul_ops = count_attention_ops(graph)
    updates = find_cache_updates(graph, graph_break)
    static = find_static_updates(graph)
    if config.method == "none" and static:  # fixed-size buffers stay as they are: nothing to store differently
        report.notes.append(f"method none: {len(static)} fixed-size cache buffer(s) written in place kept as they are")
    else:
        updates += static
    rw = _Rewriter(gm, config, report)
    for upd in updates:
        for read in upd.reads:
            if upd.matched and read.kind == "sdpa":
                rw.by_operand[read.operand] = (upd, read)
    for upd in updates:
        if not upd.matched:
            rw.entry(upd, "left alone", reason=upd.reason)
            continue
        _REWRITES[upd.kind](rw, upd)
        if rw.entries[upd.cache].status != "left alone":
            counters["kvquant"]["cache_updates_quantized"] += 1
            if upd.note:
                report.notes.append(f"{upd.cache.name}: {upd.note}")
    _rewrite_reads(rw, [u for u in updates if u.matched])
    whole = [_rewrite_whole(graph, n) for n in static_rewrites(graph)]
    graph.lint()
    gm.recompile()
    report.entries = [rw.entries[u.cache] for u in updates] + [
        Entry(name, None, "quantized (static buffer rewritten whole, e.g. a rolled sliding window: every "
              "token quantized again as written; attention reads it dequantized)") for name in whole]
    _finish(report)
    return report


def _finish(report: GraphReport) -> None:
    counters["kvquant"]["graphs"] += 1
    left = report.left_alone
    counters["kvquant"]["cache_updates_left_alone"] += len(left)
    log.info("kvquant: %s", report.summary())
    log.debug("kvquant:\n%s", report)
    for text in report.warnings:
        warnings.warn(f"kvquant: {text}", KVQuantWarning, stacklevel=2)
    if left:
        reasons = "; ".join(f"{e.node}: {e.reason}" for e in left)
        warnings.warn(
            f"kvquant left {len(left)} cache update(s) unquantized (they run in full precision, "
            f"correctly): {reasons}. kvcompile.explain() has the details.",
            KVQuantWarning,
            stacklevel=2,
        )
    elif not report.entries and not report.notes and (report.sdpa_ops or report.matmul_ops):
        report.notes.append(
            "attention found, but no KV-cache update (a tensor grown along its tokens and returned from the "
            "graph, or a buffer written in place) feeds it; nothing quantized"
        )
        warnings.warn(
            f"kvquant found attention ({report.sdpa_ops} sdpa, {report.matmul_ops} matmul) but no KV-cache "
            f"update feeding it (a tensor grown along its tokens and returned from the graph, or a buffer written "
            f"in place); the graph runs unquantized, correctly. kvcompile.explain() has the details.",
            KVQuantWarning,
            stacklevel=2,
        )
