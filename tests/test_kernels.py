"""Triton kernels against their torch twins (kernels/reference.py), on the CPU under the interpreter.

- quantize: bit for bit (atol=0, rtol=0) against reference.quantize, also appending in place.
- attention / qk / pv: against a float64 oracle (dequantize in float64, plain softmax attention);
  the kernel's error may be at most ~2x that of the reference implementation in the same dtype,
  plus a small absolute floor (FlashAttention's test habit).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, assert_exact, lay, packed
from kvcompile.kernels import reference as ref
from kvcompile.kernels import triton_attention as ta
from kvcompile.kernels import triton_quantize as tq
from kvcompile.layout import CHANNEL_AXIS, PAD, TOKEN_AXIS, Layout, Packed
from kvcompile.methods import FORMATS

if DEVICE == "cpu" and type(tq._quantize_tokens_kernel).__name__ != "InterpretedFunction":
    # @triton.jit picks the interpreter when the kernel module is imported
    raise RuntimeError("no GPU, and kvcompile's Triton kernels were imported without TRITON_INTERPRET=1 "
                       "(tests/conftest.py sets it before anything imports triton)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# floor added to 2x the reference's own error, relative to the oracle's largest magnitude where that is above 1:
# the reference's own error depends on the BLAS and the CPU it runs on (a float32 dot product's rounding grows
# with its terms': fp8 scores of ~270 measured 6.3e-5 from float64 on an AMD EPYC, and the interpreted Triton
# qk 1.6e-4, beyond 2x that + 1e-5), while a wrong decode is off by the values' own size
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def assert_error_within(out: torch.Tensor, ref_out: torch.Tensor, oracle: torch.Tensor, name: str) -> None:
    """|out - oracle| <= 2 |ref_out - oracle|_max + floor, elementwise; report the first offender."""
    assert out.shape == oracle.shape, f"{name}: shape {list(out.shape)} != {list(oracle.shape)}"
    assert out.dtype == ref_out.dtype, f"{name}: dtype {out.dtype} != {ref_out.dtype}"
    err = (out.double() - oracle).abs()
    ref_err = (ref_out.double() - oracle).abs().max().item()
    floor = FLOOR[out.dtype] * max(1.0, oracle.abs().max().item())
    tol = 2 * ref_err + floor
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements beyond {tol:.3g} (2 x reference error "
            f"{ref_err:.3g} + {floor:.3g}); max error {err.max().item():.3g}; first at {idx}: "
            f"got {out[idx].item()}, float64 {oracle[idx].item()}, reference {ref_out[idx].item()}"
        )


def cache64(p: Packed, hq: int) -> torch.Tensor:
    """The cache p stands for, its scales, minimums and residual in float64, heads repeated to hq."""
    return ref.repeat_heads(ref.full(p._replace(scale=p.scale.double(), mn=p.mn.double(), res=p.res.double())), hq)


def oracle_attention(q, k: Packed, v: Packed, attn_mask=None, is_causal=False, scale=None):
    """Dequantize in float64, then softmax attention in float64."""
    hq = q.shape[1]
    K, V = cache64(k, hq), cache64(v, hq)  # (B, Hq, T, D)
    s = q.double() @ K.transpose(2, 3) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, Hq, L, T)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    if is_causal:
        L, T = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, T, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ V


def padding_mask(B: int, Hq: int, L: int, T: int, kind: str, dtype, gen: torch.Generator):
    """Left padding as transformers builds it: batch row b masks its first pad_b keys (never all)."""
    if kind == "none":
        return None
    if kind == "additive_full":  # a general additive mask, one value per (b, h, i, j)
        return torch.randn(B, Hq, L, T, generator=gen).to(dtype).to(DEVICE)
    pads = torch.randint(0, T, (B,), generator=gen)
    pads[0] = 0
    keep = torch.arange(T)[None, :] >= pads[:, None]  # (B, T)
    keep = keep[:, None, None, :].expand(B, 1, L, T)  # (B, 1, L, T)
    if kind == "bool":
        return keep.clone().to(DEVICE)
    return torch.zeros(B, 1, L, T, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).to(DEVICE)


# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------


@st.composite
def quant_case(draw):
    """(shape, layout, dtype, memory, magnitude, seed) for the KIVI quantizer, valid by construction:
    N % G == 0 on the token axis; G | D on the channel axis (a group need not be whole bytes); per | D."""
    bits = draw(st.sampled_from([2, 4]))
    per = 8 // bits
    axis = draw(st.sampled_from([TOKEN_AXIS, CHANNEL_AXIS]))
    if axis == TOKEN_AXIS:
        group = draw(st.sampled_from([1, 2, 3, 4, 8, 32]))
        n = group * draw(st.integers(1, 3))
        d = per * draw(st.sampled_from([1, 2, 3, 4, 16]))
    else:
        group = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32]))  # 3, 6: groups straddling bytes
        d = math.lcm(group, per) * draw(st.integers(1, 3))
        n = draw(st.integers(1, 9))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), n, d)
    memory = draw(st.sampled_from(["contiguous", "slice", "transposed"]))
    return (shape, lay("kivi", bits, group, axis), draw(st.sampled_from(DTYPES)), memory,
            draw(st.sampled_from([1e-3, 1.0, 300.0])), draw(st.integers(0, 2**31 - 1)))


def make_x(shape, dtype, memory, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, N, D = shape
    if memory == "slice":  # rows of a larger buffer, as the residual's oldest tokens are
        x = (torch.randn(B, H, N + 5, D, generator=gen) * magnitude).to(dtype).to(DEVICE)[:, :, 3:3 + N]
    elif memory == "transposed":  # (B, N, H, D) memory, as a model's projection output
        x = (torch.randn(B, N, H, D, generator=gen) * magnitude).to(dtype).to(DEVICE).transpose(1, 2)
    else:
        x = (torch.randn(B, H, N, D, generator=gen) * magnitude).to(dtype).to(DEVICE)
    x[0, 0] = 0.5  # a constant token: its channel groups have scale 0
    return x


def check_quantize(x, layout: Layout):
    expected = ref.quantize(x, layout)
    got = tq.quantize(x, layout)
    for g, e, name in zip(got, expected, ("codes", "scale", "mn")):
        assert_exact(g, e, f"{name} ({layout}, {x.dtype}, {list(x.shape)})")
        assert g.is_contiguous()


@given(quant_case())
def test_quantize_bit_exact(case):
    shape, layout, dtype, memory, magnitude, seed = case
    check_quantize(make_x(shape, dtype, memory, magnitude, seed), layout)


@given(quant_case(), st.integers(0, 2), st.integers(0, 3))
def test_quantize_append_in_place(case, old_groups, spare):
    """Appending N tokens into preallocated padded storage that already holds nq tokens equals
    quantizing everything at once; the rows before and after are untouched."""
    shape, layout, dtype, memory, magnitude, seed = case
    x = make_x(shape, dtype, memory, magnitude, seed)
    B, H, N, D = shape
    nq = old_groups * layout.drop_quantum * (1 if layout.axis == TOKEN_AXIS else 3)
    old = make_x((B, H, nq, D), dtype, "contiguous", magnitude, seed + 1) if nq else x[:, :, :0]
    c0, s0, m0 = (ref.pad(t) for t in ref.quantize(old, layout))
    cap = nq + N + spare * layout.drop_quantum  # room for more tokens
    codes = torch.full((B, H, PAD + cap, c0.shape[3]), 0xAB, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((B, H, PAD + layout.scale_rows(cap), s0.shape[3]), 7.0, dtype=dtype, device=DEVICE)
    mn = scale.clone()
    sq = PAD + layout.scale_rows(nq)
    codes[:, :, :PAD + nq], scale[:, :, :sq], mn[:, :, :sq] = c0, s0, m0
    before = (codes.clone(), scale.clone(), mn.clone())

    got = tq.quantize(x, layout, out=(codes, scale, mn), row=PAD + nq, scale_row=sq)
    assert got[0] is codes and got[1] is scale and got[2] is mn

    expected = ref.quantize(torch.cat([old, x], dim=2), layout)
    end = (PAD + nq + N, PAD + layout.scale_rows(nq + N), PAD + layout.scale_rows(nq + N))
    for t, b, e, stop, name in zip((codes, scale, mn), before, expected, end, ("codes", "scale", "mn")):
        assert_exact(t[:, :, PAD:stop], e, f"appended {name}")
        assert_exact(t[:, :, :PAD], b[:, :, :PAD], f"{name} pad rows")
        assert_exact(t[:, :, stop:], b[:, :, stop:], f"{name} spare rows")


def test_quantize_default_scale_row():
    """Without scale_row, TOKEN_AXIS writes scale rows from row // group (unpadded storage)."""
    layout = lay("kivi", 2, 4, TOKEN_AXIS)
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    codes = torch.zeros(1, 2, 16, 4, dtype=torch.uint8, device=DEVICE)
    scale, mn = torch.zeros(1, 2, 4, 16, device=DEVICE), torch.zeros(1, 2, 4, 16, device=DEVICE)
    tq.quantize(x, layout, out=(codes, scale, mn), row=8)
    c, s, m = ref.quantize(x, layout)
    assert_exact(codes[:, :, 8:], c, "codes")
    assert_exact(scale[:, :, 2:], s, "scale")
    assert_exact(mn[:, :, 2:], m, "mn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,bits,group,axis",
    [
        ((1, 1, 32, 128), 2, 32, TOKEN_AXIS),  # KIVI keys, head_dim 128
        ((2, 3, 64, 64), 4, 32, TOKEN_AXIS),  # two groups of 32 tokens
        ((1, 2, 5, 128), 2, 32, CHANNEL_AXIS),  # KIVI values, odd token count
        ((2, 1, 3, 80), 4, 80, CHANNEL_AXIS),  # a group of a whole non-power-of-two head_dim
        ((1, 2, 7, 12), 2, 2, CHANNEL_AXIS),  # groups narrower than a byte
        ((2, 1, 3, 24), 2, 6, CHANNEL_AXIS),  # groups straddling bytes
        ((1, 1, 6, 12), 4, 3, TOKEN_AXIS),  # non-power-of-two token group
        ((1, 1, 256, 16), 2, 256, TOKEN_AXIS),  # a group longer than one register tile
    ],
)
def test_quantize_regression(shape, bits, group, axis, dtype):
    check_quantize(make_x(shape, dtype, "contiguous", 1.0, 0), lay("kivi", bits, group, axis))


def test_quantize_rejects_bad_arguments():
    x = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="divide the token count"):
        tq.quantize(x, lay("kivi", 2, 3, TOKEN_AXIS))
    with pytest.raises(ValueError, match="out codes"):
        tq.quantize(x, lay("kivi", 2, 4, TOKEN_AXIS), out=(
            torch.zeros(1, 1, 4, 4, dtype=torch.uint8, device=DEVICE), torch.zeros(1, 1, 2, 16, device=DEVICE),
            torch.zeros(1, 1, 2, 16, device=DEVICE)))
    with pytest.raises(ValueError, match="out scale"):
        tq.quantize(x[:, :, :2], lay("nf", 4, 16), out=(
            torch.zeros(1, 1, 2, 8, dtype=torch.uint8, device=DEVICE), torch.zeros(1, 1, 2, 2, device=DEVICE),
            torch.zeros(1, 1, 2, 0, device=DEVICE)))


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def run_attention(B, Hkv, gq, L, D, k_layout, v_layout, nq_k, nr_k, nq_v, dtype, mask_kind="none", is_causal=False,
                  scale=None, num_splits=None, block_n=16, seed=0, dv=None, spare=0, skip_k=0, skip_v=0):
    """The kernel against the reference and a float64 oracle; the packed storage has `spare` garbage
    rows after its tokens (preallocated capacity) that no read may touch, and its first skip_k / skip_v
    rows dropped by a sliding window (of the nq_k / nq_v rows)."""
    gen = torch.Generator().manual_seed(seed)
    T = nq_k - skip_k + nr_k
    dv = D if dv is None else dv
    k = packed(B, Hkv, nq_k, nr_k, D, k_layout, dtype, gen=gen, spare=spare, device=DEVICE)._replace(skip=skip_k)
    v = packed(B, Hkv, nq_v, T - nq_v + skip_v, dv, v_layout, dtype, gen=gen, spare=spare,
               device=DEVICE)._replace(skip=skip_v)
    q = torch.randn(B, Hkv * gq, L, D, generator=gen).to(dtype).to(DEVICE)
    mask = padding_mask(B, Hkv * gq, L, T, mask_kind, dtype, gen)
    kw = dict(attn_mask=mask, is_causal=is_causal, scale=scale)
    out = ta.attention(q, k, v, **kw, num_splits=num_splits, block_n=block_n)
    assert out.is_contiguous() and out.shape == (B, Hkv * gq, L, dv)
    name = (f"attention B={B} Hkv={Hkv} gq={gq} L={L} D={D} T={T} k={k_layout} nq_k={nq_k} v={v_layout} "
            f"nq_v={nq_v} {dtype} mask={mask_kind} causal={is_causal} splits={num_splits} block_n={block_n} "
            f"spare={spare} skip={skip_k},{skip_v}")
    assert_error_within(out, ref.attention(q, k, v, **kw), oracle_attention(q, k, v, **kw), name)


def _cache_layout(draw, axis):
    fmt = draw(st.sampled_from(["kivi", "kivi", "none"]))
    if fmt == "none":
        return lay("none", 16, 1, axis)
    # token groups of 16 / 32 hold whole tiles of 16 / 32 tokens: the kernel's one-scale-row path
    group = draw(st.sampled_from([2, 4, 8, 16, 32] if axis == TOKEN_AXIS else [4, 8, 16]))
    return lay("kivi", draw(st.sampled_from([2, 4])), group, axis)


@st.composite
def attention_case(draw):
    """A decode/short-prefill attention case valid by construction (KV heads divide query heads,
    token groups whole, K and V holding the same T with their own nq)."""
    D = draw(st.sampled_from([16, 64]))
    k_layout = _cache_layout(draw, draw(st.sampled_from([TOKEN_AXIS] * 3 + [CHANNEL_AXIS])))
    v_layout = _cache_layout(draw, draw(st.sampled_from([CHANNEL_AXIS] * 3 + [TOKEN_AXIS])))
    nq_k = k_layout.drop_quantum * draw(st.integers(0, max(1, 32 // k_layout.drop_quantum)))
    nr_k = draw(st.integers(0 if nq_k else 1, 17))
    T = nq_k + nr_k
    nq_v = v_layout.drop_quantum * draw(st.integers(0, T // v_layout.drop_quantum))
    mask_kind = draw(st.sampled_from(["none", "bool", "additive", "additive_full", "causal"]))
    return dict(
        B=draw(st.integers(1, 2)), Hkv=draw(st.integers(1, 2)), gq=draw(st.sampled_from([1, 3, 8])),
        L=draw(st.sampled_from([1, 2, 4])), D=D, k_layout=k_layout, v_layout=v_layout, nq_k=nq_k, nr_k=nr_k,
        nq_v=nq_v, dtype=draw(st.sampled_from(DTYPES)), mask_kind="none" if mask_kind == "causal" else mask_kind,
        is_causal=mask_kind == "causal", scale=draw(st.sampled_from([None, 0.2])),
        num_splits=draw(st.sampled_from([None, 1, 2, 3])), block_n=draw(st.sampled_from([16, 32])),
        seed=draw(st.integers(0, 2**31 - 1)), spare=draw(st.sampled_from([0, 0, 5])),
    )


@given(attention_case())
def test_attention_matches_float64(case):
    run_attention(**case)


KIVI_K = lay("kivi", 2, 4, TOKEN_AXIS)
KIVI_V = lay("kivi", 2, 8, CHANNEL_AXIS)


@pytest.mark.parametrize("block_n", [16, None])  # None: the launcher's default tile
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,Hkv,gq,L,D,k_layout,v_layout,nq_k,nr_k,nq_v,mask_kind,num_splits",
    [
        (1, 1, 1, 1, 16, KIVI_K, KIVI_V, 0, 1, 0, "none", None),  # T=1: nq=0, Nr=1
        (1, 2, 3, 1, 16, KIVI_K, KIVI_V, 32, 0, 24, "none", 2),  # Nr_k=0: keys all quantized
        (2, 2, 3, 1, 64, KIVI_K, KIVI_V, 16, 5, 11, "bool", 2),  # SmolLM2-like GQA 3, padding mask
        (2, 1, 8, 1, 16, KIVI_K, KIVI_V, 36, 1, 21, "additive", 3),  # GQA 8, T=37 odd
        (1, 2, 8, 4, 16, lay("kivi", 4, 8, TOKEN_AXIS), lay("kivi", 4, 16, CHANNEL_AXIS), 24, 9, 30, "none", 2),
        (1, 1, 8, 16, 16, KIVI_K, KIVI_V, 16, 8, 4, "causal", None),  # 128 rows: two M blocks
        (2, 2, 1, 2, 16, lay("none", 16, 1, TOKEN_AXIS), lay("none", 16, 1), 0, 19, 0, "bool", 2),  # residual only
        (1, 1, 2, 1, 8, KIVI_K, lay("kivi", 4, 4, CHANNEL_AXIS), 8, 3, 7, "none", None),  # head_dim 8: padded tile
        (1, 1, 3, 2, 24, lay("kivi", 4, 4, CHANNEL_AXIS), lay("kivi", 2, 4, TOKEN_AXIS), 12, 5, 16, "none", 2),
        (1, 2, 4, 1, 64, lay("kivi", 2, 32, TOKEN_AXIS), lay("kivi", 2, 32), 64, 7, 43, "bool", 2),  # KIVI defaults
        (2, 1, 4, 1, 64, lay("kivi", 4, 32, TOKEN_AXIS), lay("kivi", 4, 16, TOKEN_AXIS), 96, 33, 128, "additive",
         None),  # token-axis values too
    ],
)
def test_attention_regression(B, Hkv, gq, L, D, k_layout, v_layout, nq_k, nr_k, nq_v, mask_kind, num_splits, dtype,
                              block_n):
    run_attention(B, Hkv, gq, L, D, k_layout, v_layout, nq_k, nr_k, nq_v, dtype,
                  mask_kind="none" if mask_kind == "causal" else mask_kind, is_causal=mask_kind == "causal",
                  num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_spare_capacity(dtype):
    """Packed storage preallocated past its nq tokens: the garbage rows are never read."""
    run_attention(2, 2, 3, 1, 64, lay("kivi", 2, 32, TOKEN_AXIS), lay("kivi", 2, 32), 64, 9, 45, dtype,
                  mask_kind="bool", spare=40, num_splits=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_layout,v_layout,nq_k,skip_k,nq_v,skip_v", [
    (KIVI_K, KIVI_V, 32, 5, 30, 9),  # kivi: the first kept key inside a token group (start 1), values per token
    (KIVI_K, KIVI_V, 32, 8, 20, 0),  # a whole group dropped (start 0: the one-scale-row path)
    (lay("kivi", 2, 16, TOKEN_AXIS), lay("kivi", 4, 8, TOKEN_AXIS), 48, 19, 40, 13),  # both by token groups
    (lay("int8", 8, 16, CHANNEL_AXIS), lay("int8", 8, 16, CHANNEL_AXIS), 40, 17, 40, 17),
])
def test_attention_skips_a_windows_dropped_rows(k_layout, v_layout, nq_k, skip_k, nq_v, skip_v, dtype):
    """A sliding window's state: the first packed rows dropped (Packed.skip), read from the kept ones on."""
    run_attention(2, 2, 3, 1, 16, k_layout, v_layout, nq_k, 6, nq_v, dtype, mask_kind="bool", num_splits=2,
                  skip_k=skip_k, skip_v=skip_v, spare=3)
    gen = torch.Generator().manual_seed(3)
    k = packed(1, 2, nq_k, 6, 16, k_layout, dtype, gen=gen, device=DEVICE)._replace(skip=skip_k)
    q = torch.randn(1, 4, 2, 16, generator=gen).to(dtype).to(DEVICE)
    assert_error_within(ta.qk(q, k), ref.qk(q, k), q.double() @ cache64(k, 4).transpose(2, 3), "qk with skip")
    T = nq_k - skip_k + 6
    v = packed(1, 2, nq_v, T - nq_v + skip_v, 16, v_layout, dtype, gen=gen, device=DEVICE)._replace(skip=skip_v)
    p = torch.softmax(torch.randn(1, 4, 2, T, generator=gen), dim=-1).to(dtype).to(DEVICE)
    assert_error_within(ta.pv(p, v, num_splits=2), ref.pv(p, v), p.double() @ cache64(v, 4), "pv with skip")


def test_attention_value_head_dim_differs():
    run_attention(1, 2, 2, 1, 16, KIVI_K, KIVI_V, 8, 3, 5, torch.float32, dv=32, num_splits=2)


def _kv(seed, Hkv=2, nk=(64, 7), nv=(40, 31)):
    gen = torch.Generator().manual_seed(seed)
    k = packed(1, Hkv, *nk, 16, KIVI_K, gen=gen, device=DEVICE)
    v = packed(1, Hkv, *nv, 16, KIVI_V, gen=gen, device=DEVICE)
    return k, v, gen


def test_attention_splits_agree():
    """Every split count gives the same result up to float32 reassociation."""
    k, v, gen = _kv(1)
    q = torch.randn(1, 6, 1, 16, generator=gen).to(DEVICE)
    outs = [ta.attention(q, k, v, num_splits=s, block_n=16) for s in (1, 2, 3, 5, 100)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ta.attention(q, k, v), outs[0], atol=1e-6, rtol=1e-5)


def test_attention_fully_masked_row_is_zero():
    """As torch's SDPA: a query row that may attend to no key gives 0, not NaN."""
    k, v, gen = _kv(2, Hkv=1, nk=(8, 3), nv=(4, 7))
    q = torch.randn(1, 2, 2, 16, generator=gen).to(DEVICE)
    mask = torch.ones(1, 1, 2, 11, dtype=torch.bool, device=DEVICE)
    mask[..., 1, :] = False
    out = ta.attention(q, k, v, attn_mask=mask, num_splits=2, block_n=16)
    torch.testing.assert_close(out, ref.attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-5)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_attention_row_masked_by_finite_minimum():
    """transformers masks with finfo.min, not -inf: a row masked everywhere then averages the
    values (softmax of equal finite logits), as SDPA does; the kernel must not overflow to 0."""
    k, v, gen = _kv(4, Hkv=1, nk=(8, 3), nv=(4, 7))
    q = torch.randn(1, 2, 2, 16, generator=gen).to(DEVICE)
    mask = torch.zeros(1, 1, 2, 11, device=DEVICE)
    mask[..., 1, :] = torch.finfo(torch.float32).min
    mask[..., 0, :4] = torch.finfo(torch.float32).min
    out = ta.attention(q, k, v, attn_mask=mask, num_splits=2, block_n=16)
    torch.testing.assert_close(out, ref.attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_arguments():
    k, v, gen = _kv(3, nk=(8, 3), nv=(4, 7))
    q = torch.randn(1, 6, 1, 16, generator=gen).to(DEVICE)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        ta.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="is_causal"):
        ta.attention(q, k, v, attn_mask=torch.ones(1, 11, dtype=torch.bool, device=DEVICE), is_causal=True)
    with pytest.raises(ValueError, match="must divide the query heads"):
        ta.attention(torch.randn(1, 5, 1, 16, device=DEVICE), k, v)
    with pytest.raises(ValueError, match="tokens"):
        ta.attention(q, k, packed(1, 2, 4, 6, 16, KIVI_V, gen=gen, device=DEVICE))
    with pytest.raises(ValueError, match="inconsistent packed cache"):
        ta.attention(q, k._replace(layout=lay("kivi", 4, 4, TOKEN_AXIS)), v)  # 4-bit layout on 2-bit codes
    with pytest.raises(ValueError, match="broadcast"):
        ta.attention(q, k, v, attn_mask=torch.zeros(1, 1, 1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="same dtype"):
        ta.attention(q.half(), k, v)


# ----------------------------------------------------------------------------------------------
# qk / pv (eager attention's matmuls)
# ----------------------------------------------------------------------------------------------


@given(attention_case())
def test_qk_pv_match_float64(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, Hkv, gq, L, D, dtype, spare = (case[n] for n in ("B", "Hkv", "gq", "L", "D", "dtype", "spare"))
    T = case["nq_k"] + case["nr_k"]
    k = packed(B, Hkv, case["nq_k"], case["nr_k"], D, case["k_layout"], dtype, gen=gen, spare=spare, device=DEVICE)
    v = packed(B, Hkv, case["nq_v"], T - case["nq_v"], D, case["v_layout"], dtype, gen=gen, spare=spare,
               device=DEVICE)
    hq = Hkv * gq
    q = torch.randn(B, hq, L, D, generator=gen).to(dtype).to(DEVICE)
    # -- scores --
    s = ta.qk(q, k, block_n=case["block_n"])
    assert_error_within(s, ref.qk(q, k), q.double() @ cache64(k, hq).transpose(2, 3), f"qk {case}")
    # -- probabilities times values --
    p = torch.softmax(torch.randn(B, hq, L, T, generator=gen), dim=-1).to(dtype).to(DEVICE)
    o = ta.pv(p, v, num_splits=case["num_splits"], block_n=case["block_n"])
    assert_error_within(o, ref.pv(p, v), p.double() @ cache64(v, hq), f"pv {case}")


# ----------------------------------------------------------------------------------------------
# the per-token formats (nqkv's NF and NFH, int8, fp8): codes read by the same kernels
# ----------------------------------------------------------------------------------------------

# (format, bits, group) with head_dim 16 or 64; group None: head_dim (int8 / fp8 scale each token)
SYMMETRIC = [("nf", 4, 16), ("nf", 3, 8), ("nf", 2, 64), ("int8", 8, None), ("fp8", 8, None)]
# NFH is read as NF in the Hadamard basis (q, residuals and output transformed by torch): not exact
HADAMARD = [("nfh", 4, 16), ("nfh", 3, 64), ("nfh", 2, 8)]


def packed_symmetric(B, H, nq, nr, D, fmt, bits, group, dtype, gen):
    """A Packed of nq tokens in a per-token format + nr residual tokens; token magnitudes spread over 3
    decades, one zero token."""
    p = packed(B, H, nq, nr, D, lay(fmt, bits, D if group is None else min(group, D)), dtype, gen=gen,
               device=DEVICE, spread=3.0, first=0.0)
    return p


@pytest.mark.parametrize("fmt, bits, group", SYMMETRIC)
def test_symmetric_dequantization_is_exact(fmt, bits, group):
    """q one-hot rows (float32, IEEE products): qk returns the dequantized keys themselves, so the
    kernel's unpacking (3-bit words too) and level / int8 / e4m3 decoding must equal the reference's."""
    gen = torch.Generator().manual_seed(bits + 10 * len(fmt))
    D = 64 if group == 64 else 16
    k = packed_symmetric(2, 2, 37, 3, D, fmt, bits, group, torch.float32, gen)
    q = torch.eye(D, device=DEVICE).expand(2, 2, D, D).contiguous()  # L = D queries, query i picks channel i
    assert_exact(ta.qk(q, k, block_n=16), ref.full(k).transpose(2, 3), f"qk one-hot {fmt} bits={bits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt, bits, group", SYMMETRIC + HADAMARD)
def test_symmetric_attention_qk_pv_match_float64(fmt, bits, group, dtype):
    gen = torch.Generator().manual_seed(bits + len(fmt))
    B, Hkv, gq, L, D = 2, 2, 3, 1, 64
    k = packed_symmetric(B, Hkv, 40, 9, D, fmt, bits, group, dtype, gen)
    v = packed_symmetric(B, Hkv, 45, 4, D, fmt, bits, group, dtype, gen)
    hq = Hkv * gq
    q = torch.randn(B, hq, L, D, generator=gen).to(dtype).to(DEVICE)
    mask = padding_mask(B, hq, L, 49, "bool", dtype, gen)
    out = ta.attention(q, k, v, attn_mask=mask, num_splits=2, block_n=16)
    name = f"attention {fmt} bits={bits} {dtype}"
    assert_error_within(out, ref.attention(q, k, v, attn_mask=mask), oracle_attention(q, k, v, attn_mask=mask), name)
    assert_error_within(ta.qk(q, k), ref.qk(q, k), q.double() @ cache64(k, hq).transpose(2, 3), f"qk {name}")
    p = torch.softmax(torch.randn(B, hq, L, 49, generator=gen), dim=-1).to(dtype).to(DEVICE)
    assert_error_within(ta.pv(p, v, num_splits=2), ref.pv(p, v), p.double() @ cache64(v, hq), f"pv {name}")


def test_mixed_formats_in_one_attention():
    """kivi keys with nf values (one call reads two formats), GQA 8, causal over a short prefill."""
    gen = torch.Generator().manual_seed(5)
    k = packed(1, 1, 32, 5, 16, KIVI_K, torch.float16, gen=gen, device=DEVICE)
    v = packed_symmetric(1, 1, 30, 7, 16, "nf", 4, 8, torch.float16, gen)
    q = torch.randn(1, 8, 4, 16, generator=gen).to(torch.float16).to(DEVICE)
    out = ta.attention(q, k, v, is_causal=True, block_n=16)
    assert_error_within(out, ref.attention(q, k, v, is_causal=True), oracle_attention(q, k, v, is_causal=True),
                        "kivi keys, nf values")


def test_symmetric_formats_reject_inconsistent_tensors():
    gen = torch.Generator().manual_seed(6)
    k = packed_symmetric(1, 1, 8, 2, 16, "nf", 4, 16, torch.float32, gen)
    q = torch.randn(1, 1, 1, 16, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="inconsistent packed cache"):
        ta.qk(q, k._replace(layout=lay("nf", 2, 16)))  # a 2-bit layout on 4-bit codes
    with pytest.raises(ValueError, match="inconsistent packed cache"):
        ta.qk(q, k._replace(nq=20))  # more tokens than rows


# -- the per-token formats' quantizer (compact_'s write on CUDA) ---------------------------------


@st.composite
def symmetric_quantize_case(draw):
    fmt, bits, group = draw(st.sampled_from(SYMMETRIC + HADAMARD + [("nf", 4, 24), ("nf", 2, 4), ("nf", 3, 1)]))
    D = draw(st.sampled_from([d for d in (8, 16, 24, 48, 64, 80) if (group is None or d % group == 0)
                              and d % (8 if bits == 3 else 8 // bits) == 0]))
    return dict(layout=lay(fmt, bits, D if group is None else group), B=draw(st.integers(1, 2)),
                H=draw(st.integers(1, 3)), N=draw(st.integers(1, 70)), D=D, dtype=draw(st.sampled_from(DTYPES)),
                seed=draw(st.integers(0, 2**31 - 1)), row=draw(st.sampled_from([0, 2, 5])))


@given(symmetric_quantize_case())
def test_quantize_symmetric_bit_exact(case):
    """Bit for bit the reference, also written in place at a row offset into larger storage."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, H, N, D, dtype, layout = (case[k] for k in ("B", "H", "N", "D", "dtype", "layout"))
    x = (torch.randn(B, H, N, D, generator=gen) * 10 ** torch.empty(B, H, N, 1).uniform_(-3, 2, generator=gen))
    x[0, 0, 0] = 0
    x = x.to(dtype).to(DEVICE)
    want = ref.quantize(x, layout)
    for got, w, name in zip(tq.quantize(x, layout), want, ("codes", "scale", "mn")):
        assert_exact(got, w, f"{name} {case}")
    r = case["row"]
    out = (torch.full((B, H, r + N + 3, want[0].shape[3]), 7, dtype=torch.uint8, device=DEVICE),
           torch.full((B, H, r + N + 3, want[1].shape[3]), 5.0, dtype=dtype, device=DEVICE),
           torch.zeros(B, H, r + N + 3, 0, dtype=dtype, device=DEVICE))
    before = [t.clone() for t in out]
    tq.quantize(x.transpose(1, 2).contiguous().transpose(1, 2), layout, out=out, row=r)  # strided x
    for got, old, w, name in zip(out[:2], before, want, ("codes", "scale")):
        assert_exact(got[:, :, r:r + N], w, f"{name} in place {case}")
        assert torch.equal(got[:, :, :r], old[:, :, :r]) and torch.equal(got[:, :, r + N:], old[:, :, r + N:])


def test_fp8_rounding_matches_torch_everywhere():
    """Every e4m3 value, every midpoint between neighbours (ties to even), one float32 ulp either side,
    subnormals, -0 and the clamp at 448: the kernel's bit-level rounding against torch's cast. A
    token's absmax of 448 makes its scale exactly 1, so the kernel rounds these values themselves."""
    e4m3 = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).float()
    pos = e4m3[(e4m3 >= 0) & ~e4m3.isnan()].unique()
    mids = (pos[1:] + pos[:-1]) / 2
    vals = torch.cat([pos, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9)),
                      torch.tensor([1e-9, 2.0 ** -10, 3 * 2.0 ** -11, 447.9, 450.0, 1000.0])])
    vals = torch.cat([vals, -vals, torch.tensor([-0.0])])
    D = 64
    n = -(-vals.numel() // (D - 1))
    x = torch.zeros(n * (D - 1))
    x[:vals.numel()] = vals
    x = torch.cat([torch.full((n, 1), 448.0), x.reshape(n, D - 1).clamp(-448, 448)], dim=1)[None, None].to(DEVICE)
    layout = lay("fp8", 8, D)
    got, want = tq.quantize(x, layout), ref.quantize(x, layout)
    assert torch.equal(want[1], torch.ones_like(want[1]))
    assert_exact(got[0], want[0], "fp8 codes")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_ties_go_to_the_lower_level(bits):
    """Values exactly on a decision boundary (a block whose absmax is 1, so u = x) and one ulp either side."""
    from kvcompile.methods import nqkv

    m = nqkv.midpoints(bits)
    vals = torch.cat([m, m.nextafter(torch.tensor(-2.0)), m.nextafter(torch.tensor(2.0)), nqkv.levels(bits)])
    x = torch.cat([torch.ones(1), vals, torch.zeros(64 - 1 - vals.numel())])[None, None, None].to(DEVICE)
    layout = lay("nf", bits, 64)
    assert_exact(tq.quantize(x, layout)[0], ref.quantize(x, layout)[0], f"nf{bits} ties")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile every kernel variant for an H100 down to
    ptxas (scripts/compile_sm90.py), in a subprocess without TRITON_INTERPRET. No GPU needed."""
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"this triton has no bundled ptxas ({ptxas})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "compile_sm90.py")], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "compiled" in run.stdout


# ----------------------------------------------------------------------------------------------
# the CPU's compiled decode attention (kernels/cpu.py): the same oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # each layout pair and mask kind is a graph Inductor compiles to C++ (tens of seconds here)
@pytest.mark.parametrize("k_layout,v_layout,mask_kind,L", [
    (KIVI_K, KIVI_V, "bool", 1), (lay("kivi", 4, 8, TOKEN_AXIS), lay("kivi", 4, 16, CHANNEL_AXIS), "causal", 3),
    (lay("int8", 8, 16), lay("int8", 8, 16), "additive", 2), (lay("nf", 4, 16), lay("nf", 3, 8), "bool", 1),
    (lay("fp8", 8, 16), lay("fp8", 8, 16), "bool", 1), (lay("nf", 3, 8), lay("nf", 2, 8), "bool", 1),
    (lay("nfh", 4, 8), lay("nfh", 4, 8), "additive", 1),
])
def test_cpu_decode_attention_matches_float64(k_layout, v_layout, mask_kind, L):
    """Within 2x the reference's own error against float64, GQA 3, a window with dropped rows included."""
    from kvcompile.kernels import cpu

    gen = torch.Generator().manual_seed(7)
    B, Hkv, gq, D = 2, 2, 3, 16
    for skip_k, skip_v in ((0, 0), (5, 3)):
        nq_k, nr_k, nq_v = 32, 5, 24
        T = nq_k - skip_k + nr_k
        k = packed(B, Hkv, nq_k, nr_k, D, k_layout, gen=gen)._replace(skip=skip_k)
        v = packed(B, Hkv, nq_v, T - nq_v + skip_v, D, v_layout, gen=gen)._replace(skip=skip_v)
        q = torch.randn(B, Hkv * gq, L, D, generator=gen)
        mask = padding_mask(B, Hkv * gq, L, T, "none" if mask_kind == "causal" else mask_kind, torch.float32, gen)
        kw = dict(attn_mask=mask, is_causal=mask_kind == "causal")
        assert cpu.usable(q, k, v, 0.0)
        assert_error_within(cpu.attention(q, k, v, **kw), ref.attention(q, k, v, **kw), oracle_attention(q, k, v, **kw),
                            f"cpu attention {k_layout.format}/{v_layout.format} {mask_kind} L={L} skip={skip_k},{skip_v}")


@pytest.mark.slow  # a graph per layout and token count kind (static, then dynamic): seconds each
@pytest.mark.parametrize("layout,dtype", [
    (lay("kivi", 2, 32, TOKEN_AXIS), torch.float32), (lay("kivi", 4, 8, CHANNEL_AXIS), torch.bfloat16),
    (lay("kivi", 2, 6, CHANNEL_AXIS), torch.float32), (lay("int8", 8, 16), torch.float16),
    (lay("fp8", 8, 16), torch.float32), (lay("nf", 3, 8), torch.float32), (lay("nfh", 4, 16), torch.float32),
])
def test_cpu_quantize_bit_exact(layout, dtype):
    """The CPU's compiled quantizer (kernels/cpu.py, the one compact_ and the static writes use) equals the
    reference bit for bit, at the token counts a generation meets (a graph of static sizes each, one token
    twice: the second call reuses the first's graph), for a slice of a larger buffer too, as the residual's
    oldest tokens are."""
    from kvcompile.kernels import cpu

    tokens = (32, 64, 96) if layout.axis == TOKEN_AXIS else (1, 5, 1, 17)
    for i, n in enumerate(tokens):
        memory, magnitude = "slice" if i % 2 else "contiguous", (1.0, 300.0, 1e-3, 1.0)[i]
        x = make_x((2, 3, n, math.lcm(layout.group, 32)), dtype, memory, magnitude, i)
        got, want = cpu.quantize(x, layout), ref.quantize(x, layout)
        for g, e, name in zip(got, want, ("codes", "scale", "mn")):
            assert_exact(g, e, f"{name} ({layout}, {dtype}, {n} tokens)")


@pytest.mark.parametrize("fmt,bits", [(f.name, b) for f in FORMATS.values() if f.dequantize for b in f.bits])
def test_dequantize_is_linear_in_scale_and_minimum(fmt, bits):
    """The CPU path's algebra (kernels/cpu.py): deq(c, s, m) = deq(c, 1, 0) * s + m for every format, so
    scales fold into the query or the softmax weights."""
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256 if bits == 8 else 2 ** bits, (64,), generator=gen, dtype=torch.uint8)
    if fmt == "fp8":
        codes = codes[~codes.view(torch.float8_e4m3fn).float().isnan()]
    s, m = torch.rand(codes.shape, generator=gen) + 0.5, torch.randn(codes.shape, generator=gen)
    one, zero = torch.ones(()), torch.zeros(())
    want = f.dequantize(codes, s, m if f.has_min else None, bits)
    got = f.dequantize(codes, one, zero, bits) * s + (m if f.has_min else 0.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt,bits", [(f.name, b) for f in FORMATS.values() if f.levels for b in f.bits])
def test_cpu_table_decode_equals_the_gather(fmt, bits):
    """The CPU path decodes a table format's codes with selects (cpu._looked_up, which vectorises), not the
    gather levels[code] the reference does: the same float32 values for every code, in any order."""
    from kvcompile.kernels import cpu

    f = FORMATS[fmt]
    table = f.levels(bits, "cpu")
    codes = torch.randperm(2 ** bits, generator=torch.Generator().manual_seed(bits)).to(torch.uint8).repeat(3)
    assert_exact(cpu._looked_up(codes, tuple(table.tolist())), table[codes.long()], f"{fmt}{bits} select tree")
    assert_exact(cpu._looked_up(codes, tuple(table.tolist())), f.dequantize(codes, torch.ones(()), None, bits),
                 f"{fmt}{bits} against its format's dequantize")


@pytest.mark.slow
def test_cpu_decode_attention_fully_masked_row_is_zero():
    from kvcompile.kernels import cpu

    k, v, gen = _kv(2, Hkv=1, nk=(8, 3), nv=(4, 7))
    q = torch.randn(1, 2, 2, 16, generator=gen)
    mask = torch.ones(1, 1, 2, 11, dtype=torch.bool)
    mask[..., 0, :] = False
    out = cpu.attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    torch.testing.assert_close(out[:, :, 1], ref.attention(q, k, v, attn_mask=mask)[:, :, 1])


def test_cpu_guard_function_reads_sizes_once_and_drops_stride_guards():
    """The shape environment's guards as cpu._guard_function compiles them: true exactly where the sizes
    satisfy them (a failing guard must refuse the graph, or it would run on sizes it was not traced for)."""
    from kvcompile.kernels import cpu

    guards = ["L['t0'].size()[2] == 2*L['t1']", "L['t0'].stride()[0] == 4*L['t0'].size()[2]",
              "L['t1'] >= 2 or L['t0'].size()[3] == 1", "max(1, L['t1']) != L['t0'].size()[3]"]
    fn = cpu._guard_function(guards, ["t0", "t1"])
    assert fn(torch.zeros(1, 1, 6, 4), 3)
    assert not fn(torch.zeros(1, 1, 6, 4), 2)  # the first guard fails
    assert not fn(torch.zeros(1, 1, 2, 4), 1)  # the third fails
    assert fn(torch.zeros(1, 1, 2, 1), 1) is False  # the third holds by its second branch, the fourth fails
    assert fn(torch.zeros(1, 1, 4, 1), 2)
    assert fn(torch.zeros(1, 1, 6, 4).transpose(0, 1), 3)  # strides are not guarded (inputs are contiguous)
    assert cpu._guard_function(["L['t0'].stride()[1] == 4"], ["t0"]) is None
