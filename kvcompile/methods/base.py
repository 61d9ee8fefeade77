"""What every method file declares: its storage formats (`Format`) and the helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
from torch import Tensor

from ..errors import KVQuantOptionError
from ..layout import CHANNEL_AXIS, Layout, SymInt

if TYPE_CHECKING:
    from ..config import Config


@dataclass(frozen=True)
class Format:
    """A storage format: how a group of values becomes codes and back. Declared once, in the file of
    the method that writes it; config, the reference ops and the Triton launchers read it from
    `methods.FORMATS`.

    quantize(xg, bits, dtype, dim) -> (codes, scale, mn): xg float32 with groups along `dim`; codes uint8
        shaped as xg (unpacked), scale (and mn, or None where the format stores none) keepdim, in `dtype`.
    dequantize(codes, scale, mn, bits) -> float32 values (scale and mn broadcastable to codes).
    transform: applied to each group before quantizing and again after dequantizing (its own inverse);
        the kernels then read the codes as format `plain` in the transformed basis.
    kernel: the id the Triton kernels know the codes by (kernels/common.py names them); None for a
        format the kernels only read through `plain`.
    levels / bounds (bits, device) -> float32 tables: the values codes decode to and the decision
        boundaries between them, for formats whose codes index a table (NormalFloat).
    """

    name: str
    bits: Tuple[int, ...]
    has_min: bool
    kernel: Optional[int]
    quantize: Optional[Callable] = None
    dequantize: Optional[Callable] = None
    transform: Optional[Callable[[Tensor], Tensor]] = None
    plain: Optional[str] = None
    levels: Optional[Callable] = None
    bounds: Optional[Callable] = None


def keep_newest(layout: Layout, n_res: SymInt) -> SymInt:
    """The policy of the per-token methods (and of kivi's values): every residual token older than the
    newest R leaves (all of them if R = 0)."""
    if isinstance(n_res, torch.Tensor):  # a static buffer's counts are data (state.kv_static_write)
        return (n_res - layout.residual).clamp(min=0)
    if isinstance(n_res, int):  # (an op's count at run time: plain ints, cheaper than sym_max's dispatch)
        return max(n_res - layout.residual, 0)
    return torch.sym_max(n_res - layout.residual, 0)


@dataclass(frozen=True)
class Method:
    """A quantization method, declared once in its file (`METHOD`) and read from `methods.METHODS`.

    formats: the storage formats it writes (the first one's bits are the valid `bits` options).
    layouts(config, head_dim) -> (keys' Layout, values' Layout): the one place a Config becomes Layouts;
        raises ValueError where the options cannot fit the head_dim.
    n_quantize(layout, n_res) -> how many of the oldest residual tokens leave the full-precision window
        now (after attention has read them)."""

    name: str
    formats: Tuple[Format, ...]
    layouts: Callable[["Config", int], Tuple[Layout, Layout]]
    default_bits: int
    default_residual: int = 0
    n_quantize: Callable[[Layout, SymInt], SymInt] = keep_newest


def per_token_layouts(config: "Config", fmt: str, bits: Tuple[int, int], group: int) -> Tuple[Layout, Layout]:
    """Keys and values both quantized per token, in groups of `group` channels (bits: keys', values'),
    with the config's full-precision window."""
    r = config.residual_length
    return (Layout(config.method, "k", fmt, bits[0], group, CHANNEL_AXIS, r),
            Layout(config.method, "v", fmt, bits[1], group, CHANNEL_AXIS, r))


def codes_per_word(bits: int) -> int:
    """Codes packed into one whole number of bytes: 8 // bits (1, 2 or 4 codes a byte), or 8 codes in
    3 bytes for 3-bit codes. head_dim must be a multiple of it."""
    return 8 if bits == 3 else 8 // bits


def check_packing(head_dim: int, **bits: int) -> None:
    """Raise ValueError unless head_dim holds whole bytes of codes for each of `bits` (name=bits)."""
    for name, b in bits.items():
        per = codes_per_word(b)
        if head_dim % per:
            into = "3 bytes" if b == 3 else "a byte"
            raise KVQuantOptionError(f"{name}={b} packs {per} codes into {into}, so head_dim must be a multiple of {per}; "
                             f"got head_dim {head_dim}")
