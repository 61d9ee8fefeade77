"""method="none": full precision kept in the same state object (the rewrite must be exact)."""

from __future__ import annotations

from typing import Tuple

from ..config import Config
from . import CHANNEL_AXIS, TOKEN_AXIS, Layout


def layouts(config: Config) -> Tuple["Layout", "Layout"]:
    return (
        Layout("none", "k", 16, 1, TOKEN_AXIS, 0),
        Layout("none", "v", 16, 1, CHANNEL_AXIS, 0),
    )
