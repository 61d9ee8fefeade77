"""An eager reference for the quantization semantics: a transformers cache that applies a method's
rules to full-precision tensors (quantize, then dequantize at once).

It is written directly from the semantics in methods/ (which tokens are quantized when) and the
reference quantizer, with none of the compiled machinery (no state subclass, no graph rewrite), so
it is the oracle the compiled path is tested against, and a way to measure a method's accuracy on
any model without compiling:

    cache = FakeQuantCache(Config(method="kivi", bits=2))
    model(input_ids, past_key_values=cache, use_cache=True)

Each layer keeps keys and values as [B, H, T, D] tensors whose oldest `n_q` tokens hold
dequantized values and the rest the full-precision residual. `update` appends the new tokens,
returns the cache for attention to read, then quantizes what the method says leaves the residual
(from the next step on), exactly as the compiled path does.

Sliding-window layers (FakeQuantSlidingLayer) do what transformers' DynamicSlidingWindowLayer does,
then the same: the tokens that leave the window are forgotten, quantized or not, and the tokens kept
keep their values (a KIVI key group that loses its oldest tokens keeps its scale).

FakeQuantStaticCache is the oracle for StaticCache (a fixed buffer written in place): every token is
quantized as it is written, and attention reads the buffer, this step's tokens included, quantized; where
the method keeps a full-precision window (kivi, residual_length > 0), the tokens written are kept as a
growing cache keeps them.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from transformers import cache_utils
from transformers.cache_utils import (Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, StaticCache, StaticLayer,
                                      StaticSlidingWindowLayer)

from .config import Config
from .kernels import reference as ref
from .layout import Layout
from .methods import layouts, static_reason


def compact(x: Tensor, n_q: int, layout: Layout) -> Tuple[Tensor, int]:
    """A cache [B, H, T, D] whose n_q oldest tokens hold dequantized values, after this step's
    quantization: (the cache, the new n_q)."""
    n = int(layout.n_quantize(x.shape[2] - n_q))
    if n == 0:
        return x, n_q
    deq = ref.qdq(x[:, :, n_q:n_q + n], layout)
    return torch.cat([x[:, :, :n_q], deq, x[:, :, n_q + n:]], dim=2), n_q + n


class FakeQuantStream:
    """The semantics for a cache the model keeps itself (a tuple it returns and is fed back, an attribute):
    call it on the whole cache tensor after each step's append, in the model's layout (Layout.logical),
    and keep what it returns instead (attention reads the tensor before this call, as in the compiled
    path). One per cache tensor."""

    def __init__(self, config: Config, role: str, logical: str = "bhtd", heads: int = 0) -> None:
        self.config, self.role, self.logical, self.heads, self.n_q = config, role, logical, heads, 0

    def __call__(self, x: Tensor) -> Tensor:
        probe = Layout("", self.role, "none", 16, 1, 0, 0, logical=self.logical, heads=self.heads)
        c = probe.to_canonical(x)
        both = layouts(self.config, c.shape[-1])
        lay = (both[0] if self.role == "k" else both[1])._replace(logical=self.logical, heads=self.heads)
        c, self.n_q = compact(c.contiguous(), self.n_q, lay)
        return lay.from_canonical(c).contiguous()


class _FakeQuant:
    """The bookkeeping shared by full and sliding layers: `n_q[role]` oldest tokens hold dequantized values."""

    def _setup(self, config: Config) -> None:
        self.config = config
        self.n_q = {"k": 0, "v": 0}

    def _compact(self, x: Tensor, layout: Layout) -> Tensor:
        x, self.n_q[layout.role] = compact(x, self.n_q[layout.role], layout)
        return x

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        before = self.keys.shape[-2] if self.keys is not None else 0  # (a hybrid layer's is_initialized is its other part's)
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # the transformers layer's
        dropped = before + key_states.shape[-2] - self.keys.shape[-2]  # left a sliding window
        self.n_q = {r: max(n - dropped, 0) for r, n in self.n_q.items()}
        k_layout, v_layout = layouts(self.config, key_states.shape[-1])
        self.keys = self._compact(self.keys, k_layout)
        self.values = self._compact(self.values, v_layout)
        return keys, values  # attention reads the cache before this step's quantization

    def reset(self) -> None:
        super().reset()
        self.n_q = {"k": 0, "v": 0}

    def crop(self, tokens_to_remove: int) -> None:
        """As the compiled state crops (state.kv_crop): the tokens kept keep their values; a key group the cut
        splits goes back to the full-precision window (quantized again when its new group flushes)."""
        super().crop(tokens_to_remove)
        if self.keys is None or self.keys.dim() != 4:
            return
        kept = self.keys.shape[-2]
        for lay in layouts(self.config, self.keys.shape[-1]):
            self.n_q[lay.role] = min(self.n_q[lay.role], kept) // lay.drop_quantum * lay.drop_quantum


class FakeQuantLayer(_FakeQuant, DynamicLayer):
    def __init__(self, config: Config) -> None:
        DynamicLayer.__init__(self)
        self._setup(config)


class FakeQuantSlidingLayer(_FakeQuant, DynamicSlidingWindowLayer):
    def __init__(self, config: Config, sliding_window: int, **kwargs: Any) -> None:
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window, **kwargs)
        self._setup(config)


# transformers' layer for a Mamba + attention layer (Falcon-H1), in the releases that have one
_HybridLayer = getattr(cache_utils, "LinearAttentionAndFullAttentionLayer", None)
if _HybridLayer is not None:
    class FakeQuantHybridLayer(_FakeQuant, _HybridLayer):
        """A layer keeping both a linear-attention (Mamba) state and attention keys and values: the
        attention part fake-quantized, as the backend quantizes it."""

        def __init__(self, config: Config, **kwargs: Any) -> None:
            _HybridLayer.__init__(self, **kwargs)
            self._setup(config)


class FakeQuantCache(DynamicCache):
    """A DynamicCache whose layers apply `config`'s quantization in fake-quant form (see module doc).

    With `model_config`, the layers follow the model's layer types as DynamicCache(config=...) does:
    sliding-window layers are FakeQuantSlidingLayer, Mamba + attention layers FakeQuantHybridLayer;
    other kinds (e.g. chunked attention) stay full precision, as the backend leaves them (README)."""

    def __init__(self, config: Config, model_config: Optional[Any] = None) -> None:
        if model_config is None:
            Cache.__init__(self, layer_class_to_replicate=lambda: FakeQuantLayer(config))
            return
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
        kinds = {DynamicLayer: lambda **kw: FakeQuantLayer(config),
                 DynamicSlidingWindowLayer: lambda **kw: FakeQuantSlidingLayer(config, **kw)}
        if _HybridLayer is not None:
            kinds[_HybridLayer] = lambda **kw: FakeQuantHybridLayer(config, **kw)
        layers = [kinds.get(DYNAMIC_LAYER_TYPE_MAPPING[t], DYNAMIC_LAYER_TYPE_MAPPING[t])(**kw)
                  for t, kw in zip(types, kwargs)]
        Cache.__init__(self, layers=layers)


def _static_layouts(config: Config, head_dim: int):
    both = layouts(config, head_dim)
    reason = static_reason(config, both)
    if reason:
        raise ValueError(f"kvcompile: a static cache cannot be stored with these options: {reason}")
    return both


class FakeQuantStaticLayer(StaticLayer):
    """A StaticLayer with the compiled path's semantics: each token quantized-dequantized as it is written
    (per token, as kv_static_write does), or, where the method keeps a full-precision window (kivi,
    residual_length > 0), the written tokens kept as a growing cache keeps them (`compact` on the tokens
    written so far, before each write: attention reads a step's tokens before that step's quantization)."""

    def __init__(self, config: Config, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.config = config
        self.written, self.n_q = 0, {"k": 0, "v": 0}

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        both = _static_layouts(self.config, key_states.shape[-1])
        if not any(lay.residual for lay in both):
            return super().update(*(ref.qdq(x, lay) for x, lay in zip((key_states, value_states), both)), *args,
                                  **kwargs)
        if self.is_initialized:
            self.written = min(self.written, int(self.cumulative_length))  # (a crop moves the length back)
            for buf, lay in zip((self.keys, self.values), both):
                self.n_q[lay.role] = min(self.n_q[lay.role], self.written) // lay.drop_quantum * lay.drop_quantum
                x, self.n_q[lay.role] = compact(buf[:, :, :self.written], self.n_q[lay.role], lay)
                buf[:, :, :self.written] = x
        out = super().update(key_states, value_states, *args, **kwargs)
        self.written = int(self.cumulative_length)
        return out

    def reset(self) -> None:
        super().reset()
        self.written, self.n_q = 0, {"k": 0, "v": 0}


class FakeQuantStaticSlidingLayer(StaticSlidingWindowLayer):
    """StaticSlidingWindowLayer as the compiled path stores it: its buffers are quantized only if its
    first write is an `index_copy_` (a prompt shorter than the window; a longer one is copied in
    whole, into a buffer the graph cannot swap); then tokens written by index are quantized as
    written, and a buffer rewritten whole (rolled, or cut from a concatenation) is quantized again
    whole."""

    def __init__(self, config: Config, max_cache_len: int, sliding_window: int, **kwargs: Any) -> None:
        super().__init__(max_cache_len=max_cache_len, sliding_window=sliding_window, **kwargs)
        self.config = config
        self.quantized: Optional[bool] = None
        self.pending: Optional[Tuple[int, bool]] = None  # (tokens written, rewritten whole) to keep next update
        self.n_q = {"k": 0, "v": 0}

    def reset(self) -> None:
        super().reset()
        self.quantized, self.pending, self.n_q = None, None, {"k": 0, "v": 0}

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        current = self.cumulative_length_int if self.is_initialized else 0
        by_index = current + key_states.shape[-2] <= self.max_cache_len  # transformers' index_copy_ branch
        if self.quantized is None:
            self.quantized = by_index
        if not self.quantized:
            return super().update(key_states, value_states, *args, **kwargs)
        both = _static_layouts(self.config, key_states.shape[-1])
        if any(lay.residual for lay in both):  # a full-precision window: as FakeQuantStaticLayer, and a buffer
            # rewritten whole is kept as if all its tokens had been written at once
            if self.pending is not None:
                written, whole = self.pending
                for buf, lay in zip((self.keys, self.values), both):
                    x, self.n_q[lay.role] = compact(buf[:, :, :written], 0 if whole else self.n_q[lay.role], lay)
                    buf[:, :, :written] = x
            out = super().update(key_states, value_states, *args, **kwargs)
            self.pending = (min(current + key_states.shape[-2], self.max_cache_len), not by_index)
            return out
        if by_index:
            return super().update(*(ref.qdq(x, lay) for x, lay in zip((key_states, value_states), both)), *args, **kwargs)
        out = super().update(key_states, value_states, *args, **kwargs)
        for buf, lay in zip((self.keys, self.values), both):
            buf.copy_(ref.qdq(buf, lay))
        return out


class FakeQuantStaticCache(StaticCache):
    """A StaticCache whose layers are FakeQuantStaticLayer / FakeQuantStaticSlidingLayer."""

    def __init__(self, config: Config, model_config: Any, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__(model_config, max_cache_len, **kwargs)
        self.layers = [
            FakeQuantStaticLayer(config, max_cache_len) if type(layer) is StaticLayer
            else FakeQuantStaticSlidingLayer(config, max_cache_len, layer.max_cache_len)
            if type(layer) is StaticSlidingWindowLayer else layer
            for layer in self.layers
        ]
