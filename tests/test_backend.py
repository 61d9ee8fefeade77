"""The backend end to end on tiny random decoders: `none` is exact, `kivi` follows the eager
reference (kvcompile.fakequant), generate works, the report and the counters tell what happened."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from torch._dynamo.utils import counters

from helpers import max_abs_diff
import kvcompile
from kvcompile import Config, KVState
from kvcompile.fakequant import FakeQuantCache
from models import ARCHS, VOCAB, decode, tiny
from strategies import kivi_options

SMALL = dict(group_size=4, residual_length=8)  # 3 + 30 steps cross 4 key flushes
STEPS = 33


def _ids(batch, n=STEPS, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _compiled(model, **options):
    return torch.compile(model, backend="kvquant", options=options)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_none_is_exact(arch, attn, batch):
    model = tiny(arch, attn)
    ids = _ids(batch)
    got = decode(_compiled(model, method="none", compiler="eager", **SMALL), ids, 3)
    want = decode(model, ids, 3)
    for step, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max().item()}"
    assert counters["kvquant"]["cache_updates_quantized"] > 0
    assert counters["kvquant"]["attention_rewritten"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch, attn, batch", [("llama", "sdpa", 2), ("gpt2", "eager", 1)])
def test_none_inductor(arch, attn, batch):
    model = tiny(arch, attn)
    ids = _ids(batch)
    got = decode(_compiled(model, method="none"), ids, 3)
    want = decode(model, ids, 3)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def _kivi_vs_reference(model, ids, options, prefill=3, exact=True):
    got = decode(_compiled(model, **options), ids, prefill)
    ref = decode(model, ids, prefill, FakeQuantCache(Config.from_options(options)))
    fp = decode(model, ids, prefill)
    err_ref = max_abs_diff(got, ref)
    err_fp = max_abs_diff(got, fp)
    if exact:
        assert err_ref == 0.0, err_ref
    assert err_ref <= 1e-3 * err_fp, (err_ref, err_fp)  # far closer to the semantics than to fp
    return err_ref, err_fp


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_kivi_follows_reference(arch, attn):
    _kivi_vs_reference(tiny(arch, attn), _ids(2), dict(method="kivi", compiler="eager", **SMALL))


@pytest.mark.parametrize("method", ["kivi", "int8"])
def test_decode_compiles_one_graph_while_the_storage_grows(method):
    """30 decode steps cross 4 key flushes and grow the keys' and the values' packed storage several
    times, at different steps: still one decode graph. Growing inside the model's graph is a branch on
    sizes, one graph per outcome for keys and for values (up to four whole-model compiles, a minute each on
    a 2-core CPU, stalling a generation): a state leaves each compiled step with room for the next one
    (state._with_room). aot_eager: the eager compiler runs the glue as Python, a branch with no guard."""
    _kivi_vs_reference(tiny("llama"), _ids(2), dict(method=method, compiler="aot_eager", **SMALL), exact=False)
    assert counters["stats"]["unique_graphs"] == 2  # prefill, decode


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 1)])  # MHA and MQA (GQA 4/2 above)
def test_kivi_mha_mqa(heads, kv_heads):
    _kivi_vs_reference(tiny("llama", heads=heads, kv_heads=kv_heads), _ids(2),
                       dict(method="kivi", compiler="eager", **SMALL))


@pytest.mark.slow
@settings(max_examples=8)  # each example compiles a model
@given(kivi_options())
def test_kivi_options_follow_reference(options):
    torch._dynamo.reset()
    prefill = options["residual_length"] + 1  # a prefill that quantizes too
    _kivi_vs_reference(tiny("llama"), _ids(1, n=prefill + 3 * options["residual_length"] + 1),
                       dict(options, compiler="eager"), prefill=prefill)


@pytest.mark.slow
@pytest.mark.parametrize("arch, attn, compiler", [("llama", "sdpa", "inductor"), ("gpt2", "eager", "inductor"),
                                                  ("qwen2", "sdpa", "aot_eager")])
def test_kivi_compiled(arch, attn, compiler):
    _kivi_vs_reference(tiny(arch, attn), _ids(2), dict(method="kivi", bits=2, compiler=compiler, **SMALL),
                       exact=False)
    # a bounded number of graphs for any number of steps: prefill, and decode with the keys' and the
    # values' packed storage each either appending in place or growing (token counts are dynamic)
    assert counters["stats"]["unique_graphs"] <= 5


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_generate(compiler):
    options = dict(method="kivi", bits=2, compiler=compiler, **SMALL)
    model = tiny("llama")
    ids = _ids(2, n=6)
    want = _generate(model, ids, past_key_values=FakeQuantCache(Config(**options)))
    model.compile(backend="kvquant", options=options)
    assert torch.equal(_generate(model, ids), want)
    assert counters["kvquant"]["cache_updates_quantized"] > 0
    assert counters["stats"]["unique_graphs"] <= 5  # prefill; decode: in place or growing, keys x values
    # the user's own cache object: another guard, same result
    from transformers import DynamicCache

    assert torch.equal(_generate(model, ids, past_key_values=DynamicCache()), want)


@pytest.mark.slow
def test_generate_none_equals_uncompiled():
    model = tiny("qwen2", "eager")
    ids = _ids(2, n=5)
    want = _generate(model, ids)
    model.compile(backend="kvquant", options=dict(method="none"))
    assert torch.equal(_generate(model, ids), want)


def test_beam_search_reorders_the_state():
    options = dict(method="kivi", bits=4, compiler="eager", **SMALL)
    model = tiny("llama")
    ids = _ids(1, n=5)
    want = _generate(model, ids, num_beams=3, past_key_values=FakeQuantCache(Config(**options)))
    model.compile(backend="kvquant", options=options)
    assert torch.equal(_generate(model, ids, num_beams=3), want)
    assert counters["kvquant"]["cache_updates_quantized"] > 0


def test_sampling():
    options = dict(method="kivi", bits=2, compiler="eager", **SMALL)
    model = tiny("qwen2")
    ids = _ids(2, n=4)

    def sample(**kwargs):
        torch.manual_seed(1)
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=True, top_k=0, **kwargs)

    want = sample(past_key_values=FakeQuantCache(Config(**options)))
    model.compile(backend="kvquant", options=options)
    assert torch.equal(sample(), want)
    assert counters["kvquant"]["cache_updates_quantized"] > 0


def test_left_padded_batch():
    options = dict(method="kivi", bits=4, compiler="eager", **SMALL)
    model = tiny("mistral")
    ids = _ids(2, n=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = _generate(model, ids, attention_mask=mask, past_key_values=FakeQuantCache(Config(**options)))
    model.compile(backend="kvquant", options=options)
    assert torch.equal(_generate(model, ids, attention_mask=mask), want)
    assert counters["kvquant"]["cache_updates_quantized"] > 0 and counters["kvquant"]["cache_updates_left_alone"] == 0


def test_state_is_packed_and_bytes_match_the_formula():
    B, Hkv, D, G, R, bits = 2, 2, 8, 4, 8, 2
    model = tiny("llama", heads=4, kv_heads=Hkv, head_dim=D)
    from transformers import DynamicCache

    cache = DynamicCache()
    decode(_compiled(model, method="kivi", bits=bits, compiler="eager", group_size=G, residual_length=R),
           _ids(B, n=37), 5, cache)
    T = 37
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert isinstance(keys, KVState) and isinstance(values, KVState)
    assert keys.shape == (B, Hkv, T, D) and keys.dtype == torch.float32
    # keys: residual holds T0 % R after prefill, then flushes whole windows
    nk = (T // R) * R
    nv = T - R  # values: everything but the newest R
    pad = 2  # rows of padding per inner tensor (state.py)
    el = 4
    assert keys.n_quantized == nk and values.n_quantized == nv
    ck, cv = keys.codes.shape[2] - pad, values.codes.shape[2] - pad  # capacity: spare rows to append in place
    assert nk <= ck <= nk + nk // 32 + R and nv <= cv <= nv + nv // 32 + 32
    k_bytes = B * Hkv * ((ck + pad) * D * bits // 8 + 2 * (ck // G + pad) * D * el + (T - nk + pad) * D * el)
    v_bytes = B * Hkv * ((cv + pad) * D * bits // 8 + 2 * (cv + pad) * (D // G) * el + (R + pad) * D * el)
    assert kvcompile.nbytes(keys) == k_bytes
    assert kvcompile.nbytes(values) == v_bytes
    assert kvcompile.cache_nbytes(cache) == 2 * (k_bytes + v_bytes)  # two layers
    # the inner tensors are the only storage: nothing full precision beyond the residual
    assert keys.codes.dtype == torch.uint8 and keys.res.shape[2] == T - nk + pad


def test_report_and_counters():
    model = tiny("llama")
    decode(_compiled(model, method="kivi", compiler="eager", **SMALL), _ids(1, n=6), 3)
    c = counters["kvquant"]
    assert c["cache_updates_quantized"] == 4 * c["graphs"] and c["cache_updates_left_alone"] == 0
    text = kvcompile.explain()
    assert "0 left alone" in text and "4 cache update(s) quantized" in text and "attention rewritten: sdpa" in text
    assert len(kvcompile.reports()) == c["graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("kernels, compiler", [("auto", "inductor"), ("inline", "inductor")])
def test_cpu_decode_attention_end_to_end(kernels, compiler, monkeypatch):
    """The CPU's default kernels: decode reads the packed cache through the compiled attention of
    kernels/cpu.py (a call per layer; with KVCOMPILE_KERNELS=inline, compiled into the model's graph), within
    rounding of the reference ops' decode (KVCOMPILE_KERNELS=torch). The nested call compiles no more model
    graphs than the reference does (one that marked the cache's tensors would fail the model graph's guards);
    inline does: its decomposition relates the keys' and values' lengths (broadcasts), guards of the graph."""
    options = dict(method="kivi", bits=2, compiler=compiler, **SMALL)
    model = tiny("llama")
    ids = _ids(2, n=16)
    monkeypatch.setenv("KVCOMPILE_KERNELS", "torch")
    graphs = counters["kvquant"]["graphs"]
    ref = decode(_compiled(model, **options), ids, 3)
    ref_graphs, graphs = counters["kvquant"]["graphs"] - graphs, counters["kvquant"]["graphs"]
    torch._dynamo.reset()
    monkeypatch.setenv("KVCOMPILE_KERNELS", kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvcompile.KVQuantWarning)  # no fallback to the reference
        got = decode(_compiled(model, **options), ids, 3)
    assert kernels == "inline" or counters["kvquant"]["graphs"] - graphs == ref_graphs
    calls = counters["kvquant"]["cpu_attention_calls"]
    assert calls == 0 if kernels == "inline" else calls >= 2 * 13  # 2 layers x 13 decode steps (inline: in the graph)
    err_ref, err_fp = max_abs_diff(got, ref), max_abs_diff(got, decode(model, ids, 3))
    assert err_ref < 1e-4 and err_ref < 1e-2 * err_fp, (err_ref, err_fp)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_triton_kernels_end_to_end(attn, monkeypatch):
    """The Triton kernels (interpreted on a CPU) behind the compiled model: the backend picks them on
    CUDA; KVCOMPILE_KERNELS=triton forces them here."""
    monkeypatch.setenv("KVCOMPILE_KERNELS", "triton")
    options = dict(method="kivi", bits=2, compiler="inductor", **SMALL)
    model = tiny("llama", attn)
    ids = _ids(2, n=16)
    got = decode(_compiled(model, **options), ids, 3)
    ref = decode(model, ids, 3, FakeQuantCache(Config(**options)))
    fp = decode(model, ids, 3)
    c = counters["kvquant"]
    assert c["triton_quantize_calls"] > 0
    assert (c["triton_attention_calls"] > 0) if attn == "sdpa" else (c["triton_qk_calls"] > 0 < c["triton_pv_calls"])
    err_ref = max_abs_diff(got, ref)
    err_fp = max_abs_diff(got, fp)
    assert err_ref < 1e-4 and err_ref < 1e-2 * err_fp, (err_ref, err_fp)
