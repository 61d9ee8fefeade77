"""The reference KIVI quantizer, bit for bit against a plain per-group loop written from the semantics
(methods/kivi.py)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import lay
from kvcompile.kernels import reference as ref
from kvcompile.layout import CHANNEL_AXIS, TOKEN_AXIS
from strategies import BITS, channel_groups, token_groups

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def plain_quantize(x: torch.Tensor, bits: int, group: int, axis: int):
    """One group at a time: mn = min, scale = (max - mn) / (2^b - 1) stored in x.dtype,
    code = clamp(floor((x - mn) / scale + 0.5), 0, 2^b - 1), 0 for a constant group."""
    B, H, N, D = x.shape
    qmax = 2 ** bits - 1
    codes = torch.zeros(B, H, N, D, dtype=torch.int64)
    sshape = (B, H, N // group, D) if axis == 2 else (B, H, N, D // group)
    scale, mn = torch.zeros(sshape, dtype=x.dtype), torch.zeros(sshape, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(sshape[2]):
                for j in range(sshape[3]):
                    if axis == 2:
                        sl = (b, h, slice(i * group, (i + 1) * group), j)
                    else:
                        sl = (b, h, i, slice(j * group, (j + 1) * group))
                    g = x[sl].float()
                    lo = g.min()
                    s = ((g.max() - lo) / qmax).to(x.dtype)
                    scale[b, h, i, j], mn[b, h, i, j] = s, lo.to(x.dtype)
                    if s.float() > 0:
                        codes[sl] = torch.floor((g - lo) / s.float() + 0.5).clamp(0, qmax).long()
    per = 8 // bits
    packed = torch.zeros(B, H, N, D // per, dtype=torch.int64)
    for k in range(per):  # low bits first
        packed |= codes[..., k::per] << (bits * k)
    return packed.to(torch.uint8), scale, mn, codes


def _check(x, bits, group, axis):
    layout = lay("kivi", bits, group, axis)
    codes, scale, mn = ref.quantize(x, layout)
    p_codes, p_scale, p_mn, q = plain_quantize(x, bits, group, axis)
    torch.testing.assert_close(codes, p_codes, atol=0, rtol=0)
    torch.testing.assert_close(scale, p_scale, atol=0, rtol=0)
    torch.testing.assert_close(mn, p_mn, atol=0, rtol=0)
    assert torch.equal(ref.unpack(codes, bits).long(), q)
    # dequantization: code * scale + mn, and within half a step (plus rounding of the stored scale)
    deq = ref.dequantize(codes, scale, mn, layout, x.shape[-1])
    g, rd = ref._grouped(x.float(), layout)
    s = ref._grouped(torch.ones_like(x, dtype=torch.float32), layout)[0] * scale.float().unsqueeze(rd)
    step = ref._grouped(deq.float(), layout)[0] - g
    tol = (s * 0.5 + s * 2 ** bits * 1e-2 + 1e-6).abs()
    assert bool((step.abs() <= tol).all())


@given(token_groups(), BITS, DTYPES, st.integers(0, 2 ** 31 - 1))
def test_key_quantizer_bit_exact(shape, bits, dtype, seed):
    B, H, N, D, group = shape
    x = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    _check(x, bits, group, TOKEN_AXIS)


@given(channel_groups(), BITS, DTYPES, st.integers(0, 2 ** 31 - 1))
def test_value_quantizer_bit_exact(shape, bits, dtype, seed):
    B, H, N, D, group = shape
    x = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    _check(x, bits, group, CHANNEL_AXIS)


def test_constant_group_dequantizes_to_min_exactly():
    x = torch.full((1, 2, 4, 8), 0.3)
    x[:, 1] = -1.7
    for axis in (TOKEN_AXIS, CHANNEL_AXIS):
        codes, scale, mn = ref.quantize(x, lay("kivi", 2, 4, axis))
        assert bool((scale == 0).all()) and bool((codes == 0).all())
        assert torch.equal(ref.dequantize(codes, scale, mn, lay("kivi", 2, 4, axis), 8), x)


@given(BITS, st.integers(1, 4), st.integers(0, 2 ** 31 - 1))
def test_pack_roundtrip(bits, rows, seed):
    per = 8 // bits
    q = torch.randint(0, 2 ** bits, (rows, 3, per * 5), generator=torch.Generator().manual_seed(seed))
    packed = ref.pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 5  # per * 5 codes in 5 bytes
    assert torch.equal(ref.unpack(packed, bits).long(), q)


@given(st.integers(1, 4), st.integers(0, 2 ** 31 - 1))
def test_pack_3bit_roundtrip(words, seed):
    q = torch.randint(0, 8, (2, 3, 8 * words), generator=torch.Generator().manual_seed(seed))
    packed = ref.pack(q, 3)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 3 * words  # 8 codes in 3 bytes
    assert torch.equal(ref.unpack(packed, 3).long(), q)


def test_pack_3bit_layout():
    """Code i occupies bits 3i..3i+2 of a little-endian 24-bit word."""
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    word = sum(c << (3 * i) for i, c in enumerate(codes[0].tolist()))
    assert ref.pack(codes, 3)[0].tolist() == [word & 0xFF, word >> 8 & 0xFF, word >> 16]


def test_pack_is_low_bits_first():
    assert ref.pack(torch.tensor([[1, 2, 3, 0]]), 2).item() == 1 | 2 << 2 | 3 << 4
    assert ref.pack(torch.tensor([[5, 10]]), 4).item() == 5 | 10 << 4
