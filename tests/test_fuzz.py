"""A fuzzer of what users do with a compiled model and its cache (hypothesis stateful testing).

Each run draws a sequence of actions on a tiny compiled decoder and a transformers cache: decode steps
of 1..k tokens, generate() with random settings, crop, beam reorder, batch selection, deepcopy,
save/load, recompiling with other options, gradients on or off, another dtype. After every action the
logits equal those of the eager reference of the same semantics (FakeQuantCache, fed the same
actions) and every cache tensor that should be quantized is a KVState.

CI runs a few sequences; `HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py` searches for much longer.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvcompile
from helpers import max_abs_diff
from kvcompile import Config, KVQuantWarning, KVState
from kvcompile.fakequant import FakeQuantCache
from models import VOCAB, tiny

pytestmark = pytest.mark.slow

OPTIONS = [dict(method="kivi", bits=2, group_size=4, residual_length=8),
           dict(method="kivi", bits=4, v_bits=2, group_size=2, residual_length=4),
           dict(method="int8"), dict(method="nqkv", bits=4, block_size=4, residual_length=3),
           dict(method="fp8"), dict(method="none")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


class CacheSession(RuleBasedStateMachine):
    """One model and one cache, driven by the drawn actions, beside the reference."""

    @initialize(options=st.sampled_from(OPTIONS), attn=st.sampled_from(["sdpa", "eager"]),
                batch=st.integers(1, 3), prompt=st.integers(1, 12))
    def start(self, options, attn, batch, prompt):
        from transformers import DynamicCache

        torch._dynamo.reset()
        self.attn, self.dtype, self.grad, self.fell_back = attn, torch.float32, False, False
        self.model = tiny("llama", attn)
        self._compile(options)
        self.cache, self.ref = DynamicCache(), FakeQuantCache(self.config)
        self.batch, self.length = batch, 0
        self._step(prompt)

    def _compile(self, options):
        self.options = options
        self.config = Config(**options)
        self.compiled = torch.compile(self.model, backend="kvquant", options=dict(options, compiler="eager"))

    def _watch(self, rec):
        """Gradients on, options switched: warned about, checked elsewhere. A long session can reach Dynamo's
        recompile limit (every generate() compiles a deep copy of the model): then new shapes run uncompiled
        and their caches are not quantized, which must have been said (backend._RecompileLimitWatch)."""
        if any(issubclass(w.category, KVQuantWarning) and "recompile limit" in str(w.message) for w in rec):
            self.fell_back = True

    def _step(self, n):
        ids = torch.randint(0, VOCAB, (self.batch, n), generator=torch.Generator().manual_seed(self.length))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with torch.set_grad_enabled(self.grad):
                got = self.compiled(ids, past_key_values=self.cache, use_cache=True).logits
            with torch.no_grad():
                want = self.model(ids, past_key_values=self.ref, use_cache=True).logits
        self._watch(rec)
        self.length += n
        err = max_abs_diff(got, want)
        assert err <= TOL[self.dtype], (err, self.options)
        assert self.fell_back or not got.requires_grad  # the rewritten attention has no backward (warned)

    # -- actions ------------------------------------------------------------------------------------

    @rule(n=st.integers(1, 4))
    def decode(self, n):
        self._step(n)

    @rule(k=st.integers(1, 3))
    @precondition(lambda self: self.length > 3)
    def crop(self, k):
        for c in (self.cache, self.ref):
            c.crop(-k)
        self.length -= k

    @rule(data=st.data())
    def reorder(self, data):
        perm = torch.tensor(data.draw(st.permutations(range(self.batch))))
        for c in (self.cache, self.ref):
            c.reorder_cache(perm)

    @rule(data=st.data())
    @precondition(lambda self: self.batch > 1)
    def select_batch(self, data):
        keep = sorted(data.draw(st.sets(st.integers(0, self.batch - 1), min_size=1)))
        for c in (self.cache, self.ref):
            c.batch_select_indices(torch.tensor(keep))
        self.batch = len(keep)

    @rule()
    def deepcopy(self):
        self.cache, self.ref = copy.deepcopy(self.cache), copy.deepcopy(self.ref)

    @rule()
    def save_and_load(self):
        buf = io.BytesIO()
        torch.save(self.cache, buf)
        buf.seek(0)
        self.cache = torch.load(buf, weights_only=False)

    @rule(options=st.sampled_from(OPTIONS))
    def recompile_with(self, options):
        """The cache continues in the format it holds (a KVQuantWarning says so): so does the reference."""
        self.compiled = torch.compile(self.model, backend="kvquant", options=dict(options, compiler="eager"))
        self.options = options

    @rule()
    def toggle_grad(self):
        self.grad = not self.grad

    @rule(dtype=st.sampled_from([torch.float32, torch.bfloat16]), prompt=st.integers(1, 10))
    def restart_in(self, dtype, prompt):
        """A new generation in another dtype: fresh caches."""
        from transformers import DynamicCache

        self.dtype = dtype
        self.model = self.model.to(dtype)
        self._compile(self.options)
        self.cache, self.ref, self.length = DynamicCache(), FakeQuantCache(self.config), 0
        self._step(prompt)

    @rule(new=st.integers(1, 6), beams=st.sampled_from([1, 2]), sample=st.booleans())
    def generate(self, new, beams, sample):
        """generate() on a model compiled in place, against generate() with the reference cache."""
        from transformers import DynamicCache

        ids = torch.randint(0, VOCAB, (self.batch, 5), generator=torch.Generator().manual_seed(new))
        kw = dict(max_new_tokens=new, min_new_tokens=new, num_beams=beams, do_sample=sample, top_k=4)
        gen = copy.deepcopy(self.model)
        gen.compile(backend="kvquant", options=dict(self.options, compiler="eager"))
        outs = []
        for model, cache in ((gen, DynamicCache()), (self.model, FakeQuantCache(Config(**self.options)))):
            torch.manual_seed(0)
            with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                outs.append(model.generate(ids, past_key_values=cache, **kw))
            self._watch(rec)
            if model is gen and self.options["method"] != "none" and not self.fell_back:
                assert all(isinstance(t, KVState) for t in kvcompile.cache_tensors(cache))
        assert torch.equal(*outs), (self.options, kw)

    # -- what must hold after every action ------------------------------------------------------------

    @invariant()
    def cache_is_quantized(self):
        tensors = kvcompile.cache_tensors(self.cache)
        assert tensors and (self.fell_back or all(isinstance(t, KVState) for t in tensors)), [type(t) for t in tensors]
        assert all(t.shape[2] == self.length and t.shape[0] == self.batch for t in tensors)


_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
CacheSession.TestCase.settings = settings(max_examples=100_000 if _LONG else 3, stateful_step_count=25 if _LONG else 8)
test_cache_session = CacheSession.TestCase


def test_a_sequence_the_fuzzer_found():
    """The long run's finding, replayed: copies compiled for generate(), restarts in other dtypes and a
    gradient toggle put more graphs on transformers' forward wrapper (one frame for every copy and every
    torch.compile call of the model) than Dynamo's default recompile limit of 8, and the next restart
    ran uncompiled, its fresh cache in full precision. kvquant now raises the default limit when it
    first compiles (backend._raise_recompile_limit); this sequence stays quantized and is not warned."""
    session = CacheSession()
    with torch._dynamo.config.patch(recompile_limit=8):
        session.start(options=OPTIONS[0], attn="sdpa", prompt=11, batch=2)
        steps = [("deepcopy", {}), ("generate", dict(beams=2, new=4, sample=True)),
                 ("restart_in", dict(dtype=torch.float32, prompt=1)), ("recompile_with", dict(options=OPTIONS[0])),
                 ("restart_in", dict(dtype=torch.bfloat16, prompt=5)), ("save_and_load", {}),
                 ("generate", dict(beams=2, new=6, sample=False)), ("generate", dict(beams=1, new=6, sample=False)),
                 ("generate", dict(beams=2, new=6, sample=True)), ("toggle_grad", {}), ("crop", dict(k=1)),
                 ("restart_in", dict(dtype=torch.float32, prompt=9))]
        for name, kw in steps:
            getattr(session, name)(**kw)
            session.cache_is_quantized()
            assert not session.fell_back, name
