"""kvcompile: KV-cache quantization as a torch.compile backend.

    model = torch.compile(model, backend="kvquant", options={"method": "kivi", "bits": 2})

The backend is registered through an entry point; importing this package is only needed for the
helpers below.
"""

from .config import Config
from .errors import KVQuantOptionError
from .report import KVQuantWarning, explain, reports, reset
from .state import KVState, nbytes

__all__ = ["Config", "KVQuantOptionError", "KVQuantWarning", "KVState", "explain", "reports", "reset", "nbytes", "cache_nbytes",
           "cache_tensors"]
__version__ = "0.1.0"


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers Cache (or any object with `.layers[i].keys/.values`, or a
    (k, v) tuple nesting): packed size for quantized states, numel * itemsize otherwise."""
    return sum(nbytes(t) for t in cache_tensors(cache))


def cache_tensors(cache) -> list:
    """The key and value tensors of a transformers Cache (`.layers[i].keys/.values`), of a (k, v) tuple
    nesting, or a tensor itself; quantized states included as they are."""
    import torch

    if isinstance(cache, torch.Tensor):
        return [cache]
    if isinstance(cache, (list, tuple)):
        return [t for c in cache for t in cache_tensors(c)]
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, torch.Tensor)]
    raise TypeError(f"kvcompile: cannot walk a {type(cache).__name__} as a KV cache "
                    f"(expected .layers[i].keys/.values, a (k, v) tuple nesting or a tensor)")
