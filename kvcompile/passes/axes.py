"""What each dim of a tensor derived from a cache holds: the matcher's small dataflow analysis.

A cache tensor has some layout of its own ([B, H, T, D], [B, T, H, D], [T, B, H, D], [B, T, H*D],
[B*H, T, D], keys stored [B, H, D, T], ...). Rather than expect one, the matcher gives each dim of the
cache a *slot*, and follows the tensor through the graph: every dim of a derived tensor is labelled
with the atoms it is made of, major to minor:

  ("c", slot, part)   a factor of the cache's dim `slot` (part 0 if the dim was never split; a dim a
                      reshape splits in two has parts 1 and 2, major first)
  ("r", n)            n copies, from expand / repeat_interleave (GQA's repeated KV heads)
  ("u",)              a dim of size 1 (unsqueeze, None indexing)

Layout ops (transpose, permute, view / reshape / flatten / unflatten, unsqueeze / squeeze, expand,
repeat_interleave, contiguous, no-op casts, identity slices, a prefix of a whole dim: Labels.prefix) map
labels to labels. Value ops that keep each element's place (elementwise arithmetic with a broadcast operand, casts, RoPE's rotate-half: a
slice of the last dim and a cat along it) keep the labels but mark the tensor *valued*: it is a function
of the cache, not a view of it. An attention op reading a labelled tensor decides which atom holds the
tokens, the heads, the head dim and the batch (match.py). Anything else is a use the matcher does not
understand.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from ..layout import FULL

Atom = Tuple[Any, ...]
Dims = Tuple[Tuple[Atom, ...], ...]  # one tuple of atoms per dim
UNIT: Atom = ("u",)


ROPE = "it is transformed before attention (e.g. RoPE applied to the cached keys: a pre-RoPE cache)"


@dataclass(frozen=True)
class Labels:
    dims: Dims
    valued: str = ""  # why the tensor is computed from the cache rather than a layout view of it ("": it is)
    scaled: bool = False  # multiplied by a constant (a scale applied to the keys)
    prefix: Tuple[Tuple[Atom, Any], ...] = ()  # (atom, stop): only the first `stop` of a whole dim are read


def val(node: Any):
    """The example value Dynamo recorded for a node (a FakeTensor), or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: Any) -> Optional[Tuple[Any, ...]]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def known_equal(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def cache_labels(node: fx.Node) -> Labels:
    """The cache tensor itself: dim i is slot i."""
    return Labels(tuple((("c", i, 0),) for i in range(len(shape(node)))))


def atom_size(atom: Atom, sizes: Dict[Atom, Any]) -> Any:
    if atom[0] == "u":
        return 1
    if atom[0] == "r":
        return atom[1]
    return sizes[atom]


def slot_sizes(cache: fx.Node) -> Dict[Atom, Any]:
    """Sizes of the cache's atoms (part 0 of each slot); splits add their parts (reshape)."""
    return {("c", i, 0): s for i, s in enumerate(shape(cache))}


def _flat(dims: Dims) -> List[Atom]:
    return [a for d in dims for a in d]


def _reshape(dims: Dims, out_shape: Sequence[Any], sizes: Dict[Atom, Any]) -> Optional[Dims]:
    """Labels of a reshape: the atoms, in order, grouped into the output dims by size; an atom of a slot
    may be split in two (its parts recorded in `sizes`). Unit atoms come and go. None if the sizes do
    not line up."""
    atoms = [a for a in _flat(dims) if a != UNIT]
    out: List[Tuple[Atom, ...]] = []
    i = 0
    for size in out_shape:
        if known_equal(size, 1):
            if i < len(atoms) and known_equal(atom_size(atoms[i], sizes), 1):
                out.append((atoms[i],))
                i += 1
            else:
                out.append((UNIT,))
            continue
        group: List[Atom] = []
        have: Any = 1
        while i < len(atoms) and not known_equal(have, size):
            a = atoms[i]
            n = atom_size(a, sizes)
            if _divides(have * n, size):
                group.append(a)
                have = have * n
                i += 1
            elif a[0] == "c" and a[2] == 0 and isinstance(n, int) and isinstance(size, int) and isinstance(have, int) \
                    and size % have == 0 and n % (size // have) == 0:
                major = size // have  # split the slot: its major part ends this dim, the minor starts the next
                first, second = ("c", a[1], 1), ("c", a[1], 2)
                sizes[first], sizes[second] = major, n // major
                group.append(first)
                atoms[i] = second
                have = size
            else:
                return None
        if not known_equal(have, size) or not group:
            return None
        out.append(tuple(group))
    if any(a != UNIT for a in atoms[i:]):
        return None
    return tuple(out)


def _divides(a: Any, b: Any) -> bool:
    """a divides b (both may be symbolic: then only equality is recognised)."""
    if isinstance(a, int) and isinstance(b, int):
        return a != 0 and b % a == 0
    return known_equal(a, b)


_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
_NOOP_METHODS = {"contiguous", "clone", "detach"}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "type", "double", "type_as"}
# the tensor methods that move or cast a cache's elements and nothing else (propagate maps their labels)
LAYOUT_METHODS = frozenset(_TRANSPOSE_METHODS | _RESHAPE_METHODS | _NOOP_METHODS | _CAST_METHODS
                           | {"permute", "unsqueeze", "squeeze", "expand", "expand_as", "repeat_interleave"})
_ELEMENTWISE = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.mul, torch.add,
                torch.sub, torch.div, torch.neg, torch.multiply}
_ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "neg", "__mul__", "__add__", "__sub__", "__truediv__"}


def _args(node: fx.Node) -> Tuple[Any, ...]:
    """The node's positional arguments after its tensor (a method's self is args[0])."""
    return tuple(node.args[1:])


def _dim_list(node: fx.Node, start: int = 1) -> List[Any]:
    rest = list(node.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0])
    return rest


def propagate(node: fx.Node, src: fx.Node, labels: Labels, sizes: Dict[Atom, Any],
              others: Dict[fx.Node, Labels]) -> Optional[Labels]:
    """Labels of `node`'s output given those of its input `src` (and of other cache-derived inputs in
    `others`), or None if `node` is not an op this analysis knows."""
    out_shape = shape(node)
    if out_shape is None:
        return None
    dims = labels.dims
    ndim = len(dims)
    target = node.target
    method = node.op == "call_method"
    fn = node.op == "call_function"

    def same(valued: str = "", scaled: bool = False) -> Labels:
        return replace(labels, valued=labels.valued or valued, scaled=labels.scaled or scaled)

    def relabel(new: Optional[Dims]) -> Optional[Labels]:
        return replace(labels, dims=tuple(new)) if new is not None else None

    # -- no-op layout: contiguous, clone, casts that keep the dtype --
    if method and target in _NOOP_METHODS and node.args[0] is src:
        return same()
    if method and target in _CAST_METHODS and node.args[0] is src:
        a, b = val(src), val(node)
        if a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape):
            return same()
        return same(valued=f"it is cast to {b.dtype} before attention") if tuple(a.shape) == tuple(b.shape) else None
    # -- transpose / permute --
    if (method and target in _TRANSPOSE_METHODS) or (fn and target in (torch.transpose, torch.swapaxes)):
        d0, d1 = (x % ndim for x in node.args[1:3])
        new = list(dims)
        new[d0], new[d1] = new[d1], new[d0]
        return relabel(new)
    if (method and target == "permute") or (fn and target is torch.permute):
        order = [d % ndim for d in _dim_list(node)]
        return relabel([dims[d] for d in order])
    if method and target in ("mT",) or (fn and target is getattr and node.args[1] in ("mT", "T")):
        new = list(dims)
        new[-1], new[-2] = new[-2], new[-1]
        return relabel(new)
    # -- reshape family --
    if (method and target in _RESHAPE_METHODS | {"unsqueeze", "squeeze"}) or \
            (fn and target in (torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze)):
        local = dict(sizes)  # a prefix read has fewer of its atom than the cache
        local.update({a: val(src).shape[d] for d, atoms in enumerate(dims) for a in atoms
                      if any(a == p for p, _ in labels.prefix)})
        out = relabel(_reshape(dims, out_shape, local))
        sizes.update({a: n for a, n in local.items() if a not in sizes})  # the parts a split made
        return out
    # -- expand: unit dims become repeats --
    if method and target in ("expand", "expand_as"):
        if len(out_shape) != ndim:
            return None
        new = []
        for d, size in zip(dims, out_shape):
            if d == (UNIT,) and not known_equal(size, 1):
                if not isinstance(size, int):
                    return None
                new.append((("r", size),))
            else:
                new.append(d)
        return relabel(new)
    if (method and target == "repeat_interleave") or (fn and target is torch.repeat_interleave):
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if not isinstance(reps, int) or dim is None:
            return None
        dim %= ndim
        new = list(dims)
        if reps != 1:
            new[dim] = new[dim] + (("r", reps),)  # each element `reps` times in a row: the repeat is minor
        return relabel(new)
    # -- indexing: None inserts a unit dim, full / identity slices keep a dim --
    if fn and target is operator.getitem and node.args[0] is src:
        return _getitem(labels, node.args[1], val(src), out_shape)
    # -- value ops --
    if (fn and target in _ELEMENTWISE) or (method and target in _ELEMENTWISE_METHODS):
        tensors = [a for a in node.args if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor)]
        if tuple(out_shape) != tuple(val(src).shape):
            return None  # the other operand broadcasts the cache: not elementwise on it
        derived = [a for a in tensors if a is src or a in others]
        if any(others[a].dims != dims for a in derived if a is not src):
            return None
        scalar = len(tensors) == 1 and target in (operator.mul, torch.mul, "mul", "__mul__", operator.truediv,
                                                  torch.div, "div", "__truediv__")
        return same(valued="" if scalar else ROPE, scaled=scalar)
    if fn and target in (torch.cat, torch.concat, torch.concatenate):  # RoPE's rotate-half, put back together
        parts = node.args[0]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % ndim
        if dim != ndim - 1 or not all(isinstance(p, fx.Node) and (p is src or p in others) for p in parts):
            return None
        got = [labels if p is src else others[p] for p in parts]
        lasts = {g.dims[-1] for g in got}
        if len({g.dims[:-1] for g in got}) != 1 or len(lasts) != 1 or next(iter(lasts))[0][0] != "slice":
            return None
        return replace(got[0], dims=got[0].dims[:-1] + (next(iter(lasts))[0][1],), valued=ROPE)
    return None


def _getitem(labels: Labels, idx: Any, src_val: torch.Tensor, out_shape: Sequence[Any]) -> Optional[Labels]:
    dims = list(labels.dims)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if sum(i is Ellipsis for i in idx) > 1:
        return None
    n_index = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (FULL,) * (len(dims) - n_index) + idx[at + 1:]
    out: List[Tuple[Atom, ...]] = []
    d = 0
    valued, prefix = labels.valued, list(labels.prefix)
    for i in idx:
        if i is None:
            out.append((UNIT,))
            continue
        if d >= len(dims) or not isinstance(i, slice):
            return None
        size = src_val.shape[d]
        stop = val(i.stop) if isinstance(i.stop, fx.Node) else i.stop
        identity = i.step in (None, 1) and i.start in (None, 0) and (
            stop is None or known_equal(stop, size) or (isinstance(stop, int) and isinstance(size, int) and stop >= size))
        if identity:
            out.append(dims[d])
        elif d == len(dims) - 1:
            out.append((("slice", dims[d]),))  # a part of the last dim (RoPE's halves)
            valued = ROPE
        elif i.start in (None, 0) and i.step in (None, 1) and len(dims[d]) == 1 and dims[d][0][0] == "c" \
                and all(a != dims[d][0] for a, _ in prefix):
            out.append(dims[d])  # a prefix of a whole dim (a buffer's first tokens, a batch prefix)
            prefix.append((dims[d][0], i.stop))
        else:
            return None
        d += 1
    out.extend(dims[d:])
    if len(out) != len(out_shape):
        return None
    return Labels(tuple(out), valued, labels.scaled, tuple(prefix))
