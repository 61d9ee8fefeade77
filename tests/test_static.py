"""Fixed-size caches written in place: transformers' StaticCache (`index_copy_` at cache_position,
the setup transformers recommends with torch.compile) is stored quantized for methods that quantize
each token on its own, and so are buffers created outside the compiled code (swapped for states after
their first call: buffers.py); kivi and residual_length > 0 keep a full-precision window of R tokens beside
the packed rows (Layout.overlay)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from helpers import max_abs_diff
import kvcompile
from kvcompile import Config, KVQuantWarning, KVState
from kvcompile.fakequant import FakeQuantStaticCache
from kvcompile.layout import PAD
from models import decode, tiny

METHODS = [dict(method="int8"), dict(method="fp8"), dict(method="nqkv", bits=4, block_size=8),
           dict(method="nqkv", bits=3, block_size=8, hadamard=True)]



@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("opts", METHODS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_static_cache_matches_the_eager_reference(opts, attn):
    """Every K and V buffer is a fixed-size quantized state (prefill and one decode graph), and the
    logits equal FakeQuantStaticCache's (each token quantized as written) under plain Dynamo bit for
    bit (plain Dynamo already differs from eager by ~1 ulp with a StaticCache: the masks)."""
    from transformers import StaticCache

    model = tiny("llama", attn, head_dim=16)
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    kvcompile.reset()
    torch._dynamo.reset()
    f = torch.compile(model, backend="kvquant", options=dict(opts, compiler="eager"))
    cache = StaticCache(config=model.config, max_cache_len=20)
    got = decode(f, ids, 5, cache)
    reports = kvcompile.reports()
    torch._dynamo.reset()
    want = decode(torch.compile(model, backend="eager"), ids, 5,
                  FakeQuantStaticCache(Config(**opts), model.config, max_cache_len=20))
    eager = decode(model, ids, 5, FakeQuantStaticCache(Config(**opts), model.config, max_cache_len=20))
    fp = decode(model, ids, 5, StaticCache(config=model.config, max_cache_len=20))
    assert len(reports) == 2 and [len(r.quantized) for r in reports] == [4, 4], [str(r) for r in reports]
    tensors = kvcompile.cache_tensors(cache)
    assert len(tensors) == 4 and all(isinstance(t, KVState) and t.shape == (2, 2, 20, 16) for t in tensors)
    for a, b in zip(got, want):  # hadamard: attention in the transformed basis, equal up to rounding (README)
        assert torch.equal(a, b) if not opts.get("hadamard") else torch.allclose(a, b, atol=1e-5, rtol=0)
    err = max_abs_diff(got, eager)
    assert err < 1e-5 and max_abs_diff(got, fp) > 1e3 * err  # it is quantized


@pytest.mark.slow
def test_static_generate_compiles_decode_once_and_stores_less():
    """generate(cache_implementation="static") under Inductor: one prefill and one decode graph for 12
    tokens, output equal to the eager reference's, and the bytes held are the packed size."""
    model = tiny("llama", head_dim=64)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    opts = dict(method="nqkv", bits=4)
    with torch.no_grad():
        fp = model.generate(ids, cache_implementation="static", **kw)
        M = fp.past_key_values.layers[0].keys.shape[2]  # generate's max_cache_len
        want = model.generate(ids, past_key_values=FakeQuantStaticCache(Config(**opts), model.config, M), **kw)
        kvcompile.reset()
        torch._dynamo.reset()
        model.compile(backend="kvquant", options=opts)
        got = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(kvcompile.reports()) == 2
    assert counters["kvquant"]["cache_updates_left_alone"] == 0
    held = kvcompile.cache_nbytes(got.past_key_values)
    full = kvcompile.cache_nbytes(fp.past_key_values)
    # 4-bit codes + one float32 scale per 64 channels (4.5 of 32 bits) for M + 2 pad rows, and the
    # empty residual's 2 pad rows; 2 layers x (K, V)
    per_tensor = 2 * 2 * (M + 2) * (64 // 2 + 4) + 2 * 2 * 2 * 64 * 4
    assert held == 2 * 2 * per_tensor and held < full / 3, (held, full)


def _static_generate(options, expect=contextlib.nullcontext()):
    """Greedy generate() with a StaticCache: (uncompiled, compiled with `options` inside `expect`)."""
    model = tiny("llama")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want = model.generate(ids, **kw)
        model.compile(backend="kvquant", options=options)
        with expect:
            got = model.generate(ids, **kw)
    return want, got


WINDOWED = [dict(method="kivi", bits=2, group_size=4, residual_length=8),
            dict(method="kivi", bits=4, group_size=8, residual_length=8),
            dict(method="int8", residual_length=3), dict(method="nqkv", bits=4, block_size=8, residual_length=2)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("opts", WINDOWED, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_static_cache_with_a_full_precision_window(opts, attn):
    """kivi (and residual_length > 0) on a StaticCache: each buffer a fixed-size state of packed rows plus R
    full-precision rows, one prefill and one decode graph over 24 decode steps (several key groups flush),
    the logits those of FakeQuantStaticCache (a growing cache's semantics on the tokens written), and the
    bytes held the packed size of M tokens plus R full-precision ones (and their positions)."""
    from transformers import StaticCache

    model = tiny("llama", attn, head_dim=16)
    ids = torch.randint(0, 64, (2, 34), generator=torch.Generator().manual_seed(0))
    kvcompile.reset()
    torch._dynamo.reset()
    f = torch.compile(model, backend="kvquant", options=dict(opts, compiler="eager"))
    cache = StaticCache(config=model.config, max_cache_len=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVQuantWarning)
        got = decode(f, ids, 10, cache)
    reports = kvcompile.reports()
    want = decode(model, ids, 10, FakeQuantStaticCache(Config(**opts), model.config, max_cache_len=40))
    fp = decode(model, ids, 10, StaticCache(config=model.config, max_cache_len=40))
    assert len(reports) == 2 and [len(r.quantized) for r in reports] == [4, 4], [str(r) for r in reports]
    assert all("fused attention" in e.status for e in reports[1].entries), kvcompile.explain()
    err, quant = max_abs_diff(got, want), max_abs_diff(got, fp)
    assert err < 1e-5 and quant > 1e3 * err, (err, quant)
    R = opts["residual_length"]
    for t in kvcompile.cache_tensors(cache):
        assert isinstance(t, KVState) and t.kv_layout.overlay and t.shape == (2, 2, 40, 16)
        cw, sw, mw = t.kv_layout.widths(16)
        rows = t.kv_layout.scale_rows(40)
        packed = 2 * 2 * ((PAD + 40) * cw + (PAD + rows) * (sw + mw) * 4)
        window = 2 * 2 * (PAD + R) * 16 * 4 + 2 * (PAD + R) * 8
        assert kvcompile.nbytes(t) == packed + window, (kvcompile.nbytes(t), packed, window)


def test_kivi_static_generate():
    """generate(cache_implementation="static") with kivi: the tokens FakeQuantStaticCache gives, decode
    compiled once, nothing left alone."""
    opts = dict(method="kivi", bits=2, group_size=4, residual_length=4)
    model = tiny("llama")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        fp = model.generate(ids, cache_implementation="static", **kw)
        M = fp.past_key_values.layers[0].keys.shape[2]
        want = model.generate(ids, past_key_values=FakeQuantStaticCache(Config(**opts), model.config, M), **kw)
        kvcompile.reset()
        torch._dynamo.reset()
        model.compile(backend="kvquant", options=dict(opts, compiler="eager"))
        got = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(kvcompile.reports()) == 2 and counters["kvquant"]["cache_updates_left_alone"] == 0
    assert all(isinstance(t, KVState) and t.kv_layout.overlay for t in kvcompile.cache_tensors(got.past_key_values))


def test_static_buffer_from_an_uncompiled_prefill_is_swapped():
    """A StaticCache whose prefill ran eagerly holds full-precision buffers the decode graph writes in place:
    the first compiled call runs as they are, then they are replaced by fixed-size states of their contents
    (buffers.py), which the next graphs write and read fused. The reference: the same states run eagerly
    (each write quantized by the state, attention over its dequantized value)."""
    from transformers import StaticCache

    from kvcompile.buffers import swap

    model = tiny("llama")
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    cache, ref_cache, plain_cache = (StaticCache(config=model.config, max_cache_len=12) for _ in range(3))
    with torch.no_grad():
        for c in (cache, ref_cache, plain_cache):
            model(ids[:, :5], past_key_values=c, use_cache=True)
        # the first call's oracle is the same graph under plain Dynamo: a traced transformers model differs from
        # its eager self by an ulp (rotary and mask code paths), with or without kvcompile
        plain = torch.compile(model, backend="eager")(ids[:, 5:6], past_key_values=plain_cache, use_cache=True).logits
        torch._dynamo.reset()
        f = torch.compile(model, backend="kvquant", options=dict(method="int8", compiler="eager"))
        got = [f(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(5, 9)]
        want = [model(ids[:, 5:6], past_key_values=ref_cache, use_cache=True).logits]
        for layer, ref in zip(cache.layers, ref_cache.layers):
            assert isinstance(layer.keys, KVState) and isinstance(layer.values, KVState)
            assert swap(ref.keys, layer.keys.kv_layout) and swap(ref.values, layer.values.kv_layout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KVQuantWarning)  # the reference runs uncompiled on states
            want += [model(ids[:, t:t + 1], past_key_values=ref_cache, use_cache=True).logits for t in range(6, 9)]
    assert torch.equal(got[0], plain)  # the call before the swap: full precision
    assert max_abs_diff(got, want) < 1e-5
    assert any("fused attention" in e.status for r in kvcompile.reports() for e in r.entries), kvcompile.explain()


class GptFastAttention(torch.nn.Module):
    """gpt-fast's cache: module buffers written with `k_cache[:, :, input_pos] = k`."""

    def __init__(self, B=1, H=2, M=16, D=8):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(B, H, M, D))
        self.register_buffer("v_cache", torch.zeros(B, H, M, D))

    def forward(self, q, k, v, input_pos, mask):
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask[:, :, input_pos])


def test_gpt_fast_index_put_cache_is_quantized():
    """gpt-fast's buffers: swapped after the first call, then each token quantized as written (the reference:
    fake-quantized tokens written into plain buffers, the buffers fake-quantized where the swap happens)."""
    from kvcompile.fakequant import FakeQuantStream

    g = torch.Generator().manual_seed(0)
    mask = torch.tril(torch.ones(16, 16, dtype=torch.bool))[None, None]
    eager, compiled = GptFastAttention(), GptFastAttention()
    qdq = {r: FakeQuantStream(Config(method="int8"), r, "bhtd", 2) for r in "kv"}
    f = torch.compile(compiled, backend="kvquant", options=dict(method="int8", compiler="eager"))
    got, want = [], []
    with torch.no_grad():
        for t in range(6):
            q, k, v = (torch.randn(1, 2, 1, 8, generator=g) for _ in range(3))
            pos = torch.tensor([t])
            got.append(f(q, k, v, pos, mask))
            if t == 0:
                want.append(eager(q, k, v, pos, mask))
                eager.k_cache.copy_(qdq["k"](eager.k_cache))
                eager.v_cache.copy_(qdq["v"](eager.v_cache))
                qdq = {r: FakeQuantStream(Config(method="int8"), r, "bhtd", 2) for r in "kv"}
            else:
                kq, vq = qdq["k"](k), qdq["v"](v)
                qdq = {r: FakeQuantStream(Config(method="int8"), r, "bhtd", 2) for r in "kv"}
                want.append(eager(q, kq, vq, pos, mask))
    assert isinstance(compiled.k_cache, KVState) and isinstance(compiled.v_cache, KVState)
    assert torch.equal(got[0], want[0]) and max_abs_diff(got, want) < 1e-5
    assert max_abs_diff(compiled.k_cache.dequantize(), eager.k_cache) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "kivi"])
@pytest.mark.parametrize("prefill", [5, 15])
def test_static_sliding_layers(prefill, method):
    """Gemma 3 with a StaticCache: its sliding layers' fixed buffers (window 12) are written by index
    until full, then rolled and rewritten whole (`copy_`): quantized again as written, matching
    FakeQuantStaticCache under plain Dynamo bit for bit. A prompt longer than the window is copied
    in whole into the full-precision buffer (copy_, not a write at token positions): that layer stays
    full precision, in both, and a warning says so. kivi (a full-precision window): a buffer rewritten whole
    is kept as if its tokens were written at once, to float rounding (attention runs as its two matmuls)."""
    import zoo
    from transformers import StaticCache

    model, cfg = zoo.make("gemma3_text", "sdpa")
    ids = torch.randint(0, 64, (2, prefill + 14), generator=torch.Generator().manual_seed(0))
    opts = dict(method="int8", compiler="eager") if method == "int8" else \
        dict(method="kivi", bits=2, group_size=4, residual_length=4, compiler="eager")
    kvcompile.reset()
    torch._dynamo.reset()
    cache = StaticCache(config=cfg, max_cache_len=40)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = decode(torch.compile(model, backend="kvquant", options=opts), ids, prefill, cache)
    whole = [w for w in rec if issubclass(w.category, KVQuantWarning) and "rewrites the full-precision buffer whole"
             in str(w.message)]
    assert bool(whole) == (prefill >= cfg.sliding_window)
    assert (counters["kvquant"]["cache_updates_left_alone"] == 0) == (prefill < cfg.sliding_window)
    torch._dynamo.reset()
    want = decode(torch.compile(model, backend="eager"), ids, prefill,
                  FakeQuantStaticCache(Config(**opts), cfg, max_cache_len=40))
    for a, b in zip(got, want):
        assert torch.equal(a, b) if method == "int8" else torch.allclose(a, b, atol=1e-5, rtol=0)
    sliding = cache.layers[0].keys
    assert isinstance(sliding, KVState) == (prefill < cfg.sliding_window) and sliding.shape[2] == cfg.sliding_window
    assert isinstance(cache.layers[1].keys, KVState)
    if prefill < cfg.sliding_window:
        assert any("rewritten whole" in e.status for r in kvcompile.reports() for e in r.entries)


def test_method_none_leaves_static_buffers_as_they_are():
    kvcompile.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVQuantWarning)
        want, got = _static_generate(dict(method="none", compiler="eager"))
    assert torch.equal(got, want)
    assert kvcompile.reports() and all(not r.entries for r in kvcompile.reports())


@settings(deadline=None, max_examples=25)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=12),
       opts=st.sampled_from(WINDOWED), rows=st.integers(1, 2))
def test_window_state_keeps_a_growing_caches_semantics(lengths, opts, rows):
    """A static state with a window, written eagerly L tokens at a time (into the first `rows` batch rows):
    what each step reads (the write's view) is the growing cache before that step's quantization, and what
    it holds after is the growing cache after it (fakequant.compact), token for token."""
    from kvcompile.fakequant import compact
    from kvcompile.methods import layouts
    from kvcompile.state import kv_sdpa, kv_static_empty, kv_static_write

    g = torch.Generator().manual_seed(len(lengths))
    B, H, M, D = 2, 2, sum(lengths) + 3, 16
    both = [lay._replace(static=True) for lay in layouts(Config(**opts), D)]
    states = [kv_static_empty(torch.zeros(B, H, M, D), lay) for lay in both]
    grown, n_q, T = [torch.zeros(rows, H, 0, D) for _ in both], [0, 0], 0
    for L in lengths:
        new = [torch.randn(rows, H, L, D, generator=g) for _ in both]
        pos = torch.arange(T, T + L)
        if rows == B:
            views = [kv_static_write(s, 2, pos, x) for s, x in zip(states, new)]
        else:  # a batch prefix, through the state's own setitem (kv_static_setitem)
            for s, x in zip(states, new):
                s[:rows, :, T:T + L] = x
        T += L
        grown = [torch.cat([a, x], 2) for a, x in zip(grown, new)]
        if rows == B:  # the view: this step's read
            for v, a in zip(views, grown):
                assert max_abs_diff(v.dequantize()[:, :, :T], a) < 1e-6
            q = torch.randn(B, 4, L, D, generator=g)
            mask = torch.zeros(L, M, dtype=torch.bool)
            mask[:, :T] = True
            want = F.scaled_dot_product_attention(q, *(F.pad(a, (0, 0, 0, M - T)).repeat_interleave(2, 1)
                                                       for a in grown), attn_mask=mask)
            assert max_abs_diff(kv_sdpa(q, *views, attn_mask=mask), want) < 1e-5
        for i, lay in enumerate(both):
            grown[i], n_q[i] = compact(grown[i], n_q[i], lay)
            assert max_abs_diff(states[i].dequantize()[:rows, :, :T], grown[i]) < 1e-6
            assert not states[i].dequantize()[rows:].any()
    for s in states:
        s.zero_()
        assert not s.dequantize().any() and (s.wpos == -1).all()
