"""int8: symmetric 8-bit quantization with one scale per token per head, the format serving
engines use; a baseline.

Each token's head_dim channels form one group, for keys and values alike (float32 arithmetic):
    scale = absmax(x) / 127, stored in the cache dtype
    code  = clamp(floor(x / scale + 0.5), -127, 127)      (round half up; 0 where scale is 0)
    dequantized (code) * scale
Codes are stored as uint8 `code + 128` (1..255), one a byte; no minimum is stored. A group whose
stored scale is 0 (all zero, or so small that absmax / 127 underflows the cache dtype) dequantizes
to exactly 0. Tokens are quantized when appended, or when they leave a full-precision window of the
newest `residual_length` tokens if that is > 0. Memory per element: 8 + 16 / head_dim bits with a
16-bit cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from ..layout import Layout
from .base import Format, Method, per_token_layouts

if TYPE_CHECKING:
    from ..config import Config

QMAX = 127
ZERO = 128  # the stored byte of code 0


def quantize(xg: Tensor, bits: int, dtype: torch.dtype, dim: int) -> Tuple[Tensor, Tensor, None]:
    """Groups along `dim` of xg (float32) -> (codes uint8 shaped as xg, scale keepdim in `dtype`, None)."""
    scale = (xg.abs().amax(dim=dim, keepdim=True) / QMAX).to(dtype)
    s = scale.float()
    q = torch.where(s > 0, torch.floor(xg / s + 0.5), 0.0).clamp_(-QMAX, QMAX)
    return (q + ZERO).to(torch.uint8), scale, None


def dequantize(codes: Tensor, scale: Tensor, mn: Optional[Tensor], bits: int) -> Tensor:
    """Stored bytes and their groups' scale (broadcastable) -> float32 values (byte - 128) * scale."""
    return (codes.float() - ZERO) * scale.float()


FORMAT = Format("int8", bits=(8,), has_min=False, kernel=2, quantize=quantize, dequantize=dequantize)


def layouts(config: "Config", head_dim: int) -> Tuple[Layout, Layout]:
    return per_token_layouts(config, FORMAT.name, (8, 8), head_dim)  # one group: the whole head


METHOD = Method("int8", (FORMAT,), layouts, default_bits=8)
