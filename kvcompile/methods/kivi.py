"""KIVI (arXiv 2402.02750): keys per channel, values per token, full-precision residual window.

Keys: groups of G consecutive tokens of one (batch, head, channel). New keys join a
full-precision residual; when it holds R tokens (R a multiple of G) all R are quantized.
A prefill of T0 tokens quantizes the first T0 - T0 % R.
Values: groups of min(G, head_dim) consecutive channels of one token. The newest R tokens stay in
full precision; a token leaving that window is quantized on its own.
Attention reads the cache after this step's tokens are appended and before the quantization
above: it takes effect from the next step.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..config import Config
from . import CHANNEL_AXIS, TOKEN_AXIS, Layout, SymInt, check_packing


def layouts(config: Config, head_dim: int) -> Tuple[Layout, Layout]:
    g, r = config.group_size, config.residual_length
    vg = min(g, head_dim)
    if head_dim % vg:
        raise ValueError(
            f"group_size {g} does not fit head_dim {head_dim}: values are quantized per token in "
            f"groups of min(group_size, head_dim) channels, which must divide head_dim "
            f"(valid group sizes here: divisors of {head_dim}, or any size >= {head_dim})"
        )
    check_packing(head_dim, k_bits=config.key_bits, v_bits=config.value_bits)
    return (
        Layout("kivi", "k", config.key_bits, g, TOKEN_AXIS, r),
        Layout("kivi", "v", config.value_bits, vg, CHANNEL_AXIS, r),
    )


def n_quantize(layout: Layout, n_res: SymInt) -> SymInt:
    if layout.axis == TOKEN_AXIS:
        # keys: flush whole windows of R tokens
        return (n_res // layout.residual) * layout.residual
    # values: everything older than the newest R tokens
    return torch.sym_max(n_res - layout.residual, 0)
