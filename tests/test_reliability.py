"""What a probing user runs into: gradients on, many generations in one process, crop and assisted
decoding, writes into the cache, graph breaks, a cache continued under other options, NumPy, option
errors. Each use works, or raises / warns with what to do; nothing runs in full precision unsaid."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import kvcompile
from helpers import max_abs_diff
from kvcompile import Config, KVQuantOptionError, KVQuantWarning, KVState
from kvcompile.fakequant import FakeQuantCache
from models import VOCAB, decode, tiny

KIVI = dict(method="kivi", bits=2, group_size=4, residual_length=8)


def _ids(batch, n, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _kv_warnings(rec, words):
    return [w for w in rec if issubclass(w.category, KVQuantWarning) and words in str(w.message)]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_gradients_on_run_and_say_so(compiler):
    """Outside no_grad the compiled model used to fail at the first decode step (no autograd formula for
    the kvquant ops); it now runs, equal to the reference, warns that gradients are not computed, and
    returns outputs that do not require grad."""
    model = tiny("llama")
    f = torch.compile(model, backend="kvquant", options=dict(KIVI, compiler=compiler))
    ids, cache = _ids(2, 14), DynamicCache()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = [f(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        got += [f(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(5, 14)]
    assert _kv_warnings(rec, "gradients enabled")
    assert not any(g.requires_grad for g in got)
    want = decode(model, ids, 5, FakeQuantCache(Config(**KIVI)))
    assert max_abs_diff(got, want) < 1e-5
    assert all(isinstance(t, KVState) for t in kvcompile.cache_tensors(cache))


@pytest.mark.slow
def test_many_generations_stay_quantized():
    """Varied batch, padding, sampling and beams compile more graphs per frame than Dynamo's recompile
    limit (here lowered to 3, from 8; the probe that found this needed six generate() calls at 8): kvquant
    raises the limit of its compiled region, so every generation's cache is quantized and nothing falls
    back to uncompiled code."""
    model = tiny("llama")
    model.compile(backend="kvquant", options=dict(KIVI, compiler="eager"))
    runs = [dict(batch=1), dict(batch=2), dict(batch=3, pad=True), dict(batch=2, sample=True),
            dict(batch=1, beams=2), dict(batch=4, pad=True, beams=2), dict(batch=5), dict(batch=3, sample=True)]
    with warnings.catch_warnings(record=True) as rec, torch._dynamo.config.patch(recompile_limit=3):
        warnings.simplefilter("always")
        for i, r in enumerate(runs):
            ids = _ids(r["batch"], 6, seed=i)
            mask = torch.ones_like(ids)
            if r.get("pad"):
                mask[0, :2] = 0
            cache = DynamicCache()
            torch.manual_seed(i)
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12, min_new_tokens=12,
                               do_sample=r.get("sample", False), num_beams=r.get("beams", 1), top_k=4)
            tensors = kvcompile.cache_tensors(cache)
            assert tensors and all(isinstance(t, KVState) for t in tensors), (i, r, [type(t) for t in tensors])
    assert not _kv_warnings(rec, "uncompiled"), [str(w.message) for w in rec]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 3


def test_a_frame_run_uncompiled_keeps_the_cache_quantized_and_says_why():
    """If a frame runs eagerly anyway (here: torch._dynamo.disable), the cache stays a KVState, the results
    equal the reference's, and a warning names the likely cause."""
    model = tiny("llama")
    f = torch.compile(model, backend="kvquant", options=dict(KIVI, compiler="eager"))
    ids, cache, ref = _ids(2, 12), DynamicCache(), FakeQuantCache(Config(**KIVI))
    with torch.no_grad():
        got = [f(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        want = [model(ids[:, :5], past_key_values=ref, use_cache=True).logits]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for t in range(5, 12):
                got.append(torch._dynamo.disable(model)(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
                want.append(model(ids[:, t:t + 1], past_key_values=ref, use_cache=True).logits)
    assert _kv_warnings(rec, "uncompiled code")
    assert all(isinstance(t, KVState) and t.shape[2] == 12 for t in kvcompile.cache_tensors(cache))
    assert max_abs_diff(got, want) < 1e-5


@pytest.mark.parametrize("options", [KIVI, dict(method="int8"), dict(method="none")], ids=lambda o: o["method"])
def test_crop_then_continue(options):
    """cache.crop(n) then more compiled steps used to crash inside Dynamo (the cropped layer held a plain
    tensor whose ._base was the state); now the crop keeps the state packed, as the reference crops."""
    model = tiny("llama")
    f = torch.compile(model, backend="kvquant", options=dict(options, compiler="eager"))
    ids, cache, ref = _ids(2, 20), DynamicCache(), FakeQuantCache(Config(**options))
    got, want = [], []
    with torch.no_grad():
        for c, m, out in ((cache, f, got), (ref, model, want)):
            out.append(m(ids[:, :14], past_key_values=c, use_cache=True).logits)
            c.crop(-3)  # 11 tokens: a kivi key group of 4 split by the cut
            for t in range(11, 20):
                out.append(m(ids[:, t:t + 1], past_key_values=c, use_cache=True).logits)
    tensors = kvcompile.cache_tensors(cache)
    assert all(isinstance(t, KVState) and t._base is None and t.shape[2] == 20 for t in tensors)
    assert max_abs_diff(got, want) < 1e-5


@pytest.mark.slow
def test_assisted_decoding():
    """generate(prompt_lookup_num_tokens=3) crops the cache after each verification."""
    model = tiny("llama")
    gen = tiny("llama")
    gen.compile(backend="kvquant", options=dict(KIVI, compiler="eager"))
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    with torch.no_grad():
        cache = DynamicCache()
        got = gen.generate(ids, past_key_values=cache, **kw)
        want = model.generate(ids, past_key_values=FakeQuantCache(Config(**KIVI)), **kw)
    assert torch.equal(got, want)
    assert all(isinstance(t, KVState) for t in kvcompile.cache_tensors(cache))


def _state():
    model = tiny("llama")
    f = torch.compile(model, backend="kvquant", options=dict(KIVI, compiler="eager"))
    cache = DynamicCache()
    with torch.no_grad():
        f(_ids(1, 10), past_key_values=cache, use_cache=True)
    return cache.layers[0].keys


@pytest.mark.parametrize("write", [lambda k: k.__setitem__((slice(None), slice(None), 0), 0),
                                   lambda k: k.__setitem__(0, 0),
                                   lambda k: k[..., :4].zero_(),
                                   lambda k: k[0].add_(1),
                                   lambda k: k.narrow(2, 0, 3).mul_(2)],
                         ids=["k[:, :, 0] = 0", "k[0] = 0", "k[..., :4].zero_()", "k[0].add_(1)", "narrow().mul_()"])
def test_writes_into_a_state_raise(write):
    """They used to do nothing, silently (slices were dequantized copies recorded as views)."""
    k = _state()
    before = k.dequantize()
    with pytest.raises(RuntimeError, match="kvcompile"):
        write(k)
    assert torch.equal(k.dequantize(), before)


def test_reads_of_a_state_work():
    k = _state()
    full = k.dequantize()
    assert torch.equal(k[:, :, 3].clone(), full[:, :, 3]) and torch.equal(k[0, 1].clone(), full[0, 1])
    assert (k[:, :, 3] + 1).dtype == full.dtype and torch.equal(k[:, :, 3] + 1, full[:, :, 3] + 1)
    assert np.array_equal(k.numpy(), full.numpy()) and k.tolist() == full.tolist()
    kept = k[..., :7, :]  # transformers' crop: still packed
    assert isinstance(kept, KVState) and torch.equal(kept.dequantize(), full[:, :, :7])


class _BrokenDecoder(torch.nn.Module):
    """Appends to its cache, then breaks the graph before attention."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x, cache=None):
        q, k, v = self.proj(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        torch._dynamo.graph_break()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), (k, v)


def test_a_graph_break_between_update_and_attention_is_named():
    m = _BrokenDecoder()
    f = torch.compile(m, backend="kvquant", options=dict(KIVI, compiler="eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cache = f(torch.randn(1, 3, 16))  # the first call makes the cache
    with pytest.warns(KVQuantWarning, match=r"graph break \(.*graph_break.*\): the cache update and the attention"):
        _, cache = f(torch.randn(1, 1, 16), cache)
    x = torch.randn(1, 1, 16)
    torch.testing.assert_close(f(x, cache)[0], m(x, cache)[0])  # left alone: runs in full precision, correctly


def test_a_cache_continued_under_other_options_says_which_format_it_keeps():
    model = tiny("llama")
    cache = DynamicCache()
    with torch.no_grad():
        torch.compile(model, backend="kvquant", options=dict(KIVI, compiler="eager"))(
            _ids(1, 6), past_key_values=cache, use_cache=True)
        torch._dynamo.reset()
        g = torch.compile(model, backend="kvquant", options=dict(method="int8", compiler="eager"))
        with pytest.warns(KVQuantWarning, match="holds keys stored as kivi.*not as these options say.*int8"):
            g(_ids(1, 1), past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.kv_layout.method == "kivi"


def test_option_errors_are_plain_importable_picklable_value_errors():
    model = tiny("llama")
    f = torch.compile(model, backend="kvquant", options=dict(method="kivi", bits=5))
    with pytest.raises(KVQuantOptionError) as e:
        f(_ids(1, 3))
    assert type(e.value) is KVQuantOptionError and isinstance(e.value, ValueError)
    assert str(e.value) == "bits must be one of 2, 4 for method 'kivi'; got 5"  # nothing appended
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is KVQuantOptionError and str(again) == str(e.value)


def test_numpy_integers_are_accepted_and_errors_name_the_option_set():
    assert Config(method="nqkv", bits=np.int64(4), block_size=np.int32(8)).bits == 4
    with pytest.raises(KVQuantOptionError, match=r"^bits=3 packs 8 codes"):
        from kvcompile.methods import layouts

        layouts(Config(method="nqkv", bits=3, block_size=4), 12)
    with pytest.raises(KVQuantOptionError, match=r"^v_bits=3 packs 8 codes"):
        layouts(Config(method="nqkv", bits=4, v_bits=3, block_size=4), 12)


@pytest.mark.parametrize("how", ["torch.compile", "model.compile", "forward"])
def test_generate_on_each_compile_idiom_quantizes(how):
    """`torch.compile(model, backend=...).generate(...)` (generate() belongs to the original module),
    `model.compile(...)` and `model.forward = torch.compile(model.forward, ...)`: each quantizes the cache,
    and equals the eager reference; the original module is left as it was."""
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(backend="kvquant", options=dict(KIVI, compiler="eager"))
    torch._dynamo.reset()
    if how == "torch.compile":
        gen = torch.compile(model, **kw)
    elif how == "model.compile":
        model.compile(**kw)
        gen = model
    else:
        model.forward = torch.compile(model.forward, **kw)
        gen = model
    cache = DynamicCache()
    with torch.no_grad():
        got = gen.generate(ids, past_key_values=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        want = tiny("llama").generate(ids, past_key_values=FakeQuantCache(Config(**KIVI)), max_new_tokens=12,
                                      min_new_tokens=12, do_sample=False)
    assert all(isinstance(layer.keys, KVState) and isinstance(layer.values, KVState) for layer in cache.layers)
    assert torch.equal(got, want)
    if how == "torch.compile":
        assert "forward" not in model.__dict__


def test_a_recompile_limit_that_is_still_hit_is_warned(monkeypatch):
    """Past the (raised) recompile limit a frame's new shapes run uncompiled, and a fresh cache they fill
    stays in full precision: nothing of kvcompile's runs then, so the warning comes from Dynamo's own
    log line, once per function, naming the limit and what to do."""
    import kvcompile.backend

    monkeypatch.setattr(kvcompile.backend, "RECOMPILE_LIMIT", 1)
    model = tiny("llama")
    f = torch.compile(model, backend="kvquant", options=dict(KIVI, compiler="eager"))
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False), \
            warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for n in (3, 4, 5):  # each prompt length a graph of its own (no dynamic shapes)
            cache = DynamicCache()
            f(_ids(1, n), past_key_values=cache, use_cache=True)
    hits = _kv_warnings(rec, "recompile limit")
    assert len(hits) == 1 and "recompile_limit = 1" in str(hits[0].message), [str(w.message) for w in rec]
    assert not any(isinstance(t, KVState) for t in kvcompile.cache_tensors(cache))  # the fallback it warns of
