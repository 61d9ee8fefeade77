"""NQKV (arXiv 2505.16210): per-block NormalFloat quantization of keys and values.

KV elements within a block are close to normally distributed, so each block is scaled by its absmax
and each value is mapped to the nearest of 2^b levels placed at quantiles of N(0, 1).

Blocks: `block_size` consecutive channels of one token, for keys and values alike (min(block_size,
head_dim) when head_dim is smaller; it must divide head_dim). Each token is quantized the moment it
is appended, or when it leaves a full-precision window of the newest `residual_length` tokens if
that is > 0 (as kivi's values).

Levels (`levels(bits)`, QLoRA's `create_normal_map` generalised to b bits): with 2^b levels and
offset = 1 - (1/(2·2^b) + 1/(2·(2^b - 1))) / 2 (QLoRA's 0.9677083 for b = 4),
    positive = ndtri(linspace(offset, 0.5, 2^(b-1) + 1)[:-1])     2^(b-1) values
    negative = -ndtri(linspace(offset, 0.5, 2^(b-1))[:-1])        2^(b-1) - 1 values
plus an exact 0, sorted and divided by the largest: 2^b levels in [-1, 1], with -1, 0 and 1 exact
(for b = 4 they are the NF4 table of bitsandbytes). Computed in float64 with torch.special.ndtri,
then stored as float32.

Quantization of a block x (float32 arithmetic):
    scale = absmax(x), stored in the cache dtype (exact: it is one of the block's values)
    u     = x / scale                        (0 for an all-zero block)
    code  = number of midpoints m_i < u,     m_i = (level_i + level_{i+1}) / 2 in float32
i.e. the nearest level, a tie going to the lower one (torch.bucketize over the midpoints, exact and
deterministic). Dequantized: level[code] * scale; an all-zero block dequantizes to exactly 0.

Hadamard option (`hadamard=True`, storage format NFH; off by default): each block x of n channels
(n a power of 2) is first transformed, y = x @ H_n with H_n the Sylvester Hadamard matrix divided by
sqrt(n) (orthonormal and symmetric, so H_n @ H_n = I), and y is quantized as above; dequantization
computes level[code] * scale, then multiplies by H_n again. As in QuaRot (arXiv 2404.00456), the
transform spreads a few large channels over the whole block, so the block looks like the normal
sample NF levels are built for. Keys' outlier channels otherwise set every block's absmax (measured
on SmolLM2: README). `fwht` computes x @ H_n with log2(n) add/subtract butterflies, all elementwise,
so the result does not depend on how many tokens are transformed together.

Storage formats "nf" and "nfh" (NF of the Hadamard-transformed blocks; the kernels read it as "nf"
in the transformed basis): 4- and 2-bit codes are packed 2 and 4 a byte (low bits first); 3-bit codes
8 in 3 bytes (one little-endian 24-bit word), so head_dim must be a multiple of 8 for them. One scale
per block, no minimum: memory per element bits + 16 / block_size with a 16-bit cache.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from ..errors import KVQuantOptionError
from ..layout import Layout
from .base import Format, Method, check_packing, per_token_layouts

if TYPE_CHECKING:
    from ..config import Config


@functools.lru_cache(maxsize=None)
def _levels64(bits: int) -> Tensor:
    n = 2 ** bits
    half = 2 ** (bits - 1)
    offset = 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))
    f64 = torch.float64
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=f64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=f64)[:-1])
    v = torch.cat([positive, negative, torch.zeros(1, dtype=f64)]).sort().values
    return v / v.max()


_LEVELS = {}  # (bits, device) -> table: a plain dict, so that a compiled graph reads a table made before it


def levels(bits: int, device: torch.device | str = "cpu") -> Tensor:
    """The 2^bits NormalFloat levels, sorted, float32, in [-1, 1] with an exact 0 (see module doc).
    Made once per device (no host-to-device copy per decode step): do not modify it. Traced by Dynamo
    after a first call made it, it is a constant input of the graph, not a computation in it."""
    key = (bits, str(torch.device(device)))
    table = _LEVELS.get(key)
    if table is None:
        table = _LEVELS[key] = _levels64(bits).to(device=device, dtype=torch.float32)
    return table


@functools.lru_cache(maxsize=None)
def midpoints(bits: int, device: torch.device | str = "cpu") -> Tensor:
    """The 2^bits - 1 decision boundaries between consecutive levels, float32 (made once per device)."""
    lv = levels(bits, device)
    return (lv[:-1] + lv[1:]) / 2


def fwht(x: Tensor) -> Tensor:
    """x @ H_n over the last dim (n a power of 2), H_n the Sylvester Hadamard matrix / sqrt(n): its
    own inverse. Butterflies in x's dtype (float32 here), then one multiply by 1/sqrt(n)."""
    n = x.shape[-1]
    shape, h = x.shape, 1
    while h < n:
        y = x.reshape(*shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(shape)
        h *= 2
    return x * (1.0 / math.sqrt(n))


def quantize(xg: Tensor, bits: int, dtype: torch.dtype, dim: int) -> Tuple[Tensor, Tensor, None]:
    """Blocks along `dim` of xg (float32) -> (codes uint8 shaped as xg, scale keepdim in `dtype`, None)."""
    scale = xg.abs().amax(dim=dim, keepdim=True).to(dtype)
    s = scale.float()
    u = torch.where(s > 0, xg / s, 0.0)
    codes = torch.bucketize(u, midpoints(bits, xg.device), right=False)
    return codes.to(torch.uint8), scale, None


def dequantize(codes: Tensor, scale: Tensor, mn: Optional[Tensor], bits: int) -> Tensor:
    """codes (uint8) and their blocks' scale (broadcastable) -> float32 values level[code] * scale."""
    return levels(bits, codes.device)[codes.long()] * scale.float()


NF = Format("nf", bits=(2, 3, 4), has_min=False, kernel=1, quantize=quantize, dequantize=dequantize, levels=levels,
            bounds=midpoints)
NFH = Format("nfh", bits=NF.bits, has_min=False, kernel=None, quantize=quantize, dequantize=dequantize,
             transform=fwht, plain="nf")


def layouts(config: "Config", head_dim: int) -> Tuple[Layout, Layout]:
    bs = min(config.block_size, head_dim)
    if head_dim % bs:
        divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
        raise KVQuantOptionError(
            f"block_size {config.block_size} does not fit head_dim {head_dim}: nqkv quantizes blocks of "
            f"min(block_size, head_dim) channels of one token, which must divide head_dim (valid block "
            f"sizes here: {', '.join(map(str, divisors))}, or any size >= {head_dim})"
        )
    if config.hadamard and bs & (bs - 1):
        powers = [d for d in (2 ** i for i in range(1, 12)) if head_dim % d == 0]
        raise KVQuantOptionError(
            f"hadamard=True needs blocks of a power-of-2 size: min(block_size {config.block_size}, head_dim "
            f"{head_dim}) = {bs} is not (valid block sizes here: {', '.join(map(str, powers)) or 'none'})"
        )
    check_packing(head_dim, **config.bits_options())
    return per_token_layouts(config, (NFH if config.hadamard else NF).name, (config.key_bits, config.value_bits), bs)


METHOD = Method("nqkv", (NF, NFH), layouts, default_bits=4)
