"""Tiny random decoders of the architectures the backend is tested on, and decode loops."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor
from transformers import (
    DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

VOCAB = 64
ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def tiny(arch: str, attn: str = "sdpa", heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 2,
         seed: int = 0) -> torch.nn.Module:
    """A random tiny decoder. GPT-2 has no GQA (kv_heads is ignored)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=heads)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=heads * head_dim, n_layer=layers, n_head=heads, n_positions=512)
        model = GPT2LMHeadModel(cfg)
    else:
        cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
        cfg = cls[0](hidden_size=heads * head_dim, intermediate_size=64, num_key_value_heads=kv_heads,
                     head_dim=head_dim, max_position_embeddings=512, **common)
        if arch == "mistral":
            cfg.sliding_window = None  # full-attention layers here; tests/test_sliding.py has the sliding ones
        model = cls[1](cfg)
    model.config._attn_implementation = attn
    # reduce the chance that two random logits tie under argmax (generate comparisons)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model.eval()


@torch.no_grad()
def decode(model: Callable, ids: Tensor, prefill: int, cache=None, attention_mask: Optional[Tensor] = None
           ) -> List[Tensor]:
    """Teacher-forced: prefill `prefill` tokens, then feed the rest one at a time. Returns the logits of
    every call ([B, L, V] each)."""
    cache = DynamicCache() if cache is None else cache
    out = []
    for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        kwargs = dict(past_key_values=cache, use_cache=True)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :end]
        out.append(model(ids[:, start:end], **kwargs).logits)
    return out
