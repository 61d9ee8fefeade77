"""Every decoder family of the zoo (tests/zoo.py): `none` equals the uncompiled model, kivi matches
the eager reference with all 2 x num_layers cache updates rewritten per graph, and what cannot be
handled is left alone with the documented reason, correctly."""

from __future__ import annotations

import pytest
import torch

import zoo

pytestmark = pytest.mark.slow  # every test here compiles several models (pytest -m "not slow": the core)

# families with sliding-window layers: a decode graph while the window fills and one once it drops
# tokens (and growing steps), each with every K and V rewritten; fully left alone:
SLIDING = {"gemma2", "gemma3_text"}
LEFT_ALONE: dict = {}  # family -> a word of the reason (none today: Bloom's ALiBi baddbmm is read dequantized)


CASES = [(f, a) for f in zoo.FAMILIES for a in zoo.attentions(f)]


@pytest.mark.parametrize("family, attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_zoo(family, attn):
    r = zoo.run(family, attn)
    assert r.none_exact, "method none must give the unrewritten graph's logits bit for bit"
    # exact where plain Dynamo (backend="eager") is: where its own graph already differs from the uncompiled model
    # (rounding of a reordered op, family and transformers release dependent), within 1e-6
    tol = 1e-6 if r.err_dynamo_vs_uncompiled > 0 else 0.0
    assert r.err_none_vs_uncompiled <= tol, r.err_none_vs_uncompiled
    if family in LEFT_ALONE:  # unquantized, and correct
        assert r.err_kivi_vs_fp <= tol, r.err_kivi_vs_fp
    else:
        assert r.err_kivi_vs_reference <= tol, r.err_kivi_vs_reference
    if family in SLIDING:
        assert r.status == "quantized", r
        assert len(r.per_graph_quantized) >= 3 and set(r.per_graph_quantized) == {2 * r.layers}, r
    elif family in LEFT_ALONE:
        assert r.status == "left alone", r
        assert any(LEFT_ALONE[family] in why for why in r.left_alone), r.left_alone
    else:
        assert r.status == "quantized", r
        assert r.per_graph_quantized == [2 * r.layers] * 2  # prefill and decode, every K and V


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode", "gemma3_text"])
def test_zoo_generate(family):
    model, cfg = zoo.make(family, zoo.attentions(family)[0])
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        model.compile(backend="kvquant", options=dict(zoo.OPTIONS, method="none"))
        got = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
