"""Preallocated cache buffers the decoder writes in place (examples/decoders.py, cache = buffer /
attribute / argument): found by what the graph does with them, replaced after their first call by
fixed-size quantized states (kvcompile/buffers.py), read by the fused attention. `none` exact; int8 and
nqkv equal to the eager reference of the same semantics (each token quantized on its own as it is
written; what the first call wrote, quantized when the buffer is swapped); the bytes held those of the
packed rows; the full-precision buffer's memory freed; a bounded number of graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kvcompile
from helpers import max_abs_diff
from kvcompile import Config, KVQuantWarning, KVState
from kvcompile.fakequant import FakeQuantStream
from kvcompile.layout import PAD
from decoders import BUFFERS, Decoder, Idiom, run

OPTIONS = {"none": dict(method="none"), "int8": dict(method="int8"), "nqkv": dict(method="nqkv", bits=4),
           "nqkv-h": dict(method="nqkv", bits=3, hadamard=True),
           "kivi": dict(method="kivi", bits=2, group_size=4, residual_length=4),
           "int8-r": dict(method="int8", residual_length=2)}


def buffers_of(model: Decoder, past) -> list:
    if model.idiom.cache == "argument":
        return [t for layer in past for t in layer]
    if model.idiom.cache == "buffer":
        return [t for b in model.blocks for t in (b.k_cache, b.v_cache)]
    return [t for b in model.blocks for t in (b.cache_k, b.cache_v)]


def reference(idiom: Idiom, ids: torch.Tensor, prefill: int, options: dict) -> list:
    """The eager semantics: the first call writes full precision, then the buffer holds each token
    quantized on its own (the swap); later calls write each token quantized."""
    model = Decoder(idiom).eval()
    config = Config(**options)

    def hook(layer, role, x):  # one token at a time is the same for a per-token format: a fresh stream
        return FakeQuantStream(config, role, idiom.logical(role), idiom.kv_heads)(x)

    out = []
    with torch.no_grad():
        past = model.buffers(ids.shape[0]) if idiom.cache == "argument" else None
        for i, (s, e) in enumerate([(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]):
            logits, past = model(ids[:, s:e], past, s, hook=hook if i else None)
            out.append(logits)
            if i == 0:
                for b, role in zip(buffers_of(model, past), "kv" * len(model.blocks)):
                    b.copy_(hook(0, role, b))
    return out


def reference_window(idiom: Idiom, ids: torch.Tensor, prefill: int, options: dict) -> list:
    """The eager semantics with a full-precision window (kivi, residual_length > 0): the first call writes full
    precision; after each call the tokens written so far are kept as a growing cache keeps them (FakeQuantStream
    over the buffer's first tokens: attention read them before this step's quantization)."""
    from kvcompile.layout import Layout

    model = Decoder(idiom).eval()
    config = Config(**options)
    streams = {}
    out = []
    with torch.no_grad():
        past = model.buffers(ids.shape[0]) if idiom.cache == "argument" else None
        for s, e in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
            logits, past = model(ids[:, s:e], past, s)
            out.append(logits)
            for i, (b, role) in enumerate(zip(buffers_of(model, past), "kv" * len(model.blocks))):
                logical = idiom.logical(role)
                d = Layout("", role, "none", 16, 1, 0, 0, logical=logical, heads=idiom.kv_heads).token_dim
                stream = streams.setdefault(i, FakeQuantStream(config, role, logical, idiom.kv_heads))
                written = b.narrow(d, 0, e)
                written.copy_(stream(written))
    return out


def check(idiom: Idiom, method: str, steps: int = 10, prefill: int = 5, batch: int = 2) -> Decoder:
    options = OPTIONS[method]
    ids = torch.randint(0, 64, (batch, prefill + steps), generator=torch.Generator().manual_seed(2))
    model = Decoder(idiom).eval()
    torch._dynamo.reset()
    kvcompile.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVQuantWarning)  # nothing left alone, nothing run eagerly on a state
        got, past = run(torch.compile(model, backend="kvquant", options=dict(options, compiler="eager")), ids,
                        prefill)
    bufs = buffers_of(model, past)
    fp, _ = run(Decoder(idiom).eval(), ids, prefill)
    if method == "none":
        assert all(type(b) is torch.Tensor for b in bufs)
        assert all(torch.equal(a, b) for a, b in zip(got, fp)), max_abs_diff(got, fp)
        return model
    assert all(isinstance(b, KVState) and b.kv_layout.static for b in bufs), [type(b) for b in bufs]
    reports = kvcompile.reports()
    assert all(len(r.quantized) == 2 * len(model.blocks) for r in reports), kvcompile.explain()
    assert all("fused attention" in e.status for e in reports[-1].entries), kvcompile.explain()
    window = Config(**options).residual_length > 0
    want = (reference_window if window else reference)(idiom, ids, prefill, options)
    err, quant = max_abs_diff(got, want), max_abs_diff(got, fp)
    assert err < 1e-5 and quant > 100 * max(err, 1e-7), (err, quant)
    return model


FORMS = [  # (cache owner, write, read, layout): every form of the issue, each write and read at least once
    ("buffer", "index", "whole", "bhtd"),  # gpt-fast: k_cache[:, :, input_pos] = k, masked whole read
    ("buffer", "index_copy", "prefix", "bhtd"),  # k_cache.index_copy_(2, pos, k), read k_cache[:, :, :n]
    ("attribute", "slice", "prefix", "bthd"),  # the reference Llama: cache_k[:bsz, s:e] = xk; cache_k[:bsz, :e]
    ("argument", "index", "whole", "bthd"),  # buffers the caller made, passed to forward
    ("argument", "slice", "prefix", "bhtd"),
    ("buffer", "index_copy", "whole", "bthd"),
    ("buffer", "index_copy_used", "whole", "bhtd"),  # litgpt: k = self.k.index_copy_(2, input_pos, k)
    ("buffer", "index_put", "whole", "bhtd"),  # ExecuTorch: torch.ops.aten.index_put_(k_cache, [None, None, pos], k)
    ("buffer", "scatter", "whole", "bthd"),  # k_cache.scatter_(1, pos.view(1, n, 1, 1).expand_as(k), k)
    ("attribute", "scatter", "prefix", "bhtd"),
]


@pytest.mark.parametrize("form", FORMS, ids=["-".join(f) for f in FORMS])
@pytest.mark.parametrize("method", ["none", "int8", "nqkv", "kivi"])
def test_buffer_forms(form, method):
    cache, write, read, layout = form
    check(Idiom(cache=cache, write=write, read=read, layout=layout), method)


@pytest.mark.parametrize("attention", ["matmul", "einsum", "at"])
def test_buffer_attention_forms(attention):
    check(Idiom(cache="attribute", write="slice", read="prefix", layout="bthd", attention=attention,
                repeat="none" if attention == "einsum" else "interleave"), "nqkv-h")


def test_a_rolling_buffer_wraps():
    """A sliding window kept in a buffer of 8 slots written at pos % 8, over 16 tokens."""
    check(Idiom(cache="buffer", write="rolling", read="whole", max_len=8), "int8", steps=11)


def test_a_batch_of_one():
    """`buf[:, :, pos] = k` with B = 1: torch drops the value's leading unit dims before index_put_."""
    check(Idiom(cache="argument", write="index", read="whole"), "int8", batch=1)


@pytest.mark.parametrize("method", ["int8", "kivi"])
def test_batch_smaller_than_the_buffers(method):
    """The reference Llama's max_batch_size: a batch of 1 in buffers of 2 rows (`cache_k[:bsz]`)."""
    check(Idiom(cache="attribute", write="slice", read="prefix", layout="bthd"), method, batch=1)


def test_a_second_instance_of_the_model_is_swapped_too():
    """Two instances of one decoder class, compiled in turn: each one's buffers are swapped after its own
    first call (buffers.swapping checks every call, whether Dynamo gives the second instance a graph of
    its own or reuses the first's)."""
    idiom = Idiom(cache="buffer", write="index", read="whole")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    models = [Decoder(idiom, seed=s).eval() for s in (0, 1)]
    for m in models:
        run(torch.compile(m, backend="kvquant", options=dict(method="int8", compiler="eager")), ids, 5)
    assert all(isinstance(t, KVState) for m in models for t in buffers_of(m, None))


def test_bytes_held_are_the_packed_rows():
    model = check(Idiom(cache="buffer", write="index", read="whole"), "int8")
    for s in buffers_of(model, None):
        B, H, S, D = s.canonical_shape
        cw, sw, mw = s.kv_layout.widths(D)
        packed = B * H * (PAD + S) * (cw + (sw + mw) * s.res.element_size()) + B * H * PAD * D * s.res.element_size()
        assert kvcompile.nbytes(s) == packed < B * H * S * D * 4 / 2  # int8 at D = 8: scales weigh


def test_eager_use_of_a_swapped_buffer():
    """Outside the compiled code a swapped buffer still reads (dequantized), writes (quantized as written) and
    resets (zero_)."""
    model = check(Idiom(cache="buffer", write="index", read="whole"), "int8")
    buf = model.blocks[0].k_cache
    before = buf.dequantize()
    assert torch.equal(buf[:, :, :3], before[:, :, :3])
    new = torch.randn(2, 2, 1, 8)
    buf[:, :, 20:21] = new
    assert max_abs_diff(buf.dequantize()[:, :, 20:21], new) < 0.05
    assert torch.equal(buf.dequantize()[:, :, :20], before[:, :, :20])
    buf.zero_()
    assert not buf.dequantize().any()


@pytest.mark.parametrize("method", ["int8", "kivi"])
def test_a_generation_of_300_tokens_compiles_a_bounded_number_of_graphs(method):
    idiom = Idiom(cache="attribute", write="slice", read="prefix", layout="bthd", max_len=320)
    model = Decoder(idiom, layers=1).eval()
    ids = torch.randint(0, 64, (1, 308), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    kvcompile.reset()
    run(torch.compile(model, backend="kvquant", options=dict(OPTIONS[method], compiler="eager")), ids, 8)
    assert isinstance(model.blocks[0].cache_k, KVState)
    assert len(kvcompile.reports()) <= 4, kvcompile.explain()


@pytest.mark.slow
@pytest.mark.parametrize("form", [("attribute", "slice", "prefix", "bthd", 1, "int8"),
                                  ("buffer", "index", "whole", "bhtd", 2, "int8"),
                                  ("attribute", "slice", "prefix", "bthd", 2, "kivi")])
def test_buffers_under_inductor(form):
    """The swapped states through AOTAutograd and Inductor (writes into a batch prefix of the packed rows
    included): the same logits as the eager compiler's run, to float rounding."""
    cache, write, read, layout, batch, method = form
    idiom = Idiom(cache=cache, write=write, read=read, layout=layout, attention="matmul")
    ids = torch.randint(0, 64, (batch, 14), generator=torch.Generator().manual_seed(1))
    out = {}
    for compiler in ("inductor", "eager"):
        model = Decoder(idiom).eval()
        torch._dynamo.reset()
        out[compiler], past = run(torch.compile(model, backend="kvquant", options=dict(OPTIONS[method], compiler=compiler)),
                                  ids, 6)
        assert all(isinstance(b, KVState) for b in buffers_of(model, past))
    assert max_abs_diff(out["inductor"], out["eager"]) < 1e-4


_MEMORY = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from decoders import Decoder, Idiom
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
idiom = Idiom(cache="buffer", write="index", read="whole", heads=8, kv_heads=8, head_dim=64, max_len=16384, repeat="none")
model = Decoder(idiom, layers=2, max_batch=4).eval()
compiled = torch.compile(model, backend="kvquant", options=dict(json.loads(sys.argv[1]), compiler="eager"))
ids = torch.randint(0, 64, (4, 8))
with torch.no_grad():
    compiled(ids, None, 0)
    compiled(ids[:, :1], None, 8)
    compiled(ids[:, :1], None, 9)
import kvcompile
print(json.dumps(dict(rss=rss(), held=sum(kvcompile.nbytes(t) for b in model.blocks for t in (b.k_cache, b.v_cache)))))
"""


@pytest.mark.slow
def test_the_full_precision_buffers_are_freed():
    """Resident memory of a process whose cache dominates (2 layers x 4 x 8 heads x 16384 x 64 fp32: 537 MB),
    after the swap, against the same process with method none: lower by the bytes the formula says (int8;
    kivi-2, whose 128 full-precision tokens stay)."""
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    got = {}
    for name, opts in {"none": dict(method="none"), "int8": dict(method="int8"), "kivi": dict(method="kivi")}.items():
        out = subprocess.run([sys.executable, "-c", _MEMORY, json.dumps(opts), examples], capture_output=True,
                             text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        got[name] = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("int8", "kivi"):
        saved = got["none"]["held"] - got[name]["held"]
        assert saved > 360e6
        assert got["none"]["rss"] - got[name]["rss"] > 0.8 * saved, got


class ReferenceLlamaAttention(torch.nn.Module):
    """The original reference Llama's attention, in its idiom (written here): plain tensor attributes
    [max_batch, max_seq, Hkv, D], reassigned by `.to(xq)`, written `cache_k[:bsz, start_pos:start_pos + seqlen]
    = xk`, read back `cache_k[:bsz, :start_pos + seqlen]`, heads repeated in [B, T, H, D] before the transposes,
    matmul attention with an additive mask and a float32 softmax."""

    def __init__(self, dim=32, n_heads=4, n_kv_heads=2, max_batch=2, max_seq=32):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.n_rep, self.head_dim = n_heads, n_kv_heads, n_heads // n_kv_heads, dim // n_heads
        self.wq = torch.nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = torch.nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = torch.nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = torch.nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.cache_k = torch.zeros((max_batch, max_seq, n_kv_heads, self.head_dim))
        self.cache_v = torch.zeros((max_batch, max_seq, n_kv_heads, self.head_dim))

    def forward(self, x, start_pos: int, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        self.cache_k = self.cache_k.to(xq)
        self.cache_v = self.cache_v.to(xq)
        self.cache_k[:bsz, start_pos: start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos: start_pos + seqlen] = xv
        keys = self.cache_k[:bsz, : start_pos + seqlen]
        values = self.cache_v[:bsz, : start_pos + seqlen]
        keys, values = _repeat_kv(keys, self.n_rep), _repeat_kv(values, self.n_rep)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / (self.head_dim ** 0.5)
        if mask is not None:
            scores = scores + mask
        scores = torch.nn.functional.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)
        return self.wo(output.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


def _repeat_kv(x, n_rep):
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep,
                                                                                      head_dim)


def _llama_loop(f, x, prefill):
    out = []
    for s, e in [(0, prefill)] + [(t, t + 1) for t in range(prefill, x.shape[1])]:
        n = e - s
        mask = None
        if n > 1:
            mask = torch.hstack([torch.zeros(n, s), torch.full((n, n), float("-inf")).triu(1)])
        out.append(f(x[:, s:e], s, mask))
    return out


@pytest.mark.parametrize("batch", [1, 2])
def test_the_reference_llama_attention(batch):
    """Quantized after its first call; then the same as the same states run uncompiled (each write quantized
    by the state, attention over its dequantized value); `none` exact."""
    from kvcompile.buffers import swap

    x = torch.randn(batch, 14, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = ReferenceLlamaAttention().eval()
    twin = ReferenceLlamaAttention().eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        fp = _llama_loop(twin, x, 5)
        twin.cache_k.zero_(), twin.cache_v.zero_()
        for method in ("none", "int8"):
            model.cache_k, model.cache_v = torch.zeros_like(twin.cache_k), torch.zeros_like(twin.cache_v)
            torch._dynamo.reset()
            kvcompile.reset()
            f = torch.compile(model, backend="kvquant", options=dict(method=method, compiler="eager"))
            with warnings.catch_warnings():
                warnings.simplefilter("error", KVQuantWarning)
                got = _llama_loop(f, x, 5)
            if method == "none":
                assert all(torch.equal(a, b) for a, b in zip(got, fp))
                continue
            assert isinstance(model.cache_k, KVState) and isinstance(model.cache_v, KVState)
            assert any("fused attention" in e.status for e in kvcompile.reports()[-1].entries), kvcompile.explain()
        want = [twin(x[:, :5], 0, torch.full((5, 5), float("-inf")).triu(1))]
        swap(twin.cache_k, model.cache_k.kv_layout), swap(twin.cache_v, model.cache_v.kv_layout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KVQuantWarning)
            want += [twin(x[:, t:t + 1], t, None) for t in range(5, 14)]
    assert torch.equal(got[0], want[0])
    err, quant = max_abs_diff(got, want), max_abs_diff(got, fp)
    assert err < 1e-5 and quant > 100 * max(err, 1e-7), (err, quant)
