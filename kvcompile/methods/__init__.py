"""Quantization methods. A method decides, for the keys and for the values of one layer, how
tokens are quantized (`Layout`) and which tokens leave the full-precision residual (`n_quantize`).

One file per method: kivi.py, nqkv.py, int8.py, fp8.py, none.py. `layouts(config, head_dim)` is the
only entry point the pass uses. Each method stores its codes in one storage format (`FORMATS`): the
ops are told which by the 5th element of their `meta` (a 4-element meta means KIVI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..config import Config

SymInt = Union[int, torch.SymInt]

# Quantization axis: groups of consecutive tokens (one channel) or of consecutive channels (one token).
TOKEN_AXIS = 2
CHANNEL_AXIS = 3

# Storage formats of the packed codes (plain ints: they travel in the ops' int-list `meta`).
KIVI = 0  # asymmetric uniform: code * scale + mn (kernels/reference.py)
NF = 1  # NormalFloat levels times the block's absmax, no mn (nqkv.py)
INT8 = 2  # symmetric int8 stored as code + 128, no mn (int8.py)
FP8 = 3  # float8 e4m3fn bytes times a per-token scale, no mn (fp8.py)
NFH = 4  # NF of each block's Hadamard transform: dequantized NF values, transformed back (nqkv.py)
FORMATS = {"none": KIVI, "kivi": KIVI, "nqkv": NF, "int8": INT8, "fp8": FP8}


def codes_per_word(bits: int) -> int:
    """Codes packed into one whole number of bytes: 8 // bits (1, 2 or 4 codes a byte), or 8 codes in
    3 bytes for 3-bit codes. head_dim must be a multiple of it."""
    return 8 if bits == 3 else 8 // bits


@dataclass(frozen=True)
class Layout:
    """How one cache tensor (the keys or the values of one layer) is stored.

    A constant of the state (its flatten context): hashable, no tensors.
    `bits == 16` means nothing is quantized (method "none").
    """

    method: str
    role: str  # "k" or "v"
    bits: int
    group: int  # group size along `axis` (the block of nqkv, head_dim for int8/fp8)
    axis: int  # TOKEN_AXIS or CHANNEL_AXIS
    residual: int  # R: full-precision window length
    hadamard: bool = False  # nqkv: blocks are quantized in the Hadamard basis (storage format NFH)
    window: bool = False  # a sliding-window cache layer: the state drops its oldest tokens (state.kv_window)
    static: bool = False  # a fixed-size buffer written in place at given positions (state.kv_static_write)

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def fmt(self) -> int:
        """The storage format of the codes (KIVI, NF, NFH, INT8 or FP8)."""
        return NFH if self.hadamard else FORMATS[self.method]

    def n_quantize(self, n_res: SymInt) -> SymInt:
        """How many of the oldest residual tokens to quantize now (after attention has read them)."""
        if not self.quantized:
            return 0
        if self.method == "kivi":
            from . import kivi

            return kivi.n_quantize(self, n_res)
        # nqkv, int8, fp8 (per-token groups): everything older than the newest R tokens (all if R = 0)
        return torch.sym_max(n_res - self.residual, 0)

    @property
    def drop_quantum(self) -> int:
        """Packed rows are freed in multiples of this (keys grouped along tokens: whole scale rows)."""
        return self.group if self.axis == TOKEN_AXIS else 1

    def capacity(self, need: SymInt) -> SymInt:
        """Tokens of packed storage to allocate when `need` do not fit: need plus 1/64 (so the bytes
        held stay within a few percent of the packed size), rounded up to whole groups (keys: scale
        rows cover G tokens) or to 32 tokens (values). Growing copies the storage once per
        ~need/64 tokens, or at most once per key flush (R tokens) while need/64 < R."""
        quantum = self.group if self.axis == TOKEN_AXIS else 32
        want = need + need // 64
        return ((want + quantum - 1) // quantum) * quantum

    def widths(self, head_dim: int) -> Tuple[int, int, int]:
        """Last-dim sizes of (codes, scale, mn) rows: codes rows are tokens; scale and mn rows are groups
        of tokens (token axis) or tokens (channel axis). Symmetric formats store no mn (width 0)."""
        if not self.quantized:
            return 0, 0, 0
        codes = head_dim * self.bits // 8
        scale = head_dim if self.axis == TOKEN_AXIS else head_dim // self.group
        return codes, scale, scale if self.fmt == KIVI else 0


def static_reason(config: Config, layouts: Tuple[Layout, Layout]) -> Optional[str]:
    """Why a fixed-size cache buffer written in place (StaticCache) cannot be stored with these options,
    or None: only methods that quantize each token on its own, as it is written, fit."""
    for lay in layouts:
        if not lay.quantized:
            return f"method {config.method!r} stores nothing quantized"
        if lay.axis != CHANNEL_AXIS:
            return (f"method {config.method!r} quantizes the keys in groups of {lay.group} tokens along the sequence, "
                    f"which needs a full-precision window that a fixed buffer written in place cannot keep "
                    f"(nqkv, int8 and fp8 with residual_length=0 quantize each token as it is written)")
        if lay.residual:
            return (f"residual_length={lay.residual}: a fixed buffer written in place keeps no full-precision "
                    f"window (use residual_length=0)")
    return None


def check_packing(head_dim: int, **bits: int) -> None:
    """Raise ValueError unless head_dim holds whole bytes of codes for each of `bits` (name=bits)."""
    for name, b in bits.items():
        per = codes_per_word(b)
        if head_dim % per:
            into = "3 bytes" if b == 3 else "a byte"
            raise ValueError(f"{name}={b} packs {per} codes into {into}, so head_dim must be a multiple of {per}; "
                             f"got head_dim {head_dim}")


def layouts(config: Config, head_dim: int) -> Tuple[Layout, Layout]:
    """The (key, value) layouts for a layer of this head_dim; raises ValueError if they cannot fit."""
    if config.method == "none":
        from .none import layouts as none_layouts

        return none_layouts(config)
    if config.method == "kivi":
        from .kivi import layouts as kivi_layouts

        return kivi_layouts(config, head_dim)
    if config.method == "nqkv":
        from .nqkv import layouts as nqkv_layouts

        return nqkv_layouts(config, head_dim)
    if config.method == "int8":
        from .int8 import layouts as int8_layouts

        return int8_layouts(config, head_dim)
    if config.method == "fp8":
        from .fp8 import layouts as fp8_layouts

        return fp8_layouts(config, head_dim)
    raise ValueError(f"method {config.method!r} is not implemented")
