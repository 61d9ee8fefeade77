"""The `kvquant` torch.compile backend: validate options -> rewrite the graph -> hand it on.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so
`torch.compile(model, backend="kvquant", options={...})` works without importing kvcompile.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.fx as fx

from .buffers import swapping
from .config import Config
from .errors import KVQuantOptionError, KVQuantWarning
from .passes.rewrite import rewrite
from .report import log

# A generation compiles a few graphs per shape it meets (prefill, decode with the packed storage
# appending or growing, per batch size, padding and cache kind); several generate() calls with other
# settings pass Dynamo's default limit of 8 per frame, after which the frame would run uncompiled.
RECOMPILE_LIMIT = 64


def compile_graph(gm: fx.GraphModule, example_inputs: List[Any], config: Config) -> Callable:
    """Compile the rewritten `gm` with `config.compiler`."""
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    from .ops import kernels

    if kernels() != "inline":
        return compile_fx(gm, example_inputs)
    from torch._inductor.decomposition import select_decomp_table

    from .kernels import cpu

    # the CPU's decode attention over the packed cache, compiled into this graph (kernels/cpu.py)
    table = {**select_decomp_table(), torch.ops.kvquant.attention.default: cpu.decompose_attention}
    try:
        return compile_fx(gm, example_inputs, decompositions=table)
    except Exception as e:  # noqa: BLE001 - Inductor's own failure on the decomposition: the ops still run
        compiled = compile_fx(gm, example_inputs)  # a failure of its own raises here, as without the table
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        warnings.warn(KVQuantWarning(f"the CPU's fused decode attention did not compile ({msg}); this graph reads "
                                     f"the quantized cache through the reference ops instead (still quantized)"))
        return compiled


def _raises(error: KVQuantOptionError) -> Callable:
    """A compiled graph that raises the options' error when called: the user gets the error as it is
    (a KVQuantOptionError, not wrapped in Dynamo's BackendCompilerFailed), before anything is computed."""
    message = str(error)

    def bad_options(*args: Any) -> Any:
        raise KVQuantOptionError(message)

    return bad_options


def _graph_break(gm: fx.GraphModule) -> Optional[str]:
    """Where and why Dynamo ended this graph at a graph break (None if it ended at the frame's return)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    where = ""
    if getattr(reason, "user_stack", None):
        top = reason.user_stack[-1]
        where = f" at {top.filename}:{top.lineno}"
    first = str(reason.reason).strip().splitlines()[0] if str(reason.reason).strip() else "a graph break"
    return f"{first}{where}"


def _raise_recompile_limit() -> None:
    """Give the compiled region being traced (the user's torch.compile call) a recompile limit of at least
    RECOMPILE_LIMIT, as `torch.compile(..., recompile_limit=N)` would, and Dynamo's default limit too: a
    frame's graphs count against the limit across every torch.compile call of it (a model compiled again
    with other options, or a copy of it compiled for generate()), and a new call's region starts at the
    default before its first graph is compiled. A private part of Dynamo: where it is missing, the limit
    stays; a frame that still reaches it is warned about (_RecompileLimitWatch, state.warn_eager)."""
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        log.info("kvquant: torch._dynamo.config.recompile_limit raised from %d to %d",
                 torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    frame = sys._getframe(1)
    while frame is not None:
        convert = frame.f_locals.get("self")
        if type(convert).__name__ == "ConvertFrameAssert" and hasattr(convert, "_recompile_limit"):
            limit = convert._recompile_limit or torch._dynamo.config.recompile_limit
            if limit < RECOMPILE_LIMIT:
                convert._recompile_limit = RECOMPILE_LIMIT
                log.info("kvquant: recompile limit of this compiled region raised from %d to %d", limit,
                         RECOMPILE_LIMIT)
            return
        frame = frame.f_back


class _RecompileLimitWatch(logging.Filter):
    """Dynamo says on its convert_frame logger when a frame hits its recompile limit: from then on new
    shapes of that frame run uncompiled, and a cache they create is never quantized (nothing of
    kvcompile's runs to notice). Once kvquant has compiled a graph in this process, that log line also
    becomes a KVQuantWarning (shown once per function by the warnings filter's default)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from torch._dynamo.utils import counters

        msg = str(record.msg)
        if "hit config." in msg and counters["kvquant"]["graphs"] and len(record.args or ()) >= 3:
            limit_type, limit, function = record.args[:3]
            warnings.warn(
                f"kvquant: Dynamo's recompile limit (torch._dynamo.config.{limit_type} = {limit}) was reached for "
                f"{function}: its new shapes now run uncompiled, so a KV cache they create stays in full "
                f"precision (an existing quantized cache stays quantized, read dequantized). Raise "
                f"torch._dynamo.config.{limit_type}, or call torch._dynamo.reset() between unrelated workloads "
                f"(TORCH_LOGS=recompiles shows why it recompiled).", KVQuantWarning, stacklevel=2)
        return True


logging.getLogger("torch._dynamo.convert_frame").addFilter(_RecompileLimitWatch())


def _without_grad(compiled: Callable) -> Callable:
    """The rewritten attention has no backward: a graph traced with gradients on runs, and returns
    outputs that do not require grad (said once per graph by a KVQuantWarning)."""

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return compiled(*args)

    return run


def kvquant(gm: fx.GraphModule, example_inputs: List[Any], options: Optional[Mapping[str, Any]] = None) -> Callable:
    """torch.compile backend: quantize the KV cache of any decoder. See README for the options."""
    try:
        config = Config.from_options(options)
        report = rewrite(gm, config, graph_break=_graph_break(gm))  # raises if the options cannot fit a layer
    except KVQuantOptionError as e:
        return _raises(e)
    if not report.rewrote and not report.swaps:
        return compile_graph(gm, example_inputs, config)
    _raise_recompile_limit()
    if report.rewrote and torch.is_grad_enabled() and \
            any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        warnings.warn("kvquant: this graph was called with gradients enabled, but the quantized KV-cache ops have "
                      "no backward: it runs without gradients (its outputs do not require grad). Call the model "
                      "under torch.no_grad() or torch.inference_mode() for generation.", KVQuantWarning, stacklevel=2)
        with torch.no_grad():
            compiled = _without_grad(compile_graph(gm, example_inputs, config))
    else:
        compiled = compile_graph(gm, example_inputs, config)
    return swapping(compiled, report.swaps) if report.swaps else compiled


# ---------------------------------------------------------------------------------------------
# torch.compile(model, backend="kvquant").generate(...): generate() belongs to the original module and
# calls its uncompiled forward, so nothing would be compiled or quantized. The compiled module's
# generate runs the original's with the forward compiled by the same torch.compile context (as
# `model.forward = torch.compile(model.forward, ...)` would; Dynamo caches its graphs on forward's code,
# so every generate() reuses them). A private part of Dynamo (OptimizedModule, its dynamo_ctx): where it
# differs, generate() stays as torch has it, and the README says to use model.compile().


def _is_kvquant(compiled: Any) -> bool:
    """Whether a torch.compile'd module was compiled with this backend."""
    obj = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(8):
        if obj is None:
            return False
        if getattr(obj, "compiler_name", None) == "kvquant" or getattr(obj, "__name__", None) == "kvquant":
            return True
        obj = getattr(obj, "_torchdynamo_orig_backend", None)
    return False


def _generate(compiled: Any, generate: Callable, *args: Any, **kwargs: Any) -> Any:
    model = compiled._orig_mod
    own = model.__dict__.get("forward")  # a forward the user set on the instance
    model.forward = compiled.dynamo_ctx(own if own is not None else type(model).forward.__get__(model))
    try:
        return generate(*args, **kwargs)
    finally:
        if own is not None:
            model.forward = own
        else:
            del model.forward


def _install_generate() -> None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:
        return
    getattr_ = OptimizedModule.__getattr__
    if getattr(getattr_, "_kvquant", False):
        return

    def __getattr__(self: Any, name: str) -> Any:
        value = getattr_(self, name)
        if name == "generate" and callable(value) and _is_kvquant(self) and hasattr(self, "_orig_mod"):
            return functools.partial(_generate, self, value)
        return value

    __getattr__._kvquant = True  # type: ignore[attr-defined]
    OptimizedModule.__getattr__ = __getattr__


_install_generate()
