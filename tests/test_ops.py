"""Every kvquant:: op against its fake and the dispatcher (torch.library.opcheck), and the ops
against the plain full-precision computation they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvcompile import ops
from kvcompile.kernels import reference as ref
from kvcompile.methods import CHANNEL_AXIS, TOKEN_AXIS


def _packed(B, H, Nq, Nr, D, bits, group, axis, dtype=torch.float32, seed=0):
    """Padded (codes, scale, mn, res) holding Nq quantized and Nr residual tokens, and the cache they mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, Nq + Nr, D, generator=g).to(dtype)
    c, s, m = ref.quantize(x[:, :, :Nq], bits, group, axis)
    inner = tuple(ref.pad(t) for t in (c, s, m, x[:, :, Nq:]))
    return inner, ref.full_padded(*inner, bits, group, axis)


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
    km, vm = [2, 4, TOKEN_AXIS], [4, 4, CHANNEL_AXIS]
    T = Nq + Nr
    mask = torch.randn(B, 1, L, T)
    args = (q, *k, *v, km, vm, mask, 0.0, False, 0.3)
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
def test_compact(axis, Nr, expect_n):
    (c, s, m, r), full = _packed(2, 2, 8, Nr, 8, 2, 4, axis)
    args = (c, s, m, r, "kivi", 2, 4, axis, 8)
    torch.library.opcheck(ops.compact, args)
    c2, s2, m2, r2 = ops.compact(*args)
    assert c2.shape[2] - ref.PAD == 8 + expect_n and r2.shape[2] - ref.PAD == Nr - expect_n
    # the tokens that left the residual are now quantized exactly as the reference quantizer does
    want = ref.quantize(ref.unpad(r)[:, :, :expect_n], 2, 4, axis)
    got = (ref.unpad(c2)[:, :, 8:], ref.unpad(s2)[:, :, s.shape[2] - ref.PAD:], ref.unpad(m2)[:, :, m.shape[2] - ref.PAD:])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(ref.unpad(r2), ref.unpad(r)[:, :, expect_n:])


def test_append_and_quantize():
    res, new = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 1, 8)
    torch.library.opcheck(ops.append, (res, new))
    assert torch.equal(ops.append(res, new), torch.cat([res, new], 2))
    torch.library.opcheck(ops.quantize, (torch.randn(1, 2, 8, 8), 2, 4, TOKEN_AXIS))
    torch.library.opcheck(ops.quantize, (torch.randn(1, 2, 3, 8), 4, 4, CHANNEL_AXIS))
