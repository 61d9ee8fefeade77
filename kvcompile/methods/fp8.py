"""fp8: float8 e4m3 (torch.float8_e4m3fn) with one scale per token per head, the format serving
engines use; a baseline.

Each token's head_dim channels form one group, for keys and values alike (float32 arithmetic):
    scale = absmax(x) / 448, stored in the cache dtype (448: the largest e4m3fn value)
    code  = clamp(x / scale, -448, 448) cast to float8_e4m3fn (round to nearest even; 0 where
            scale is 0), stored as its byte (a uint8 view)
    dequantized float(code) * scale
No minimum is stored. A group whose stored scale is 0 dequantizes to exactly 0. Tokens are quantized
when appended, or when they leave a full-precision window of the newest `residual_length` tokens if
that is > 0. Memory per element: 8 + 16 / head_dim bits with a 16-bit cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from ..layout import Layout
from .base import Format, Method, per_token_layouts

if TYPE_CHECKING:
    from ..config import Config

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize(xg: Tensor, bits: int, dtype: torch.dtype, dim: int) -> Tuple[Tensor, Tensor, None]:
    """Groups along `dim` of xg (float32) -> (codes uint8 shaped as xg, scale keepdim in `dtype`, None)."""
    scale = (xg.abs().amax(dim=dim, keepdim=True) / FP8_MAX).to(dtype)
    s = scale.float()
    u = torch.where(s > 0, xg / s, 0.0).clamp_(-FP8_MAX, FP8_MAX)
    return u.to(E4M3).view(torch.uint8), scale, None


def dequantize(codes: Tensor, scale: Tensor, mn: Optional[Tensor], bits: int) -> Tensor:
    """Stored bytes and their groups' scale (broadcastable) -> float32 values."""
    return codes.view(E4M3).float() * scale.float()


FORMAT = Format("fp8", bits=(8,), has_min=False, kernel=3, quantize=quantize, dequantize=dequantize)


def layouts(config: "Config", head_dim: int) -> Tuple[Layout, Layout]:
    return per_token_layouts(config, FORMAT.name, (8, 8), head_dim)  # one group: the whole head


METHOD = Method("fp8", (FORMAT,), layouts, default_bits=8)
