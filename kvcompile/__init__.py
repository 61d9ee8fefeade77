"""kvcompile: KV-cache quantization as a torch.compile backend.

    model = torch.compile(model, backend="kvquant", options={"method": "kivi", "bits": 2})

The backend is registered through an entry point; importing this package is only needed for the
helpers below.
"""

from .config import Config
from .report import KVQuantWarning, explain, reports, reset
from .state import KVState, nbytes

__all__ = ["Config", "KVQuantWarning", "KVState", "explain", "reports", "reset", "nbytes", "cache_nbytes"]
__version__ = "0.1.0"


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers Cache (or any object with `.layers[i].keys/.values`, or a
    (k, v) tuple nesting): packed size for quantized states, numel * itemsize otherwise."""
    import torch

    if isinstance(cache, torch.Tensor):
        return nbytes(cache)
    if isinstance(cache, (list, tuple)):
        return sum(cache_nbytes(c) for c in cache)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        total = 0
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += nbytes(t)
        return total
    raise TypeError(f"cache_nbytes: cannot walk a {type(cache).__name__}")
