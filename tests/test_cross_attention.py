"""An encoder-decoder (tiny BART): the decoder's self-attention cache is quantized; its
cross-attention cache (the encoder's keys and values, appended once) is left alone, untouched."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

import kvcompile
from kvcompile import KVState


def _bart(attn: str):
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)
    cfg._attn_implementation = attn
    return BartForConditionalGeneration(cfg).eval()


def _generate(model, src):
    return model.generate(src, max_new_tokens=20, min_new_tokens=20, do_sample=False, num_beams=1,
                          return_dict_in_generate=True)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_cross_attention_cache_is_left_alone(attn):
    src = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    want = _generate(_bart(attn), src).sequences

    none = _bart(attn)
    none.compile(backend="kvquant", options=dict(method="none", compiler="eager"))
    assert torch.equal(_generate(none, src).sequences, want)  # passthrough: exact

    model = _bart(attn)
    kvcompile.reset()
    model.compile(backend="kvquant", options=dict(method="kivi", bits=4, group_size=4, residual_length=4,
                                                  compiler="eager"))
    with pytest.warns(kvcompile.KVQuantWarning, match="cross-attention"):
        out = _generate(model, src)
    cache = out.past_key_values
    for layer in cache.self_attention_cache.layers:  # 21 tokens: most of them quantized
        assert isinstance(layer.keys, KVState) and isinstance(layer.values, KVState)
    for layer in cache.cross_attention_cache.layers:  # the encoder's 24 tokens, as the model computed them
        assert type(layer.keys) is torch.Tensor and type(layer.values) is torch.Tensor
        assert layer.keys.shape[2] == src.shape[1]
    prefill = kvcompile.reports()[0]
    assert len(prefill.quantized) == 4 and len(prefill.left_alone) == 4  # 2 layers x (self, cross) x (k, v)
    assert all("cross-attention" in e.reason for e in prefill.left_alone)  # 4 of them, above
    decode_graphs = kvcompile.reports()[1:]
    assert decode_graphs and all(len(r.quantized) == 4 and not r.left_alone for r in decode_graphs)
