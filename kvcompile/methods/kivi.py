"""KIVI (arXiv 2402.02750): keys per channel, values per token, full-precision residual window.

Keys: groups of G consecutive tokens of one (batch, head, channel). New keys join a
full-precision residual; when it holds R tokens (R a multiple of G) all R are quantized.
A prefill of T0 tokens quantizes the first T0 - T0 % R.
Values: groups of min(G, head_dim) consecutive channels of one token. The newest R tokens stay in
full precision; a token leaving that window is quantized on its own.
Attention reads the cache after this step's tokens are appended and before the quantization
above: it takes effect from the next step.

Storage format "kivi", asymmetric b-bit quantization of a group x (float32 arithmetic):
    mn    = min(x)                             stored in the cache dtype (exact: one of x's values)
    scale = (max(x) - mn) / (2^b - 1)          stored in the cache dtype
    code  = clamp(floor((x - mn) / scale + 0.5), 0, 2^b - 1), 0 where the stored scale is 0
    dequantized code * scale + mn
Codes are computed with the *stored* scale, so dequantization inverts exactly what was stored; a
constant group has scale 0 and dequantizes to mn exactly. Codes are packed 4 (2-bit) or 2 (4-bit) a
byte, low bits first. Memory per element: b + 2·16/G bits with a 16-bit cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from ..errors import KVQuantOptionError
from ..layout import CHANNEL_AXIS, TOKEN_AXIS, Layout, SymInt
from .base import Format, Method, check_packing, keep_newest

if TYPE_CHECKING:
    from ..config import Config


def quantize(xg: Tensor, bits: int, dtype: torch.dtype, dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Groups along `dim` of xg (float32) -> (codes uint8 shaped as xg, scale keepdim, mn keepdim), the
    last two in `dtype`."""
    qmax = (1 << bits) - 1
    mn = xg.amin(dim=dim, keepdim=True)
    scale = ((xg.amax(dim=dim, keepdim=True) - mn) / qmax).to(dtype)
    s = scale.float()
    q = torch.floor((xg - mn) / s + 0.5).clamp_(0, qmax)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    return q.to(torch.uint8), scale, mn.to(dtype)


def dequantize(codes: Tensor, scale: Tensor, mn: Optional[Tensor], bits: int) -> Tensor:
    """codes and their groups' scale and mn (broadcastable) -> float32 values code * scale + mn."""
    return codes.float() * scale.float() + mn.float()


FORMAT = Format("kivi", bits=(2, 4), has_min=True, kernel=0, quantize=quantize, dequantize=dequantize)


def layouts(config: "Config", head_dim: int) -> Tuple[Layout, Layout]:
    g, r = config.group_size, config.residual_length
    vg = min(g, head_dim)
    if head_dim % vg:
        raise KVQuantOptionError(
            f"group_size {g} does not fit head_dim {head_dim}: values are quantized per token in "
            f"groups of min(group_size, head_dim) channels, which must divide head_dim "
            f"(valid group sizes here: divisors of {head_dim}, or any size >= {head_dim})"
        )
    check_packing(head_dim, **config.bits_options())
    return (
        Layout("kivi", "k", "kivi", config.key_bits, g, TOKEN_AXIS, r),
        Layout("kivi", "v", "kivi", config.value_bits, vg, CHANNEL_AXIS, r),
    )


def n_quantize(layout: Layout, n_res: SymInt) -> SymInt:
    if layout.axis == TOKEN_AXIS:
        # keys: flush whole windows of R tokens
        return (n_res // layout.residual) * layout.residual
    # values: everything older than the newest R tokens
    return keep_newest(layout, n_res)


METHOD = Method("kivi", (FORMAT,), layouts, default_bits=2, default_residual=128, n_quantize=n_quantize)
