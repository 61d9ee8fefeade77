"""method="none": full precision kept in the same state object (the rewrite must be exact).

Storage format "none": nothing is quantized; only the residual holds tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

from ..layout import CHANNEL_AXIS, TOKEN_AXIS, Layout
from .base import Format, Method

if TYPE_CHECKING:
    from ..config import Config

FORMAT = Format("none", bits=(16,), has_min=False, kernel=4)


def layouts(config: "Config", head_dim: int) -> Tuple[Layout, Layout]:
    return (
        Layout("none", "k", "none", 16, 1, TOKEN_AXIS, 0),
        Layout("none", "v", "none", 16, 1, CHANNEL_AXIS, 0),
    )


METHOD = Method("none", (FORMAT,), layouts, default_bits=16, n_quantize=lambda layout, n_res: 0)
