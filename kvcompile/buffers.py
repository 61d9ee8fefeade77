"""Cache buffers a model allocates itself and writes in place (a module buffer, a tensor attribute, a
buffer passed into forward), replaced by fixed-size quantized states.

The graph that first writes into such a buffer was traced with the plain tensor as its input, so it runs
as it is, in full precision, on that call. Right after it, each buffer the pass matched
(GraphReport.swaps: a graph input written at token positions and read by attention) is replaced by a
fixed-size state holding its contents quantized (state.kv_static_from: what a prefill wrote is kept).
The replacement is `torch.utils.swap_tensors`: the tensor object itself takes the state's contents, so
every reference to it (the module's attribute, the caller's variable, a list) sees the state, and the
full-precision storage is freed. No names are looked up. Dynamo's guards on the input's type then fail,
and the next call compiles a graph that writes the state (kv_static_write) and reads it (fused attention).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Tuple

import torch
from torch import Tensor

from .errors import KVQuantWarning
from .layout import Layout
from .state import KVState, kv_static_from


def swapping(compiled: Callable, swaps: List[Tuple[int, Layout]]) -> Callable:
    """`compiled`, which swaps the buffers (graph input index, layout) for states after each call that
    got them as plain tensors: the first call, and the first of any other instance of the model whose
    buffers pass the same guards."""

    def run(*args: Any) -> Any:
        out = compiled(*args)
        for i, layout in swaps:
            swap(args[i], layout)
        return out

    return run


def swap(buf: Tensor, layout: Layout) -> bool:
    """Replace the plain tensor `buf` by a fixed-size state of its contents, in place; False (and a
    KVQuantWarning) where torch cannot swap it (it is then left in full precision, correct)."""
    if type(buf) is not Tensor:  # a state already, a parameter, another subclass
        return False
    with torch.no_grad():
        state = kv_static_from(buf, layout)
        try:
            torch.utils.swap_tensors(buf, state)
        except (RuntimeError, TypeError) as e:
            warnings.warn(
                f"kvquant: the cache buffer of shape {tuple(buf.shape)} could not be replaced by a quantized state "
                f"({e}); it stays in full precision (correct, not quantized)", KVQuantWarning, stacklevel=3)
            return False
    return True
