"""Every kvquant:: op against its fake and the dispatcher (torch.library.opcheck), and the ops
against the plain full-precision computation they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvcompile import ops
from kvcompile.kernels import reference as ref
from kvcompile.methods import CHANNEL_AXIS, FORMATS, KIVI, NFH, TOKEN_AXIS


def _packed(B, H, Nq, Nr, D, bits, group, axis, dtype=torch.float32, seed=0, fmt=KIVI):
    """Padded (codes, scale, mn, res) holding Nq quantized and Nr residual tokens, and the cache they mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, Nq + Nr, D, generator=g).to(dtype)
    c, s, m = ref.quantize(x[:, :, :Nq], bits, group, axis, fmt)
    inner = tuple(ref.pad(t) for t in (c, s, m, x[:, :, Nq:]))
    return inner, ref.full_padded(*inner, bits, group, axis, None, fmt)


CASES = [  # B, Hq, Hkv, Nq, Nr, D, L
    (1, 2, 2, 8, 3, 8, 1),
    (2, 4, 2, 16, 1, 8, 1),
    (2, 3, 1, 0, 5, 16, 2),
    (1, 8, 1, 8, 0, 8, 3),
]


@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nr, D, L", CASES)
def test_attention_ops(B, Hq, Hkv, Nq, Nr, D, L):
    k, K = _packed(B, Hkv, Nq, Nr, D, 2, 4, TOKEN_AXIS, seed=1)
    v, V = _packed(B, Hkv, Nq, Nr, D, 4, 4, CHANNEL_AXIS, seed=2)
    q = torch.randn(B, Hq, L, D)
    km, vm = [2, 4, TOKEN_AXIS, Nq], [4, 4, CHANNEL_AXIS, Nq]
    T = Nq + Nr
    mask = torch.randn(B, 1, L, T)
    args = (q, *k, *v, km, vm, mask, 0.0, False, 0.3, False)
    torch.library.opcheck(ops.attention, args)
    rep = Hq // Hkv
    Kr, Vr = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
    torch.testing.assert_close(ops.attention(*args), F.scaled_dot_product_attention(q, Kr, Vr, mask, scale=0.3))
    torch.library.opcheck(ops.qk, (q, *k, km))
    torch.testing.assert_close(ops.qk(q, *k, km), q @ Kr.transpose(-1, -2))
    p = torch.softmax(torch.randn(B, Hq, L, T), -1)
    torch.library.opcheck(ops.pv, (p, *v, vm))
    torch.testing.assert_close(ops.pv(p, *v, vm), p @ Vr)


@pytest.mark.parametrize("axis, Nr, expect_n", [(TOKEN_AXIS, 7, 0), (TOKEN_AXIS, 8, 8), (TOKEN_AXIS, 17, 16),
                                                (CHANNEL_AXIS, 8, 0), (CHANNEL_AXIS, 11, 3)])
def test_compact_writes_in_place(axis, Nr, expect_n):
    (c, s, m, r), full = _packed(2, 2, 8, Nr, 8, 2, 4, axis)
    # storage with room for 16 more tokens, holding the 8 quantized ones
    c, s, m = ops.grow(c, s, m, 8, 24, 4, axis)
    torch.library.opcheck(ops.grow, (c, s, m, 8, 32, 4, axis))
    args = (c, s, m, r, 8, "kivi", 2, 4, axis, 8, KIVI)
    torch.library.opcheck(ops.compact_, tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args))
    before = [t.clone() for t in (c, s, m)]
    ptrs = [t.data_ptr() for t in (c, s, m)]
    r2 = ops.compact_(*args)
    assert [t.data_ptr() for t in (c, s, m)] == ptrs
    assert r2.shape[2] - ref.PAD == Nr - expect_n
    assert torch.equal(ref.unpad(r2), ref.unpad(r)[:, :, expect_n:])
    # the tokens that left the residual are quantized exactly as the reference quantizer does, after the 8
    want = ref.quantize(ref.unpad(r)[:, :, :expect_n], 2, 4, axis)
    ns = 2 if axis == TOKEN_AXIS else 8
    for got, old, w, rows in zip((c, s, m), before, want, (8, ns, ns)):
        n = w.shape[2]
        assert torch.equal(got[:, :, ref.PAD + rows:ref.PAD + rows + n], w)
        assert torch.equal(got[:, :, :ref.PAD + rows], old[:, :, :ref.PAD + rows])  # older tokens untouched
    full2 = ops.dequantize(c, s, m, r2, [2, 4, axis, 8 + expect_n])
    torch.testing.assert_close(full2[:, :, :8], full[:, :, :8], atol=0, rtol=0)


def test_append_and_quantize():
    res, new = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 1, 8)
    torch.library.opcheck(ops.append, (res, new))
    assert torch.equal(ops.append(res, new), torch.cat([res, new], 2))
    torch.library.opcheck(ops.quantize, (torch.randn(1, 2, 8, 8), 2, 4, TOKEN_AXIS))
    torch.library.opcheck(ops.quantize, (torch.randn(1, 2, 3, 8), 4, 4, CHANNEL_AXIS))


SYMMETRIC = [  # method, bits, group (head_dim 8); "nqkv-h": nqkv with hadamard=True
    ("nqkv", 4, 4), ("nqkv", 3, 8), ("nqkv", 2, 4), ("int8", 8, 8), ("fp8", 8, 8), ("nqkv-h", 4, 8), ("nqkv-h", 3, 4),
]
FMT = {**FORMATS, "nqkv-h": NFH}


@pytest.mark.parametrize("method, bits, group", SYMMETRIC)
@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nr, D, L", CASES[:3])
def test_symmetric_format_ops(method, bits, group, B, Hq, Hkv, Nq, Nr, D, L):
    """nqkv / int8 / fp8 storage through every op: meta's 5th element names the format, mn has width 0."""
    fmt = FMT[method]
    k, K = _packed(B, Hkv, Nq, Nr, D, bits, group, CHANNEL_AXIS, seed=1, fmt=fmt)
    v, V = _packed(B, Hkv, Nq, Nr, D, bits, group, CHANNEL_AXIS, seed=2, fmt=fmt)
    assert k[2].shape[-1] == 0
    meta = [bits, group, CHANNEL_AXIS, Nq, fmt]
    q = torch.randn(B, Hq, L, D)
    T = Nq + Nr
    args = (q, *k, *v, meta, meta, None, 0.0, False, None, False)
    torch.library.opcheck(ops.attention, args)
    rep = Hq // Hkv
    Kr, Vr = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
    torch.testing.assert_close(ops.attention(*args), F.scaled_dot_product_attention(q, Kr, Vr))
    torch.library.opcheck(ops.qk, (q, *k, meta))
    torch.testing.assert_close(ops.qk(q, *k, meta), q @ Kr.transpose(-1, -2))
    p = torch.softmax(torch.randn(B, Hq, L, T), -1)
    torch.library.opcheck(ops.pv, (p, *v, meta))
    torch.testing.assert_close(ops.pv(p, *v, meta), p @ Vr)
    torch.library.opcheck(ops.dequantize, (*k, meta))
    torch.testing.assert_close(ops.dequantize(*k, meta), K, atol=0, rtol=0)


@pytest.mark.parametrize("method, bits, group", SYMMETRIC)
def test_symmetric_format_quantize_and_compact(method, bits, group):
    fmt = FMT[method]
    x = torch.randn(2, 2, 5, 8)
    torch.library.opcheck(ops.quantize, (x, bits, group, CHANNEL_AXIS, fmt))
    c, s, m = ops.quantize(x, bits, group, CHANNEL_AXIS, fmt)
    assert c.shape[-1] == 8 * bits // 8 and s.shape[-1] == 8 // group and m.shape[-1] == 0
    # residual 2: 3 of the 5 residual tokens leave it, written after the 4 already held
    (c, s, m, r), full = _packed(2, 2, 4, 5, 8, bits, group, CHANNEL_AXIS, fmt=fmt)
    c, s, m = ops.grow(c, s, m, 4, 16, group, CHANNEL_AXIS)
    args = (c, s, m, r, 4, method.split("-")[0], bits, group, CHANNEL_AXIS, 2, fmt)
    torch.library.opcheck(ops.compact_, tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args))
    r2 = ops.compact_(*args)
    assert r2.shape[2] - ref.PAD == 2
    want = ref.quantize(ref.unpad(r)[:, :, :3], bits, group, CHANNEL_AXIS, fmt)
    for got, w in zip((c, s, m), want):
        assert torch.equal(got[:, :, ref.PAD + 4:ref.PAD + 7], w)
    deq = ops.dequantize(c, s, m, r2, [bits, group, CHANNEL_AXIS, 7, fmt])
    torch.testing.assert_close(deq[:, :, :4], full[:, :, :4], atol=0, rtol=0)
    torch.testing.assert_close(deq[:, :, 7:], ref.unpad(r)[:, :, 3:], atol=0, rtol=0)


def test_which_formats_take_the_triton_kernels(monkeypatch):
    """The kernels know every storage format (NFH in the Hadamard basis); KVCOMPILE_KERNELS=torch
    and unknown formats take the reference."""
    monkeypatch.setenv("KVCOMPILE_KERNELS", "triton")
    t = torch.zeros(1)
    assert ops.use_triton(t) and ops.use_triton(t, KIVI, KIVI)
    for fmt in (FORMATS["nqkv"], NFH, FORMATS["int8"], FORMATS["fp8"]):
        assert ops.use_triton(t, fmt) and ops.use_triton(t, KIVI, fmt)
    assert not ops.use_triton(t, 9)
    monkeypatch.setenv("KVCOMPILE_KERNELS", "torch")
    assert not ops.use_triton(t, KIVI)
