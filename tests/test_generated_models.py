"""Property test over generated decoders: hypothesis draws a small decoder (family, layers, heads,
KV heads dividing them, head_dim, rope theta, attention implementation, a sliding window for the
families that have one), a batch, a prompt length, decode steps and kivi options, and checks both
promises of the backend on it:

  * method "none": the compiled model's logits equal the uncompiled model's, bit for bit;
  * method "kivi": the compiled model's logits equal the eager reference of the same semantics
    (FakeQuantCache), bit for bit, and every layer's keys and values were rewritten.

With a sliding window (the cache's layers drop their oldest tokens), "bit for bit" becomes "within
1e-6": the graph's sliding mask is computed differently from eager and moves logits by ~1 ulp even
under plain Dynamo (tests/test_sliding.py compares with plain Dynamo exactly).

CI-sized: a handful of examples (derandomized under CI=true so a landing run is reproducible)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import max_abs_diff
import kvcompile
from kvcompile import Config
from kvcompile.fakequant import FakeQuantCache
from models import decode
from strategies import idioms

pytestmark = pytest.mark.slow  # every test here compiles several models (pytest -m "not slow": the core)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SLIDING = {"mistral"}  # families whose config's sliding_window alone makes every layer a window


@st.composite
def decoders(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    group = draw(st.sampled_from([2, 4, 8]))
    family = draw(st.sampled_from(FAMILIES))
    return dict(
        family=family,
        window=draw(st.sampled_from([None, 3, 5, 8])) if family in SLIDING else None,
        layers=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16, 24])),
        rope_theta=draw(st.sampled_from([10000.0, 1e6])),
        attn=draw(st.sampled_from(["sdpa", "eager"])),
        batch=draw(st.integers(1, 2)),
        prompt=draw(st.integers(1, 10)),
        steps=draw(st.integers(1, 8)),
        kivi=dict(method="kivi", bits=draw(st.sampled_from([2, 4])), v_bits=draw(st.sampled_from([2, 4])),
                  group_size=group, residual_length=group * draw(st.integers(1, 2)), compiler="eager"),
    )


def _model(d):
    from transformers import AutoConfig, AutoModelForCausalLM

    # hidden_size 48: every head count drawn divides it (transformers >= 5.24 checks, head_dim given or not)
    cfg = AutoConfig.for_model(d["family"], vocab_size=64, hidden_size=48, intermediate_size=64,
                               num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                               num_key_value_heads=d["kv_heads"], head_dim=d["head_dim"], max_position_embeddings=256,
                               rope_theta=d["rope_theta"], sliding_window=d.get("window"))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=d["attn"]).eval(), cfg



@settings(max_examples=6)  # each example compiles a model three times
@given(decoders())
def test_generated_decoder(d):
    check_decoder(d)


def check_decoder(d):
    """`none` equal to the uncompiled model, every K and V update quantized, kivi equal to the eager
    reference."""
    from transformers import DynamicCache

    model, cfg = _model(d)
    ids = torch.randint(0, 64, (d["batch"], d["prompt"] + d["steps"]), generator=torch.Generator().manual_seed(1))
    fp = decode(model, ids, d["prompt"], DynamicCache(config=cfg))
    same = _equal if d.get("window") is None else _close
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvcompile.KVQuantWarning)  # nothing may be left alone
        torch._dynamo.reset()
        none = decode(torch.compile(model, backend="kvquant", options=dict(method="none", compiler="eager")), ids,
                      d["prompt"], DynamicCache(config=cfg))
        torch._dynamo.reset()
        kvcompile.reset()
        got = decode(torch.compile(model, backend="kvquant", options=d["kivi"]), ids, d["prompt"],
                     DynamicCache(config=cfg))
    assert same(none, fp), d
    reports = kvcompile.reports()
    assert reports and all(len(r.quantized) == 2 * d["layers"] for r in reports), (d, kvcompile.explain())
    want = decode(model, ids, d["prompt"], FakeQuantCache(Config(**d["kivi"]), cfg))
    assert same(got, want), (d, max_abs_diff(got, want))


def _equal(xs, ys):
    return len(xs) == len(ys) > 0 and all(torch.equal(a, b) for a, b in zip(xs, ys))


def _close(xs, ys):
    return len(xs) == len(ys) > 0 and all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(xs, ys))


@pytest.mark.parametrize("head_dim, group", [(64, 32), (80, 16), (96, 32), (128, 32), (256, 32)])
def test_head_dims(head_dim, group):
    """The head sizes real models use (value groups of min(G, head_dim) channels must divide head_dim:
    80 takes G = 16; a group that does not divide is a clear error, tested in test_config)."""
    d = dict(family="llama", layers=1, heads=2, kv_heads=1, head_dim=head_dim, rope_theta=10000.0, attn="sdpa",
             batch=1, prompt=40, steps=12,  # a prefill that quantizes whole key groups
             kivi=dict(method="kivi", bits=2, group_size=group, residual_length=32, compiler="eager"))
    check_decoder(d)


@pytest.mark.parametrize("window, attn", [(5, "sdpa"), (8, "eager")])
def test_sliding_window(window, attn):
    """A window shorter than prompt + steps, so the cache drops tokens both at prefill and in decode."""
    d = dict(family="mistral", window=window, layers=2, heads=4, kv_heads=2, head_dim=8, rope_theta=10000.0,
             attn=attn, batch=2, prompt=7, steps=10,
             kivi=dict(method="kivi", bits=2, group_size=2, residual_length=4, compiler="eager"))
    from transformers import DynamicCache

    assert type(DynamicCache(config=_model(d)[1]).layers[0]).__name__ == "DynamicSlidingWindowLayer"
    check_decoder(d)


@settings(max_examples=6)  # each example compiles a hand-written decoder twice
@given(idioms(), st.sampled_from(["kivi", "int8", "none"]))
def test_generated_hand_written_decoder(idiom, method):
    """Hand-written decoders (examples/decoders.py) drawing every idiom: the cache's layout, the head repeat,
    the attention form, a tuple or an object cache, RoPE before or after caching."""
    from test_decoders import check

    check(idiom, method)
