"""Quantization methods and the storage formats they write.

A method (one file each: kivi.py, nqkv.py, int8.py, fp8.py, none.py) decides, for the keys and the
values of one layer, how tokens are stored (`layouts(config, head_dim)`: its two `Layout`s, the one
place a Config becomes Layouts) and which tokens leave the full-precision residual (`n_quantize`).
Each file declares its storage formats (`Format`) and itself (`METHOD`, a `Method`: methods/base.py).

`METHODS` and `FORMATS` below are the registries everything else reads: config.py (valid bits and
defaults), kernels/reference.py (the torch arithmetic), the Triton launchers (kernel ids and tables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

from ..layout import CHANNEL_AXIS, Layout
from . import fp8, int8, kivi, none, nqkv
from .base import Format, Method, check_packing, codes_per_word, keep_newest

if TYPE_CHECKING:
    from ..config import Config

METHODS: Dict[str, Method] = {m.METHOD.name: m.METHOD for m in (kivi, none, nqkv, int8, fp8)}
FORMATS: Dict[str, Format] = {f.name: f for m in METHODS.values() for f in m.formats}
assert len({f.kernel for f in FORMATS.values() if f.kernel is not None}) == \
    sum(f.kernel is not None for f in FORMATS.values()), "two storage formats share a kernel id"

__all__ = ["METHODS", "FORMATS", "Format", "Method", "check_packing", "codes_per_word", "keep_newest", "layouts",
           "static_reason"]


def layouts(config: "Config", head_dim: int) -> Tuple[Layout, Layout]:
    """The (key, value) layouts for a layer of this head_dim; raises ValueError if they cannot fit."""
    return METHODS[config.method].layouts(config, head_dim)


def static_reason(config: "Config", both: Tuple[Layout, Layout]) -> Optional[str]:
    """Why a fixed-size cache buffer written in place (StaticCache) cannot be stored with these options,
    or None. Per-token formats without a window quantize each token as it is written; a layout with a
    full-precision window (kivi, residual_length > 0) keeps it beside the packed rows (Layout.overlay)."""
    for lay in both:
        if not lay.quantized:
            return f"method {config.method!r} stores nothing quantized"
        if lay.axis != CHANNEL_AXIS and not lay.residual:
            return (f"method {config.method!r} quantizes the keys in groups of {lay.group} tokens along the sequence "
                    f"with no full-precision window to gather them in")
    return None
