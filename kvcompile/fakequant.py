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
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .config import Config
from .kernels import reference as ref
from .methods import Layout, layouts


class FakeQuantLayer(DynamicLayer):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.n_q = {"k": 0, "v": 0}

    def _compact(self, x: Tensor, layout: Layout) -> Tensor:
        n_q = self.n_q[layout.role]
        n = int(layout.n_quantize(x.shape[2] - n_q))
        if n == 0:
            return x
        seg = x[:, :, n_q:n_q + n]
        deq = ref.dequantize(*ref.quantize(seg, layout.bits, layout.group, layout.axis, layout.fmt),
                             layout.bits, layout.group, layout.axis, x.shape[-1], layout.fmt)
        self.n_q[layout.role] = n_q + n
        return torch.cat([x[:, :, :n_q], deq, x[:, :, n_q + n:]], dim=2)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        k_layout, v_layout = layouts(self.config, key_states.shape[-1])
        self.keys = self._compact(keys, k_layout)
        self.values = self._compact(values, v_layout)
        return keys, values  # attention reads the cache before this step's quantization

    def reset(self) -> None:
        super().reset()
        self.n_q = {"k": 0, "v": 0}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("FakeQuantCache does not support crop")


class FakeQuantCache(DynamicCache):
    """A DynamicCache whose layers apply `config`'s quantization in fake-quant form (see module doc).

    With `model_config`, the layers follow the model's layer types as DynamicCache(config=...) does;
    sliding-window layers then stay in full precision, as the backend leaves them (README)."""

    def __init__(self, config: Config, model_config: Optional[Any] = None) -> None:
        if model_config is None:
            Cache.__init__(self, layer_class_to_replicate=lambda: FakeQuantLayer(config))
            return
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
        layers = [FakeQuantLayer(config) if DYNAMIC_LAYER_TYPE_MAPPING[t] is DynamicLayer
                  else DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for t, kw in zip(types, kwargs)]
        Cache.__init__(self, layers=layers)
