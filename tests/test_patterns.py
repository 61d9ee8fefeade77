"""Graphs that are not transformers models: a hand-written cat decoder (examples/), and graphs the
pass must leave alone (with a warning, running correctly)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from helpers import max_abs_diff
import kvcompile
from kvcompile import Config, KVQuantWarning, KVState
from kvcompile.fakequant import FakeQuantLayer
from kvcompile.methods import layouts
from catdecoder import CatDecoder  # examples/


def _steps(model, idx, prefill, transform=None):
    out, cache = [], None
    for s, e in [(0, prefill)] + [(t, t + 1) for t in range(prefill, idx.shape[1])]:
        logits, cache = model(idx[:, s:e], cache)
        if transform is not None:
            cache = transform(cache)
        out.append(logits)
    return out, cache


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_cat_decoder_kivi_follows_reference(heads, kv_heads):
    torch.manual_seed(0)
    model = CatDecoder(dim=32, n_head=heads, n_kv_head=kv_heads).eval()
    idx = torch.randint(0, 64, (2, 30))
    options = dict(method="kivi", bits=2, group_size=4, residual_length=8, compiler="eager")
    with torch.no_grad():
        got, cache = _steps(torch.compile(model, backend="kvquant", options=options), idx, 5)
        ref_layers = [FakeQuantLayer(Config(**options)) for _ in model.blocks]
        k_layout, v_layout = layouts(Config(**options), 8)

        def fake_quant(c):
            return [(lay._compact(k, k_layout), lay._compact(v, v_layout)) for lay, (k, v) in zip(ref_layers, c)]

        want, _ = _steps(model, idx, 5, fake_quant)
        fp, _ = _steps(model, idx, 5)
    for step, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {step}: {(a - b).abs().max().item()}"
    assert max_abs_diff(got, fp) > 0
    assert len(cache) == 2 and all(isinstance(t, KVState) for kv in cache for t in kv)
    assert counters["kvquant"]["attention_rewritten"] > 0


def test_cat_decoder_none_is_exact():
    torch.manual_seed(0)
    model = CatDecoder().eval()
    idx = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        got, _ = _steps(torch.compile(model, backend="kvquant", options=dict(method="none", compiler="eager")), idx, 4)
        want, _ = _steps(model, idx, 4)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class ReusedCache(torch.nn.Module):
    """The cat result is also read by something other than attention: must not be rewritten."""

    def forward(self, q, k_past, v_past, k_new, v_new):
        k = torch.cat([k_past, k_new], dim=2)
        v = torch.cat([v_past, v_new], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return out + k.mean(), k, v


@pytest.mark.slow
def test_intermediate_reused_is_left_alone_with_a_warning():
    """The keys are also read by something that is not attention (a mean): left alone, with the reason. The
    values are still a cache read by attention: quantized, and that SDPA reads them dequantized, since
    its keys are not a quantized cache."""
    model = ReusedCache()
    args = [torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 1, 8),
            torch.randn(1, 2, 1, 8)]
    f = torch.compile(model, backend="kvquant", options=dict(method="kivi", group_size=4, residual_length=8))
    with pytest.warns(KVQuantWarning, match="left 1 cache update") as rec:
        got = f(*args)
    assert len([w for w in rec if issubclass(w.category, KVQuantWarning)]) == 1
    want = model(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.dequantize() if isinstance(a, KVState) else a, b)
    assert type(got[1]) is torch.Tensor and isinstance(got[2], KVState)
    assert counters["kvquant"]["cache_updates_quantized"] == 1
    assert counters["kvquant"]["cache_updates_left_alone"] == 1
    text = kvcompile.explain()
    assert "left alone" in text and "mean" in text  # names the use it did not understand
    assert "attention reads it dequantized (its attention partner is not read from a quantized cache)" in text


def test_attention_without_cache_warns_and_runs():
    from models import tiny

    model = tiny("llama")
    ids = torch.randint(0, 64, (1, 7))
    f = torch.compile(model, backend="kvquant", options=dict(compiler="eager"))
    with pytest.warns(KVQuantWarning, match="no KV-cache update"):
        got = f(ids, use_cache=False).logits
    assert torch.equal(got, model(ids, use_cache=False).logits)
