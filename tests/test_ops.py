"""Every kvquant:: op against its fake and the dispatcher (torch.library.opcheck), and the ops
against the plain full-precision computation they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_exact, lay, packed
from kvcompile import ops
from kvcompile.kernels import reference as ref
from kvcompile.layout import CHANNEL_AXIS, PAD, TOKEN_AXIS, Layout, Packed

CASES = [  # B, Hq, Hkv, Nq, Nr, D, L
    (1, 2, 2, 8, 3, 8, 1),
    (2, 4, 2, 16, 1, 8, 1),
    (2, 3, 1, 0, 5, 16, 2),
    (1, 8, 1, 8, 0, 8, 3),
]
OPS = torch.ops.kvquant


def _reads(q: torch.Tensor, k: Packed, v: Packed, mask, scale):
    """Every read op on (k, v) through opcheck, and against plain attention over their full precision."""
    B, Hq, L, _ = q.shape
    K, V = ref.full(k), ref.full(v)
    rep = Hq // K.shape[1]
    Kr, Vr = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
    torch.library.opcheck(OPS.attention, (q, *k.op_args(), *v.op_args(), mask, 0.0, False, scale, False))
    torch.testing.assert_close(ops.attention(q, k, v, mask, scale=scale),
                               F.scaled_dot_product_attention(q, Kr, Vr, mask, scale=scale))
    torch.library.opcheck(OPS.qk, (q, *k.op_args()))
    torch.testing.assert_close(ops.qk(q, k), q @ Kr.transpose(-1, -2))
    p = torch.softmax(torch.randn(B, Hq, L, K.shape[2]), -1)
    torch.library.opcheck(OPS.pv, (p, *v.op_args()))
    torch.testing.assert_close(ops.pv(p, v), p @ Vr)
    torch.library.opcheck(OPS.dequantize, k.op_args())
    assert_exact(ops.dequantize(k), K, "dequantize")


@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nr, D, L", CASES)
def test_attention_ops(B, Hq, Hkv, Nq, Nr, D, L):
    k = packed(B, Hkv, Nq, Nr, D, lay("kivi", 2, 4, TOKEN_AXIS), seed=1)
    v = packed(B, Hkv, Nq, Nr, D, lay("kivi", 4, 4, CHANNEL_AXIS), seed=2)
    q = torch.randn(B, Hq, L, D)
    _reads(q, k, v, torch.randn(B, 1, L, Nq + Nr), 0.3)


@pytest.mark.parametrize("axis, Nr, expect_n", [(TOKEN_AXIS, 7, 0), (TOKEN_AXIS, 8, 8), (TOKEN_AXIS, 17, 16),
                                                (CHANNEL_AXIS, 8, 0), (CHANNEL_AXIS, 11, 3)])
def test_compact_writes_in_place(axis, Nr, expect_n):
    layout = lay("kivi", 2, 4, axis, residual=8)
    p = packed(2, 2, 8, Nr, 8, layout)
    full = ref.full(p)
    # storage with room for 16 more tokens, holding the 8 quantized ones
    torch.library.opcheck(OPS.grow, (p.codes, p.scale, p.mn, layout.key, 8, 32, 0))
    c, s, m = ops.grow(p, 24)
    p = p._replace(codes=c, scale=s, mn=m)
    torch.library.opcheck(OPS.compact_, tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in p.op_args()))
    before = [t.clone() for t in (c, s, m)]
    ptrs = [t.data_ptr() for t in (c, s, m)]
    r2 = ops.compact_(p)
    assert [t.data_ptr() for t in (c, s, m)] == ptrs
    assert r2.shape[2] - PAD == Nr - expect_n
    assert torch.equal(ref.unpad(r2), ref.unpad(p.res)[:, :, expect_n:])
    # the tokens that left the residual are quantized exactly as the reference quantizer does, after the 8
    want = ref.quantize(ref.unpad(p.res)[:, :, :expect_n], layout)
    ns = layout.scale_rows(8)
    for got, old, w, rows in zip((c, s, m), before, want, (8, ns, ns)):
        n = w.shape[2]
        assert torch.equal(got[:, :, PAD + rows:PAD + rows + n], w)
        assert torch.equal(got[:, :, :PAD + rows], old[:, :, :PAD + rows])  # older tokens untouched
    full2 = ops.dequantize(Packed(c, s, m, r2, layout, 8 + expect_n))
    assert_exact(full2[:, :, :8], full[:, :, :8], "older tokens")


SYMMETRIC = [("nf", 4, 4), ("nf", 3, 8), ("nf", 2, 4), ("int8", 8, 8), ("fp8", 8, 8), ("nfh", 4, 8), ("nfh", 3, 4)]


@pytest.mark.parametrize("fmt, bits, group", SYMMETRIC)
@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nr, D, L", CASES[:3])
def test_symmetric_format_ops(fmt, bits, group, B, Hq, Hkv, Nq, Nr, D, L):
    """nqkv / int8 / fp8 storage through every op: the layout names the format, mn has width 0."""
    k = packed(B, Hkv, Nq, Nr, D, lay(fmt, bits, group), seed=1)
    v = packed(B, Hkv, Nq, Nr, D, lay(fmt, bits, group), seed=2)
    assert k.mn.shape[-1] == 0
    _reads(torch.randn(B, Hq, L, D), k, v, None, None)


@pytest.mark.parametrize("fmt, bits, group", SYMMETRIC)
def test_symmetric_format_compact(fmt, bits, group):
    layout = lay(fmt, bits, group, residual=2)
    c, s, m = ref.quantize(torch.randn(2, 2, 5, 8), layout)
    assert c.shape[-1] == 8 * bits // 8 and s.shape[-1] == 8 // group and m.shape[-1] == 0
    # residual 2: 3 of the 5 residual tokens leave it, written after the 4 already held
    p = packed(2, 2, 4, 5, 8, layout)
    full = ref.full(p)
    c, s, m = ops.grow(p, 16)
    p = p._replace(codes=c, scale=s, mn=m)
    torch.library.opcheck(OPS.compact_, tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in p.op_args()))
    r2 = ops.compact_(p)
    assert r2.shape[2] - PAD == 2
    want = ref.quantize(ref.unpad(p.res)[:, :, :3], layout)
    for got, w in zip((c, s, m), want):
        assert torch.equal(got[:, :, PAD + 4:PAD + 7], w)
    deq = ops.dequantize(Packed(c, s, m, r2, layout, 7))
    assert_exact(deq[:, :, :4], full[:, :, :4], "older tokens")
    assert_exact(deq[:, :, 7:], ref.unpad(p.res)[:, :, 3:], "residual")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("nf", 4), ("fp8", 8), ("nfh", 3)])
def test_write_quantizes_each_token_where_it_goes(fmt, bits, kernels, monkeypatch):
    """Bit for bit the reference's tokens, at their positions, through the torch ops or the Triton
    quantizer (KVCOMPILE_KERNELS=triton: interpreted here)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("KVCOMPILE_KERNELS", kernels)
    counters.clear()
    layout = lay(fmt, bits, 8, static=True)
    p = packed(1, 2, 6, 0, 8, layout)
    new, pos = torch.randn(1, 2, 2, 8), torch.tensor([4, 1])
    args = (p.codes, p.scale, p.mn, layout.key, new, pos)
    torch.library.opcheck(OPS.write_, tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args))
    want = ref.full(p).clone()
    want[:, :, pos] = ref.qdq(new, layout)
    ops.write_(p, new, pos)
    assert_exact(ref.full(p), want, "written buffer")
    assert (counters["kvquant"]["triton_quantize_calls"] > 0) == (kernels == "triton")


@pytest.mark.slow  # compiles one quantizer graph (seconds)
@pytest.mark.parametrize("layout", [lay("kivi", 2, 4, TOKEN_AXIS, residual=8), lay("int8", 8, 8)])
def test_cpu_quantizes_decode_sized_token_counts_only(layout, monkeypatch):
    """On the CPU the quantize op takes the compiled quantizer (kernels/cpu.py) for the tokens a decode step
    quantizes (up to a window, a group or MAX_QUERIES) and the reference for a prefill's many, whose graph
    would be compiled for one call; the same codes either way."""
    from torch._dynamo.utils import counters

    from kvcompile.kernels import cpu

    monkeypatch.setenv("KVCOMPILE_KERNELS", "auto")
    bound = max(cpu.MAX_QUERIES, layout.residual, layout.group)
    for n, compiled in ((layout.group, True), (bound + layout.group, False)):
        x = torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(n))
        before = counters["kvquant"]["cpu_quantize_calls"]
        got = ops.quantize(x, layout)
        assert (counters["kvquant"]["cpu_quantize_calls"] > before) == compiled, (n, compiled)
        for g, w, name in zip(got, ref.quantize(x, layout), ("codes", "scale", "mn")):
            assert_exact(g, w, f"{name}, {n} tokens")


@pytest.mark.slow  # compiles one quantizer graph (seconds)
def test_cpu_quantizer_is_called_without_dynamo():
    """The decode's quantizer (kernels/cpu.quantize) runs its compiled graph directly: no Dynamo frame and
    no guard check per call (its sizes are static, its cache key is what guards would check), and a
    second call with the same sizes compiles nothing new."""
    from torch.profiler import profile

    from kvcompile.kernels import cpu

    layout = lay("kivi", 2, 8, CHANNEL_AXIS, residual=4)
    x = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(0))
    cpu.quantize(x, layout)
    graphs = cpu._compiled_quantize.cache_info().currsize
    with profile() as prof:
        got = cpu.quantize(x, layout)
    names = [e.key for e in prof.key_averages()]
    assert any(n.startswith("## Call CompiledFxGraph") for n in names), names
    assert not any("TorchDynamo" in n or "Torch-Compiled Region" in n for n in names), names
    assert cpu._compiled_quantize.cache_info().currsize == graphs
    for g, w, name in zip(got, ref.quantize(x, layout), ("codes", "scale", "mn")):
        assert_exact(g, w, name)


def test_layout_crosses_the_op_boundary_as_its_key():
    layout = lay("nfh", 3, 8, residual=4, window=True)
    assert Layout.from_key(layout.key) == layout
    assert Layout.from_key(layout.key) is Layout.from_key(layout.key)  # cached: the same record


def test_which_reads_take_the_triton_kernels(monkeypatch):
    """KVCOMPILE_KERNELS=triton forces the kernels (a window that has dropped rows too), =torch the
    reference, =cpu the compiled CPU path (kernels/cpu.py) where it applies; anything else is refused."""
    monkeypatch.setenv("KVCOMPILE_KERNELS", "triton")
    t = torch.zeros(1)
    p = packed(1, 1, 4, 1, 8, lay("nfh", 4, 8))
    assert ops.use_triton(t) and ops.use_triton(t, p, p)
    assert ops.use_triton(t, p._replace(skip=1))
    monkeypatch.setenv("KVCOMPILE_KERNELS", "torch")
    assert not ops.use_triton(t, p)
    for mode in ("auto", "cpu", "inline"):  # on a CPU tensor: the compiled CPU path, not Triton
        monkeypatch.setenv("KVCOMPILE_KERNELS", mode)
        assert not ops.use_triton(t, p)
    monkeypatch.setenv("KVCOMPILE_KERNELS", "gpu")
    with pytest.raises(ValueError, match="KVCOMPILE_KERNELS must be one of auto, triton, torch, cpu, inline; got 'gpu'"):
        ops.use_triton(t)
