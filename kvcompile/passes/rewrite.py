"""Rewrite matched cache updates and their attention into kvcompile ops (see match.py).

Prefill (the past is not a KVState: the in-graph empty tensor of a lazily initialised cache, or a
full-precision tensor): attention keeps reading the full-precision `cat` (prefill attention is full
precision); the graph output becomes `kv_store(cat)`, the quantized state.

Decode (the past is a KVState graph input):
    cat(past, new)               -> s1 = kv_append(past, new)     (new tokens join the residual)
    attention over cat           -> kv_sdpa / kv_qk / kv_pv over s1 (reads the packed state)
    graph output cat             -> s2 = kv_compact(s1)           (quantize what leaves the window)
    size queries of cat          -> the same queries of s1 (same logical shape)

A fixed-size buffer written in place (StaticCache: match.find_static_updates), for methods that
quantize each token on its own (methods.static_reason):
    zeros buffer (prefill)       -> kv_static_empty(buffer): a state of the same fixed size
    buf.index_copy_(2, pos, new) -> kv_static_write(buf, 2, pos, new)  (quantized as written)
    attention over buf (decode)  -> kv_sdpa / kv_qk / kv_pv over buf
Prefill attention reads a slice of the state (dequantized: correct, not fused).

A sliding-window layer returns `cat[:, :, start:]` instead of `cat` (match.py): prefill stores that
slice, `kv_store(cat[:, :, start:])`; decode returns `kv_compact(kv_window(s1, start))`, the order
of transformers' own layer (slice, then the cache's bookkeeping).
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import torch.fx as fx
from torch._dynamo.utils import counters

from ..config import Config
from ..methods import layouts, static_reason
from ..report import Entry, GraphReport, KVQuantWarning, log, new_report
from ..state import (KVState, kv_append, kv_compact, kv_pv, kv_qk, kv_sdpa, kv_static_empty, kv_static_write, kv_store,
                     kv_window)
from .match import (CacheUpdate, _strip_repeat, count_attention_ops, describe, find_cache_updates, find_static_updates,
                    sdpa_args, static_rewrites, val)

_ROLE = {"k": "keys", "v": "values"}


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _chain_nodes(cat: fx.Node, stop: set) -> List[fx.Node]:
    """Nodes between `cat` and its attention uses (repeat_kv and transpose), to clean up."""
    out, todo = [], [cat]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op in ("call_method", "call_function") and u not in stop and u not in out:
                out.append(u)
                todo.append(u)
    return out


def rewrite(gm: fx.GraphModule, config: Config) -> GraphReport:
    """Rewrite `gm` in place; return what was done. Raises ValueError if the options cannot fit a
    matched layer (e.g. a group size that does not divide its head_dim)."""
    graph = gm.graph
    report = new_report(config.method)
    report.sdpa_ops, report.matmul_ops = count_attention_ops(graph)
    updates = find_cache_updates(graph)
    static = find_static_updates(graph)
    if config.method == "none" and static:  # fixed-size buffers stay as they are: nothing to store differently
        report.notes.append(f"method none: {len(static)} fixed-size cache buffer(s) written in place kept as they are")
    else:
        updates += static
    output = _output_node(graph)
    states: Dict[fx.Node, fx.Node] = {}  # decode: cat -> kv_append node
    entries: Dict[fx.Node, Entry] = {}
    attention_nodes = {use.node for u in updates if u.matched for use in u.uses}

    for upd in updates:
        if not upd.matched:
            entries[upd.cat] = Entry(upd.cat.name, _ROLE.get(upd.role), "left alone", reason=upd.reason)
            continue
        head_dim = val(upd.cat).shape[-1]
        k_layout, v_layout = layouts(config, int(head_dim))
        layout = k_layout if upd.role == "k" else v_layout
        if upd.write is not None:
            entries[upd.cat] = _rewrite_static(graph, upd, config, (k_layout, v_layout), layout, states)
            continue
        returned = upd.cat if upd.window is None else upd.window  # the graph output the cache keeps
        where = "" if upd.window is None else f", sliding window: keeps cat[:, :, {upd.window_start}:]"
        if upd.window is not None:
            layout = layout._replace(window=True)
        if upd.past is not None and isinstance(val(upd.past), KVState):
            with graph.inserting_after(upd.cat):
                s1 = graph.call_function(kv_append, (upd.past, upd.new))
            last = s1
            if upd.window is not None:
                with graph.inserting_after(last):
                    last = graph.call_function(kv_window, (s1, upd.window_start))
            with graph.inserting_after(last):
                s2 = graph.call_function(kv_compact, (last,))
            output.replace_input_with(returned, s2)
            for n in upd.size_uses:
                n.replace_input_with(upd.cat, s1)
            states[upd.cat] = s1
            entries[upd.cat] = Entry(upd.cat.name, _ROLE[upd.role], f"quantized (decode: fused attention{where})")
        else:
            with graph.inserting_after(returned):
                st = graph.call_function(kv_store, (returned, layout))
            output.replace_input_with(returned, st)
            entries[upd.cat] = Entry(upd.cat.name, _ROLE[upd.role], f"quantized (prefill: stored{where})")
        counters["kvquant"]["cache_updates_quantized"] += 1

    done = set()
    for upd in updates:
        if upd.cat not in states:
            continue
        for use in upd.uses:
            node = use.node
            if node in done:
                continue
            done.add(node)
            if use.kind == "sdpa" and not all(_strip_repeat(sdpa_args(node)[r]) in states for r in ("key", "value")):
                continue  # a partner read through a slice (static prefill): runs on the dequantized state
            with graph.inserting_before(node):
                if use.kind == "sdpa":
                    a = sdpa_args(node)
                    kw = {k: a[k] for k in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa") if k in a}
                    k_s = states[_strip_repeat(a["key"])]
                    v_s = states[_strip_repeat(a["value"])]
                    new = graph.call_function(kv_sdpa, (a["query"], k_s, v_s), kw)
                elif use.kind == "qk":
                    new = graph.call_function(kv_qk, (node.args[0], states[upd.cat]))
                else:
                    new = graph.call_function(kv_pv, (node.args[0], states[upd.cat]))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "stack_trace")})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            entries[upd.cat].attention.append(f"{use.kind} {node.name}")
            counters["kvquant"]["attention_rewritten"] += 1

    # remove the now-dead cats, repeat_kv chains and transposes
    for upd in updates:
        if upd.cat in states:
            for n in reversed([upd.cat] + _chain_nodes(upd.cat, attention_nodes)):
                if not n.users and n.graph is graph and n.target is not kv_static_write:
                    graph.erase_node(n)
    graph.lint()
    gm.recompile()

    report.entries = [entries[u.cat] for u in updates] + [
        Entry(n.args[0].name, None, "quantized (static buffer rewritten whole, e.g. a rolled sliding window: every "
              "token quantized again as written; attention reads it dequantized)") for n in static_rewrites(graph)]
    _finish(report)
    return report


def _rewrite_static(graph: fx.Graph, upd: CacheUpdate, config: Config, both, layout, states) -> Entry:
    """Rewrite a static update (module docstring); the report entry says what was done or why not."""
    role = _ROLE[upd.role]
    reason = static_reason(config, both)
    buf = val(upd.cat)
    if reason is None and upd.past is not None and not (isinstance(buf, KVState) and buf.kv_layout.static):
        reason = ("it is written in place into a full-precision buffer created outside the compiled code (a module "
                  "buffer, or a cache whose prefill ran uncompiled, as generate()'s own compile does), and a graph "
                  "cannot swap a buffer it does not return; kvcompile quantizes a fixed-size cache only where the "
                  "compiled code creates it (transformers' StaticCache under model.compile / torch.compile(model))")
    if reason is not None:
        return Entry(upd.cat.name, role, "left alone", reason=reason)
    target = upd.cat
    if upd.past is None:  # prefill: the zero-filled buffer becomes a fixed-size state
        with graph.inserting_after(upd.cat):
            target = graph.call_function(kv_static_empty, (upd.cat, layout._replace(static=True)))
        upd.cat.replace_all_uses_with(target, delete_user_cb=lambda n: n is not target)
    with graph.inserting_before(upd.write):
        graph.call_function(kv_static_write, (target, *upd.write.args[1:]))
    graph.erase_node(upd.write)
    counters["kvquant"]["cache_updates_quantized"] += 1
    if upd.past is None:
        return Entry(upd.cat.name, role, "quantized (prefill: static buffer, tokens quantized as written)")
    if upd.sliced:
        return Entry(upd.cat.name, role, "quantized (decode: static buffer; attention reads a slice of it, dequantized)")
    states[upd.cat] = upd.cat
    return Entry(upd.cat.name, role, "quantized (decode: static buffer, fused attention)")


def _finish(report: GraphReport) -> None:
    counters["kvquant"]["graphs"] += 1
    left = report.left_alone
    counters["kvquant"]["cache_updates_left_alone"] += len(left)
    log.info("kvquant: %s", report.summary())
    log.debug("kvquant:\n%s", report)
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
            "attention found, but no KV-cache update (torch.cat of the cache along the sequence axis, "
            "returned from the graph) feeds it; nothing quantized"
        )
        warnings.warn(
            f"kvquant found attention ({report.sdpa_ops} sdpa, {report.matmul_ops} 4-D matmul) but no "
            f"KV-cache update feeding it (torch.cat along the sequence axis whose result is returned); "
            f"the graph runs unquantized, correctly. kvcompile.explain() has the details.",
            KVQuantWarning,
            stacklevel=2,
        )
