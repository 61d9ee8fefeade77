"""Hand-written decoders in the idioms of public codebases (examples/decoders.py), through the backend with
their own decode loop: `none` bit-exact to the uncompiled model, kivi and int8 equal to the eager
reference of the same semantics (fakequant.FakeQuantStream on the decoder's own cache), every cache
tensor a KVState holding the packed bytes, and the report saying how attention reads it."""

from __future__ import annotations

import warnings

import pytest
import torch

import kvcompile
from helpers import max_abs_diff
from kvcompile import Config, KVQuantWarning, KVState
from kvcompile.fakequant import FakeQuantStream
from decoders import Decoder, Idiom, run

METHODS = {"kivi": dict(method="kivi", bits=2, group_size=4, residual_length=8),
           "int8": dict(method="int8"), "none": dict(method="none")}


def check(idiom: Idiom, method: str = "kivi", steps: int = 14, prefill: int = 6, batch: int = 2) -> list:
    """Compile, decode, compare; returns the reports."""
    model = Decoder(idiom).eval()
    idiom = model.idiom
    options = METHODS[method]
    ids = torch.randint(0, 64, (batch, prefill + steps), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    kvcompile.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVQuantWarning)  # nothing left alone
        got, cache = run(torch.compile(model, backend="kvquant", options=dict(options, compiler="eager")), ids, prefill)
    reports = kvcompile.reports()
    assert reports and all(len(r.quantized) == 2 * len(model.blocks) for r in reports), kvcompile.explain()
    tensors = [t for layer in cache for t in layer]
    assert all(isinstance(t, KVState) for t in tensors), [type(t) for t in tensors]
    if idiom.kv_heads > 1:  # (one KV head: a size-1 heads dim, which the layout may leave out)
        assert all(t.kv_layout.logical == idiom.logical(t.kv_layout.role) for t in tensors)
    if method == "none":
        want, _ = run(model, ids, prefill)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), max_abs_diff(got, want)
        return reports
    streams = {}

    def hook(layer, role, x):
        s = streams.setdefault((layer, role), FakeQuantStream(Config(**options), role, idiom.logical(role),
                                                              idiom.kv_heads))
        return s(x)

    want, _ = run(model, ids, prefill, hook=hook)
    fp, _ = run(model, ids, prefill)
    err, quant = max_abs_diff(got, want), max_abs_diff(got, fp)
    assert err < 1e-5 and quant > 100 * max(err, 1e-7), (err, quant, idiom)
    # the packed bytes: codes, scales (+ minimums) and residual of each (B, Hkv) row, no full-precision copy
    for t in tensors:
        assert kvcompile.nbytes(t) == sum(x.numel() * x.element_size() for x in (t.codes, t.scale, t.mn, t.res))
        assert t.res.shape[2] - 2 <= max(t.kv_layout.residual, 1) + 1
    return reports


from strategies import ATTENTION, LAYOUTS, REPEATS


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ["kivi", "int8", "none"])
def test_layouts(layout, method):
    check(Idiom(layout=layout, attention="matmul"), method)


@pytest.mark.parametrize("repeat", REPEATS)
def test_head_repeats(repeat):
    check(Idiom(repeat=repeat, attention="sdpa"))
    check(Idiom(repeat=repeat, attention="matmul", layout="bthd"))


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("method", ["kivi", "none"])
def test_attention_forms(attention, method):
    reports = check(Idiom(attention=attention, repeat="none" if attention == "einsum" else "index"), method)
    # decode reads the packed cache (bmm: the values; its scores go through baddbmm, read dequantized)
    assert any(e.attention for r in reports for e in r.entries), [str(r) for r in reports]


@pytest.mark.parametrize("scale, softmax32", [("q", False), ("k", False), ("scores", True)])
def test_scales_and_softmax(scale, softmax32):
    check(Idiom(attention="matmul", scale=scale, softmax32=softmax32))


@pytest.mark.parametrize("method", ["kivi", "int8", "none"])
def test_pre_rope_cache(method):
    """The cache holds the keys before RoPE: they are quantized as cached; attention reads them
    dequantized (RoPE applied to the whole cache every step) and the report says so."""
    reports = check(Idiom(rope="pre", attention="matmul", layout="bthd"), method)
    notes = [n for r in reports[1:] for n in r.notes]
    assert any("pre-RoPE" in n for n in notes), [str(r) for r in reports]


def test_mqa_and_mha():
    check(Idiom(kv_heads=1, repeat="interleave", attention="sdpa", layout="tbhd"))
    check(Idiom(kv_heads=4, repeat="none", attention="at", layout="btc"))


def test_object_cache():
    """The decoder keeps its cache in lists on an object it updates in place (Dynamo writes them back)."""
    check(Idiom(cache="object", layout="bthd", attention="sdpa"))
    check(Idiom(cache="object", layout="btc", attention="einsum", repeat="none"), "int8")
