"""Quantization methods. A method decides, for the keys and for the values of one layer, how
tokens are quantized (`Layout`) and which tokens leave the full-precision residual (`n_quantize`).

One file per method; `layouts(config, head_dim)` is the only entry point the pass uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

import torch

from ..config import Config

SymInt = Union[int, torch.SymInt]

# Quantization axis: groups of consecutive tokens (one channel) or of consecutive channels (one token).
TOKEN_AXIS = 2
CHANNEL_AXIS = 3


@dataclass(frozen=True)
class Layout:
    """How one cache tensor (the keys or the values of one layer) is stored.

    A constant of the state (its flatten context): hashable, no tensors.
    `bits == 16` means nothing is quantized (method "none").
    """

    method: str
    role: str  # "k" or "v"
    bits: int
    group: int  # group size along `axis`
    axis: int  # TOKEN_AXIS or CHANNEL_AXIS
    residual: int  # R: full-precision window length

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits if self.quantized else 1

    def n_quantize(self, n_res: SymInt) -> SymInt:
        """How many of the oldest residual tokens to quantize now (after attention has read them)."""
        if not self.quantized:
            return 0
        from . import kivi

        return kivi.n_quantize(self, n_res)

    def capacity(self, need: SymInt) -> SymInt:
        """Tokens of packed storage to allocate when `need` do not fit: need plus 1/32 (so the bytes
        held stay within a few percent of the packed size), rounded up to whole flushes (R tokens for
        keys) or to 32 tokens (values). Growing copies the storage once per ~need/32 tokens."""
        quantum = self.residual if self.axis == TOKEN_AXIS else 32
        want = need + need // 32
        return ((want + quantum - 1) // quantum) * quantum

    def widths(self, head_dim: int) -> Tuple[int, int]:
        """Last-dim sizes of (codes, scale/mn) rows: codes rows are tokens; scale rows are groups of
        tokens (token axis) or tokens (channel axis)."""
        if not self.quantized:
            return 0, 0
        codes = head_dim // self.codes_per_byte
        return codes, head_dim if self.axis == TOKEN_AXIS else head_dim // self.group


def layouts(config: Config, head_dim: int) -> Tuple[Layout, Layout]:
    """The (key, value) layouts for a layer of this head_dim; raises ValueError if they cannot fit."""
    if config.method == "none":
        from .none import layouts as none_layouts

        return none_layouts(config)
    if config.method == "kivi":
        from .kivi import layouts as kivi_layouts

        return kivi_layouts(config, head_dim)
    raise ValueError(f"method {config.method!r} is not implemented")
