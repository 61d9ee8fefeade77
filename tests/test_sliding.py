"""Sliding-window cache layers (transformers' DynamicSlidingWindowLayer: cat, then keep the newest
window - 1 tokens): the quantized state drops the tokens that leave the window, keeps the others
bit for bit, and never holds much more than the window."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from helpers import max_abs_diff
import kvcompile
from kvcompile import Config, KVQuantWarning
from kvcompile.fakequant import FakeQuantCache, FakeQuantSlidingLayer
from kvcompile.layout import PAD
from kvcompile.methods import layouts
from kvcompile.state import kv_append, kv_compact, kv_store, kv_window
from models import decode

CONFIGS = [
    dict(method="kivi", bits=2, group_size=4, residual_length=4),
    dict(method="kivi", bits=4, group_size=8, residual_length=8),
    dict(method="kivi", bits=2, group_size=2, residual_length=2),
    dict(method="nqkv", bits=4, block_size=8, residual_length=3, hadamard=True),
    dict(method="nqkv", bits=3, block_size=8),
    dict(method="int8", residual_length=5),
    dict(method="fp8"),
    dict(method="none"),
]


def _window_run(opts, window, prefill, chunks, B=2, H=2, D=16, seed=0):
    """Feed the same random keys and values to the state glue the pass inserts and to the eager
    oracle (FakeQuantSlidingLayer); yield (what attention reads, what the cache keeps) of both."""
    config = Config(**opts)
    k_lay, v_lay = (lay._replace(window=True) for lay in layouts(config, D))
    fake = FakeQuantSlidingLayer(config, sliding_window=window)
    g = torch.Generator().manual_seed(seed)
    states = None
    for i, n in enumerate([prefill] + chunks):
        k, v = (torch.randn(B, H, n, D, generator=g) * torch.linspace(0.5, 4, D) for _ in range(2))
        want_k, want_v = fake.update(k, v)
        if states is None:  # prefill: attention reads the new tokens, the slice is stored
            read = (k, v)
            states = [kv_store(x[:, :, -(window - 1):], lay) for x, lay in ((k, k_lay), (v, v_lay))]
        else:
            s1 = [kv_append(s, x) for s, x in zip(states, (k, v))]
            read = tuple(s.dequantize() for s in s1)
            states = [kv_compact(kv_window(s, -(window - 1))) for s in s1]
        yield i, read, (want_k, want_v), states, (fake.keys, fake.values)


@pytest.mark.parametrize("opts", CONFIGS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_window_state_equals_the_eager_oracle(opts):
    window = 21
    dropped = 0
    for i, read, want_read, states, want_kept in _window_run(opts, window, prefill=30, chunks=[1] * 40 + [3, 1, 5]):
        for got, want in zip(read, want_read):
            assert torch.equal(got, want), f"step {i}: attention reads other values"
        for s, want in zip(states, want_kept):
            assert s.shape[2] == min(want.shape[2], window - 1)
            assert torch.equal(s.dequantize(), want), f"step {i}: kept tokens differ"
            dropped = max(dropped, int(s.n_skip))
    if opts["method"] != "none":
        assert dropped > 0  # the window really dropped packed rows


@pytest.mark.parametrize("opts", CONFIGS[:2] + CONFIGS[5:7], ids=lambda o: o["method"])
def test_window_state_holds_no_more_than_the_window(opts):
    """After 300 tokens through a 64-token window, the packed storage holds at most the window plus
    the spare rows of the growth policy (Layout.capacity), and far less than without the window."""
    window, D = 64, 16
    *_, (_, _, _, states, _) = _window_run(opts, window, prefill=10, chunks=[1] * 290, D=D)
    full = Config(**opts)
    for s, lay in zip(states, layouts(full, D)):
        rows = s.codes.shape[2] - PAD
        assert rows <= lay.capacity(window) + lay.drop_quantum, (rows, s)
        assert s.res.shape[2] - PAD <= max(lay.residual, 1) * 2
        grown = kv_store(torch.randn(2, 2, 300, D), lay)
        assert s.packed_nbytes() < grown.packed_nbytes() / 3


@given(
    opts=st.sampled_from(CONFIGS),
    window=st.integers(2, 30),
    prefill=st.integers(1, 40),
    chunks=st.lists(st.sampled_from([1, 1, 1, 2, 7]), min_size=1, max_size=30),
)
def test_window_state_property(opts, window, prefill, chunks):
    for i, read, want_read, states, want_kept in _window_run(opts, window, prefill, chunks, B=1, D=8):
        for got, want in zip(read, want_read):
            assert torch.equal(got, want), f"step {i}"
        for s, want in zip(states, want_kept):
            assert torch.equal(s.dequantize(), want), f"step {i}"


def _mistral(attn, window=13, layers=2):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window)
    return MistralForCausalLM(cfg).eval(), cfg



@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("opts", [CONFIGS[0], CONFIGS[3]], ids=["kivi", "nqkv-h"])
def test_sliding_model_matches_the_eager_reference(attn, opts):
    """Mistral with every layer sliding (window 13, prompt 17 > window): every K and V update is
    rewritten, and the logits equal FakeQuantCache's up to the ~1 ulp by which plain Dynamo already
    differs from eager on this model (the masks are built differently); `none` is exact against the
    same Dynamo graph."""
    model, cfg = _mistral(attn)
    from transformers import DynamicCache

    ids = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(0))
    kvcompile.reset()
    torch._dynamo.reset()
    f = torch.compile(model, backend="kvquant", options=dict(opts, compiler="eager"))
    cache = DynamicCache(config=cfg)
    got = decode(f, ids, 17, cache)
    assert [len(r.quantized) for r in kvcompile.reports()] == [2 * cfg.num_hidden_layers] * len(kvcompile.reports())
    entries = [e for r in kvcompile.reports() for e in r.entries]
    assert entries and all("sliding window" in e.status for e in entries)
    keys = cache.layers[0].keys
    assert keys.shape[2] == cfg.sliding_window - 1  # (test_window_state_holds_no_more_than_the_window: the bytes)
    want = decode(model, ids, 17, FakeQuantCache(Config(**opts), cfg))
    fp = decode(model, ids, 17, DynamicCache(config=cfg))
    err = max_abs_diff(got, want)
    quant = max_abs_diff(got, fp)
    assert err < 1e-6 and quant > 1e3 * err, (err, quant)

    torch._dynamo.reset()
    none = decode(torch.compile(model, backend="kvquant", options=dict(method="none", compiler="eager")), ids, 17,
                  DynamicCache(config=cfg))
    torch._dynamo.reset()
    dynamo = decode(torch.compile(model, backend="eager"), ids, 17, DynamicCache(config=cfg))
    assert len(none) == len(dynamo) == 29 and all(torch.equal(a, b) for a, b in zip(none, dynamo))


@pytest.mark.parametrize("opts", [CONFIGS[3], CONFIGS[0]], ids=["nqkv-4-hadamard", "kivi-2"])
def test_sliding_decode_grows_between_steps(opts):
    """43 decode steps through a 13-token window (nqkv-4 with Hadamard, a residual of 3): the packed storage
    grows several times, each time leaving the dropped rows behind (state._grown's start), and a state
    leaves each compiled step with room for the next (state._with_room), so the decode is one graph (it was
    two when the storage grew inside the graph) and still equals the eager reference. kivi-2 too: its residual
    after the window's cut can be 0 or 1 token, which no size of the graph may be (ref.drop; three graphs when
    the cut was a slice)."""
    from transformers import DynamicCache

    model, cfg = _mistral("sdpa")
    ids = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(0))
    f = torch.compile(model, backend="kvquant", options=dict(opts, compiler="aot_eager"))
    got = decode(f, ids, 17, DynamicCache(config=cfg))
    want = decode(model, ids, 17, FakeQuantCache(Config(**opts), cfg))
    assert max_abs_diff(got, want) < 1e-6
    assert counters["stats"]["unique_graphs"] == 2  # prefill, decode


@pytest.mark.slow
def test_sliding_generate_under_inductor():
    """generate() with the cache transformers builds (DynamicSlidingWindowLayer), compiled by
    Inductor: runs past the window, a bounded number of graphs, keys stored with dropped rows."""
    model, cfg = _mistral("sdpa", window=9, layers=1)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    kvcompile.reset()
    torch._dynamo.reset()
    with torch.no_grad():
        model.compile(backend="kvquant", options=dict(CONFIGS[0]))
        out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 42)
    assert counters["kvquant"]["cache_updates_left_alone"] == 0
    assert 2 <= len(kvcompile.reports()) <= 8
    keys = out.past_key_values.layers[0].keys
    assert isinstance(keys, kvcompile.KVState) and keys.shape[2] == 8


class _SlicedCat(torch.nn.Module):
    """A hand-written attention step whose cache keeps `cat[:, :, cut]`."""

    def __init__(self, cut):
        super().__init__()
        self.cut = cut

    def forward(self, q, k_past, v_past, k, v):
        k = torch.cat([k_past, k], dim=2)
        v = torch.cat([v_past, v], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out, k[:, :, self.cut], v[:, :, self.cut]


def test_hand_written_window_is_matched_and_other_slices_left_alone():
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    past = [torch.randn(1, 2, 6, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVQuantWarning)
        kvcompile.reset()
        torch._dynamo.reset()
        f = torch.compile(_SlicedCat(slice(-4, None)), backend="kvquant", options=dict(compiler="eager"))
        out, kk, vv = f(q, *past, k, v)
        assert [len(r.quantized) for r in kvcompile.reports()] == [2]
    assert isinstance(kk, kvcompile.KVState) and kk.shape[2] == 4
    assert torch.equal(kk.dequantize(), torch.cat([past[0], k], 2)[:, :, -4:])  # R = 128: all full precision
    for cut in (slice(0, 4), slice(None, -1)):  # the oldest tokens: not a sliding window
        torch._dynamo.reset()
        f = torch.compile(_SlicedCat(cut), backend="kvquant", options=dict(compiler="eager"))
        with pytest.warns(KVQuantWarning, match="newest tokens"):
            out2, kk2, _ = f(q, *past, k, v)
        assert torch.equal(kk2, torch.cat([past[0], k], 2)[:, :, cut])
        assert torch.equal(out2, out)


@pytest.mark.slow
@pytest.mark.parametrize("opts", [CONFIGS[0], CONFIGS[3]], ids=["kivi", "nqkv-h"])
def test_window_ops_under_triton(opts, monkeypatch):
    """KVCOMPILE_KERNELS=triton (interpreted here): a window state is read by the kernels whether it has
    dropped rows or not (they read from the first kept row on), and gives what the reference gives."""
    from kvcompile.state import kv_pv, kv_qk, kv_sdpa

    monkeypatch.setenv("KVCOMPILE_KERNELS", "triton")
    seen = set()
    for i, _, _, states, _ in _window_run(opts, 17, prefill=9, chunks=[1] * 14, H=2, D=16):
        k, v = states
        q = torch.randn(2, 4, 1, 16)
        counters.clear()
        got = (kv_sdpa(q, k, v), kv_qk(q, k), kv_pv(torch.softmax(kv_qk(q, k), -1), v))
        assert counters["kvquant"]["triton_attention_calls"] == 1 and counters["kvquant"]["triton_qk_calls"] == 2
        seen.add(k.n_skip > 0 and v.n_skip > 0)
        K, V = (s.dequantize() for s in (k, v))
        K, V = (x.repeat_interleave(2, dim=1) for x in (K, V))
        want = (torch.nn.functional.scaled_dot_product_attention(q, K, V), q @ K.transpose(2, 3),
                torch.softmax(q @ K.transpose(2, 3), -1) @ V)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert seen == {True, False}  # states with and without dropped rows
