"""The `kvquant` torch.compile backend: validate options -> rewrite the graph -> hand it on.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so
`torch.compile(model, backend="kvquant", options={...})` works without importing kvcompile.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.fx as fx

from .config import Config
from .passes.rewrite import rewrite


def _passthrough_error(e: ValueError) -> Exception:
    """Dynamo wraps backend exceptions in BackendCompilerFailed; a bad option should reach the user
    as the ValueError it is. Dynamo re-raises its ShortenTraceback family as is, so the error is
    given that base too (it stays a ValueError)."""
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover - other torch versions
        return e

    class KVQuantOptionError(ShortenTraceback, ValueError):
        pass

    err = KVQuantOptionError(str(e), first_useful_frame=None)
    return err


def compile_graph(gm: fx.GraphModule, example_inputs: List[Any], config: Config) -> Callable:
    """Compile the rewritten `gm` with `config.compiler`."""
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def kvquant(gm: fx.GraphModule, example_inputs: List[Any], options: Optional[Mapping[str, Any]] = None) -> Callable:
    """torch.compile backend: quantize the KV cache of any decoder. See README for the options."""
    try:
        config = Config.from_options(options)
        rewrite(gm, config)  # raises ValueError if the options cannot fit a matched layer
    except ValueError as e:
        raise _passthrough_error(e) from None
    return compile_graph(gm, example_inputs, config)
