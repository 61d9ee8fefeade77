"""Find KV-cache updates and the attention that reads them, in a Dynamo (torch-level) FX graph.

A cache update is `torch.cat([past, new], dim=-2)` of 4-D tensors [B, H, T, D] whose result is a
graph output (so Dynamo writes it back into the cache object). It is matched when every other use
of the result is one of:

  * F.scaled_dot_product_attention, as key or value           -> "sdpa" use
  * transpose(-1, -2) -> matmul(query, .)                      -> "qk" use  (eager attention)
  * matmul(probs, .)                                           -> "pv" use  (eager attention)
  * a size query (size(), .shape, dim())                        -> left as is
each optionally through repeat_kv (`x[:, :, None]` -> expand -> reshape). The intermediates must
have no other users. The tokens appended must be the attention's queries (self-attention; an
encoder-decoder's cross-attention appends the encoder's tokens and is left alone). Anything else
leaves the update alone, with the reason recorded.

A sliding-window cache layer returns only the newest tokens of the `cat`: `cat[:, :, start:]`
(transformers' DynamicSlidingWindowLayer: start = -(window - 1)) is the graph output, while attention
reads the whole `cat`. It is matched the same way, with the slice recorded (`window`).

A fixed-size buffer written in place (transformers' StaticCache: `buf.index_copy_(2, pos, new)`, then
attention reads `buf`) is a static update (`find_static_updates`): `cat` is the buffer (a zero-filled
tensor created in the graph at prefill, a graph input at decode), `write` the index_copy_.

A cache created without a cat (a hand-written decoder's first call returns its K and V as they are)
is matched the same way: a returned 4-D tensor whose every use is one of the above.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

_CAT = {torch.cat, torch.concat, torch.concatenate}
_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_MATMUL = {torch.matmul, operator.matmul}
_SIZE_METHODS = {"size", "dim"}
_SIZE_ATTRS = {"shape", "dtype", "device", "ndim"}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def val(node: fx.Node):
    """The example value Dynamo recorded for a node (a FakeTensor), or None."""
    return node.meta.get("example_value", node.meta.get("val"))


def rank(node) -> Optional[int]:
    v = val(node) if isinstance(node, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else None


def describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def sdpa_args(node: fx.Node) -> Dict[str, object]:
    """F.scaled_dot_product_attention's arguments by name."""
    out = dict(zip(_SDPA_ARGS, node.args))
    out.update(node.kwargs)
    return out


@dataclass
class Use:
    kind: str  # "sdpa" | "qk" | "pv"
    node: fx.Node  # the attention op (sdpa) or matmul to replace
    role: str  # "k" | "v"


@dataclass
class CacheUpdate:
    cat: fx.Node  # the cat, or for a fresh cache the returned tensor itself
    past: Optional[fx.Node]  # None for a fresh cache
    new: fx.Node
    role: Optional[str] = None
    uses: List[Use] = field(default_factory=list)
    size_uses: List[fx.Node] = field(default_factory=list)
    reason: Optional[str] = None  # why it is left alone; None if matched
    window: Optional[fx.Node] = None  # sliding window: the returned `cat[:, :, start:]`
    window_start: int = 0
    write: Optional[fx.Node] = None  # static buffer: its index_copy_
    sliced: bool = False  # static buffer: some attention reads a slice of it (prefill)

    @property
    def matched(self) -> bool:
        return self.reason is None


def _is_call(node: fx.Node, method: Optional[str] = None, fns=None) -> bool:
    if method is not None:
        return node.op == "call_method" and node.target == method
    return node.op == "call_function" and node.target in fns


def _is_last_two_transpose(node: fx.Node) -> bool:
    if not (_is_call(node, "transpose") or _is_call(node, fns={torch.transpose})):
        return False
    dims = node.args[1:3]
    r = rank(node.args[0])
    if len(dims) != 2 or r is None or not all(isinstance(d, int) for d in dims):
        return False
    return sorted(d % r for d in dims) == [r - 2, r - 1]


_NOOP_METHODS = {"to", "float", "type", "contiguous"}


def _is_noop_cast(node: fx.Node, src: fx.Node) -> bool:
    """A dtype cast or contiguous() of `src` that changes nothing (same dtype and shape)."""
    if not (node.op == "call_method" and node.target in _NOOP_METHODS and node.args and node.args[0] is src):
        return False
    a, b = val(src), val(node)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape


def _repeat_kv_end(node: fx.Node) -> Optional[fx.Node]:
    """If `node` is `x[:, :, None]` starting repeat_kv (-> expand -> reshape), the reshape node."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    idx = node.args[1]
    full = slice(None, None, None)
    if not (isinstance(idx, tuple) and len(idx) >= 3 and idx[0] == full and idx[1] == full and idx[2] is None):
        return None
    if not all(i == full or i is Ellipsis for i in idx[3:]):
        return None
    (expand,) = node.users if len(node.users) == 1 else (None,)
    if expand is None or not _is_call(expand, "expand"):
        return None
    (reshape,) = expand.users if len(expand.users) == 1 else (None,)
    if reshape is None or not (_is_call(reshape, "reshape") or _is_call(reshape, "view")):
        return None
    return reshape


def _classify_users(src: fx.Node, upd: CacheUpdate, top: bool) -> Optional[str]:
    """Record the attention uses of `src` in `upd`; return a reason if a use is not understood."""
    for user in src.users:
        if top and (user is upd.window or user is upd.write):
            continue
        if top and upd.write is not None and _head_slice(user, src):  # static prefill reads buf[:, :, :n]
            upd.sliced = True
            reason = _classify_users(user, upd, top=True)
            if reason:
                return reason
            continue
        if user.op == "output":
            if not top:
                return f"the repeated heads {describe(src)} are a graph output"
            continue
        if top and (_is_call(user, fns={getattr}) and user.args[1] in _SIZE_ATTRS or
                    user.op == "call_method" and user.target in _SIZE_METHODS):
            upd.size_uses.append(user)
            continue
        if _is_noop_cast(user, src):  # e.g. GPT-J's key.to(torch.float32) on a float32 cache
            reason = _classify_users(user, upd, top=False)
            if reason:
                return reason
            continue
        if top:
            end = _repeat_kv_end(user)
            if end is not None:
                reason = _classify_users(end, upd, top=False)
                if reason:
                    return reason
                continue
        if _is_call(user, fns=_SDPA):
            a = sdpa_args(user)
            if a.get("key") is src and a.get("value") is not src:
                upd.uses.append(Use("sdpa", user, "k"))
                continue
            if a.get("value") is src and a.get("key") is not src:
                upd.uses.append(Use("sdpa", user, "v"))
                continue
            return f"it is passed to {describe(user)} as the query or as both key and value"
        if _is_last_two_transpose(user):
            mms = list(user.users)
            if len(mms) == 1 and _is_call(mms[0], fns=_MATMUL) and len(mms[0].args) == 2 \
                    and mms[0].args[1] is user and mms[0].args[0] is not user and rank(mms[0].args[0]) == 4:
                upd.uses.append(Use("qk", mms[0], "k"))
                continue
            return f"its transpose {describe(user)} is used by something other than a query @ key matmul"
        if _is_call(user, fns=_MATMUL) and len(user.args) == 2 and user.args[1] is src \
                and user.args[0] is not src and rank(user.args[0]) == 4:
            upd.uses.append(Use("pv", user, "v"))
            continue
        return f"it is used by {describe(user)}, which is not an attention op kvcompile understands"
    return None


def _cache_update(node: fx.Node) -> Optional[CacheUpdate]:
    """A CacheUpdate if `node` concatenates two 4-D tensors along the sequence axis."""
    if not _is_call(node, fns=_CAT):
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or rank(node) != 4 or dim not in (2, -2):
        return None
    past, new = tensors
    if not (isinstance(past, fx.Node) and isinstance(new, fx.Node)) or rank(new) != 4:
        return None
    return CacheUpdate(node, past, new)


def _window_start(node: fx.Node, cat: fx.Node) -> Optional[int]:
    """`start` if `node` is `cat[:, :, start:]` (optionally `, :]` or `...`) with a constant start."""
    if not (_is_call(node, fns={operator.getitem}) and node.args[0] is cat and isinstance(node.args[1], tuple)):
        return None
    idx = node.args[1]
    full = slice(None, None, None)
    if len(idx) < 3 or idx[0] != full or idx[1] != full or not all(i == full or i is Ellipsis for i in idx[3:]):
        return None
    cut = idx[2]
    if not (isinstance(cut, slice) and isinstance(cut.start, int) and cut.stop is None and cut.step in (None, 1)):
        return None
    return cut.start


def _head_slice(node: fx.Node, src: fx.Node) -> bool:
    """`src[:, :, :n]` (the first n tokens)."""
    if not (_is_call(node, fns={operator.getitem}) and node.args[0] is src and isinstance(node.args[1], tuple)):
        return False
    idx = node.args[1]
    full = slice(None, None, None)
    return (len(idx) >= 3 and idx[0] == full and idx[1] == full and isinstance(idx[2], slice)
            and idx[2].start in (None, 0) and idx[2].step in (None, 1) and all(i == full or i is Ellipsis for i in idx[3:]))


_ZEROS = {torch.zeros, torch.zeros_like}


def _token_index(idx) -> bool:
    """`(:, :, pos)`: token positions along dim 2 (pos a tensor)."""
    full = slice(None, None, None)
    return (isinstance(idx, tuple) and len(idx) == 3 and idx[0] == full and idx[1] == full
            and isinstance(idx[2], fx.Node) and isinstance(val(idx[2]), torch.Tensor))


def find_static_updates(graph: fx.Graph) -> List[CacheUpdate]:
    """Every `buf.index_copy_(2, pos, new)` of 4-D tensors, classified like a cat (module docstring).
    The attention's uses are found through repeat_kv and, at prefill, a slice of the first tokens."""
    updates = []
    for node in graph.nodes:
        if node.op == "call_method" and node.target == "index_copy_" and len(node.args) == 4:
            buf, dim, pos, new = node.args
        elif _is_call(node, fns={operator.setitem}) and len(node.args) == 3 and _token_index(node.args[1]) \
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder":
            buf, dim, pos, new = node.args[0], 2, node.args[1][2], node.args[2]  # gpt-fast: buf[:, :, pos] = new
        else:
            continue
        if not (isinstance(buf, fx.Node) and isinstance(new, fx.Node) and rank(buf) == 4 and rank(new) == 4
                and dim in (2, -2)):
            continue
        upd = CacheUpdate(buf, buf if buf.op == "placeholder" else None, new, write=node)
        updates.append(upd)
        if node.users:
            upd.reason = f"the result of {describe(node)} is used (instead of the buffer it writes)"
        elif buf.op != "placeholder" and not (_is_call(buf, fns=_ZEROS) and any(u.op == "output" for u in buf.users)):
            upd.reason = (f"the buffer {describe(buf)} is neither created zero-filled in this graph and returned, "
                          f"nor a graph input")
        else:
            upd.reason = _classify_users(buf, upd, top=True)
        if upd.reason is None and not upd.uses:
            upd.reason = "no attention op reads it"
        if upd.reason is None:
            roles = {u.role for u in upd.uses}
            upd.role = roles.pop() if len(roles) == 1 else None
            if upd.role is None:
                upd.reason = "it is read both as keys and as values"
        if upd.reason is None:
            upd.reason = _cross_attention(upd)
    _partners(updates)
    return updates


def static_rewrites(graph: fx.Graph) -> List[fx.Node]:
    """`buf.copy_(x)` into a fixed-size quantized state that is a graph input (StaticSlidingWindowLayer
    rolls its buffer so): the state quantizes x as it is written (state._copy_); only reported."""
    from ..state import KVState

    return [n for n in graph.nodes if n.op == "call_method" and n.target == "copy_" and n.args
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"
            and isinstance(val(n.args[0]), KVState) and val(n.args[0]).kv_layout.static]


def _fresh_cache(node: fx.Node) -> Optional[CacheUpdate]:
    """A first-call cache with no cat (e.g. a hand-written decoder's prefill returns its K and V):
    a computed 4-D tensor that is returned and read by attention. Only kept if fully matched."""
    if node.op not in ("call_function", "call_method") or rank(node) != 4 or _is_call(node, fns=_CAT):
        return None
    if not any(u.op == "output" for u in node.users):
        return None
    upd = CacheUpdate(node, None, node)
    upd.reason = _classify_users(node, upd, top=True)
    if upd.reason is not None or not upd.uses or len({u.role for u in upd.uses}) != 1:
        return None
    upd.role = upd.uses[0].role
    return upd


def find_cache_updates(graph: fx.Graph) -> List[CacheUpdate]:
    """Every cat along the sequence axis of 4-D tensors, classified (see module docstring), and
    every fresh cache (see _fresh_cache)."""
    updates = []
    for node in graph.nodes:
        upd = _cache_update(node)
        if upd is None:
            fresh = _fresh_cache(node)
            if fresh is not None:
                updates.append(fresh)
            continue
        updates.append(upd)
        if not any(u.op == "output" for u in node.users):
            window = [u for u in node.users if _window_start(u, node) is not None]
            if len(window) == 1 and all(v.op == "output" for v in window[0].users):
                upd.window, upd.window_start = window[0], _window_start(window[0], node)
            elif any(_is_call(u, fns={operator.getitem}) and any(v.op == "output" for v in u.users)
                     for u in node.users):
                upd.reason = ("only a slice of it is returned, and not its newest tokens along the sequence "
                              "axis (`cache[:, :, start:]`, as a sliding-window cache layer keeps)")
                continue
            else:
                upd.reason = "its result is not a graph output, so it is not a cache that outlives the call"
                continue
        upd.reason = _classify_users(node, upd, top=True)
        if upd.reason is None and not upd.uses:
            upd.reason = "no attention op reads it"
        if upd.reason is None:
            roles = {u.role for u in upd.uses}
            if len(roles) != 1:
                upd.reason = "it is read both as keys and as values"
            else:
                upd.role = roles.pop()
    for upd in updates:
        if upd.matched:
            upd.reason = _cross_attention(upd)
    _partners(updates)
    return updates


def _partners(updates: List[CacheUpdate]) -> None:
    """SDPA needs both of its key and value to be matched cache updates (to a fixed point)."""
    by_cat = {u.cat: u for u in updates}
    changed = True
    while changed:
        changed = False
        for upd in updates:
            for use in upd.uses if upd.matched else ():
                if use.kind != "sdpa":
                    continue
                a = sdpa_args(use.node)
                other = by_cat.get(_strip_repeat(a["value"] if use.role == "k" else a["key"]))
                if other is None or not other.matched:
                    upd.reason = (f"its attention partner (the {'values' if use.role == 'k' else 'keys'} "
                                  f"of {describe(use.node)}) is not a matched cache update")
                    changed = True
                    break


def _tokens(node) -> Optional[object]:
    v = val(node) if isinstance(node, fx.Node) else None
    return v.shape[-2] if isinstance(v, torch.Tensor) and v.dim() >= 2 else None


def _known_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def _cross_attention(upd: CacheUpdate) -> Optional[str]:
    """In self-attention every appended token is also a query: the tokens appended equal the query
    length of each attention reading the cache. Otherwise the keys and values come from another
    sequence (an encoder-decoder's cross-attention): left alone."""
    new = _tokens(upd.new)
    for use in upd.uses:
        query = sdpa_args(use.node).get("query") if use.kind == "sdpa" else use.node.args[0]
        q = _tokens(query)
        if new is None or q is None or not _known_equal(new, q):
            return (f"it appends {new} tokens while {describe(use.node)} has {q} queries: keys and values from "
                    f"another sequence (cross-attention), which kvcompile leaves alone")
    return None


def _strip_repeat(node) -> object:
    """The tensor a chain of repeat_kv and no-op casts started from (`node` itself if none)."""
    while isinstance(node, fx.Node):
        if isinstance(node.args[0] if node.args else None, fx.Node) and _head_slice(node, node.args[0]):
            node = node.args[0]  # a static buffer's prefill slice
            continue
        if node.op == "call_method" and node.target in _NOOP_METHODS and node.args \
                and isinstance(node.args[0], fx.Node) and _is_noop_cast(node, node.args[0]):
            node = node.args[0]
            continue
        if _is_call(node, "reshape") or _is_call(node, "view"):
            expand = node.args[0]
            if isinstance(expand, fx.Node) and _is_call(expand, "expand"):
                getitem = expand.args[0]
                if isinstance(getitem, fx.Node) and _repeat_kv_end(getitem) is node:
                    node = getitem.args[0]
                    continue
        break
    return node


def count_attention_ops(graph: fx.Graph) -> Tuple[int, int]:
    """(sdpa calls, matmuls of 4-D tensors): what attention there is in the graph, for the report."""
    sdpa = sum(1 for n in graph.nodes if _is_call(n, fns=_SDPA))
    mm = sum(1 for n in graph.nodes if _is_call(n, fns=_MATMUL) and rank(n) == 4)
    return sdpa, mm
