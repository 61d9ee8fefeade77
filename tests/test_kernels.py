"""Triton kernels against their torch twins (kernels/reference.py), on the CPU under the interpreter.

- quantize: bit for bit (atol=0, rtol=0) against reference.quantize, also appending in place.
- attention / qk / pv: against a float64 oracle (dequantize in float64, plain softmax attention);
  the kernel's error may be at most ~2x that of the reference implementation in the same dtype,
  plus a small absolute floor (FlashAttention's test habit).
"""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: no GPU in CI

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvcompile.kernels import reference as ref  # noqa: E402
from kvcompile.kernels import triton_attention as ta  # noqa: E402
from kvcompile.kernels import triton_quantize as tq  # noqa: E402

if type(tq._quantize_tokens_kernel).__name__ != "InterpretedFunction" and not torch.cuda.is_available():
    # @triton.jit picks the interpreter when the kernel module is imported; reloading it here would
    # leave other references stale: say what to fix instead of failing every test
    raise RuntimeError(
        "kvcompile.kernels.triton_* were imported before tests/test_kernels.py set TRITON_INTERPRET=1, "
        "and there is no GPU: set TRITON_INTERPRET=1 in the environment or at the top of tests/conftest.py"
    )

PAD = ref.PAD
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# absolute floor added to 2x the reference's own error
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
SETTINGS = settings(max_examples=20, deadline=None)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """atol=0, rtol=0; on failure name the first mismatching index (Liger style)."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    bad = actual != expected
    if actual.dtype.is_floating_point:
        bad &= ~(torch.isnan(actual) & torch.isnan(expected))
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: "
            f"got {actual[idx].item()}, expected {expected[idx].item()}"
        )


def assert_error_within(out: torch.Tensor, ref_out: torch.Tensor, oracle: torch.Tensor, name: str) -> None:
    """|out - oracle| <= 2 |ref_out - oracle|_max + floor, elementwise; report the first offender."""
    assert out.shape == oracle.shape, f"{name}: shape {list(out.shape)} != {list(oracle.shape)}"
    assert out.dtype == ref_out.dtype, f"{name}: dtype {out.dtype} != {ref_out.dtype}"
    err = (out.double() - oracle).abs()
    ref_err = (ref_out.double() - oracle).abs().max().item()
    tol = 2 * ref_err + FLOOR[out.dtype]
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements beyond {tol:.3g} (2 x reference error "
            f"{ref_err:.3g} + {FLOOR[out.dtype]:g}); max error {err.max().item():.3g}; first at {idx}: "
            f"got {out[idx].item()}, float64 {oracle[idx].item()}, reference {ref_out[idx].item()}"
        )


def packed(B: int, H: int, nq: int, nr: int, D: int, meta, dtype, gen: torch.Generator):
    """Padded (codes, scale, mn, res) holding nq quantized + nr residual tokens (quantized with the
    reference). bits 16: nothing quantized, the residual holds all nq + nr tokens."""
    bits, group, axis = meta
    if bits >= 16:
        nr, nq = nr + nq, 0
        codes = torch.zeros(B, H, 0, 0, dtype=torch.uint8)
        scale = mn = torch.zeros(B, H, 0, 0, dtype=dtype)
    else:
        x = torch.randn(B, H, nq, D, generator=gen).to(dtype)
        if nq:
            x[0, 0, 0] = 0.75  # a constant token: a constant channel group (scale 0) for axis 3
        codes, scale, mn = ref.quantize(x, bits, group, axis)
    res = torch.randn(B, H, nr, D, generator=gen).to(dtype)
    return tuple(ref.pad(t) for t in (codes, scale, mn, res))


def with_spare(t, spare: int, meta, nq: int):
    """Packed storage with `spare` garbage rows after its Nq tokens (preallocated capacity, as the
    state keeps it) and the 4-field meta (bits, group, axis, nq) that tells the kernel where it ends."""
    codes, scale, mn, res = t
    if spare and meta[0] < 16:
        B, H = codes.shape[:2]
        codes = torch.cat([codes, torch.full((B, H, spare, codes.shape[3]), 0xFF, dtype=torch.uint8)], dim=2)
        junk = torch.full((B, H, spare, scale.shape[3]), 1e4 if scale.dtype != torch.float16 else 6e4,
                          dtype=scale.dtype)
        scale, mn = torch.cat([scale, junk], dim=2), torch.cat([mn, -junk], dim=2)
    return (codes, scale, mn, res), (*meta, nq if meta[0] < 16 else 0)


def oracle_attention(q, k, v, k_meta, v_meta, attn_mask=None, is_causal=False, scale=None):
    """Dequantize in float64, then softmax attention in float64."""
    K = ref.full_padded(k[0], k[1].double(), k[2].double(), k[3].double(), *k_meta)
    V = ref.full_padded(v[0], v[1].double(), v[2].double(), v[3].double(), *v_meta)
    hq = q.shape[1]
    K, V = ref._repeat_heads(K, hq), ref._repeat_heads(V, hq)  # (B, Hq, T, D)
    s = q.double() @ K.transpose(2, 3) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, Hq, L, T)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    if is_causal:
        L, T = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ V


def padding_mask(B: int, Hq: int, L: int, T: int, kind: str, dtype, gen: torch.Generator):
    """Left padding as transformers builds it: batch row b masks its first pad_b keys (never all)."""
    if kind == "none":
        return None
    if kind == "additive_full":  # a general additive mask, one value per (b, h, i, j)
        return torch.randn(B, Hq, L, T, generator=gen).to(dtype)
    pads = torch.randint(0, T, (B,), generator=gen)
    pads[0] = 0
    keep = torch.arange(T)[None, :] >= pads[:, None]  # (B, T)
    keep = keep[:, None, None, :].expand(B, 1, L, T)  # (B, 1, L, T)
    if kind == "bool":
        return keep.clone()
    return torch.zeros(B, 1, L, T, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------


@st.composite
def quant_case(draw):
    """(shape, bits, group, axis, dtype, layout) valid by construction: N % G == 0 on the token
    axis; G | D and (G % per == 0 or per % G == 0) on the channel axis; per | D."""
    bits = draw(st.sampled_from([2, 4]))
    per = 8 // bits
    axis = draw(st.sampled_from([ref.TOKEN_AXIS, ref.CHANNEL_AXIS]))
    if axis == ref.TOKEN_AXIS:
        group = draw(st.sampled_from([1, 2, 3, 4, 8, 32]))
        n = group * draw(st.integers(1, 3))
        d = per * draw(st.sampled_from([1, 2, 3, 4, 16]))
    else:
        group = draw(st.sampled_from([1, 2, 4, 8, 12, 16, 32]))  # each a multiple or divisor of per
        d = math.lcm(group, per) * draw(st.integers(1, 3))
        n = draw(st.integers(1, 9))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), n, d)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "slice", "transposed"]))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    return shape, bits, group, axis, dtype, layout, magnitude, draw(st.integers(0, 2**31 - 1))


def make_x(shape, dtype, layout, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, N, D = shape
    if layout == "slice":  # rows of a larger buffer, as the residual's oldest tokens are
        x = (torch.randn(B, H, N + 5, D, generator=gen) * magnitude).to(dtype)[:, :, 3:3 + N]
    elif layout == "transposed":  # (B, N, H, D) memory, as a model's projection output
        x = (torch.randn(B, N, H, D, generator=gen) * magnitude).to(dtype).transpose(1, 2)
    else:
        x = (torch.randn(B, H, N, D, generator=gen) * magnitude).to(dtype)
    x[0, 0] = 0.5  # a constant token: its channel groups have scale 0
    return x


def check_quantize(x, bits, group, axis):
    expected = ref.quantize(x, bits, group, axis)
    got = tq.quantize(x, bits, group, axis)
    for g, e, name in zip(got, expected, ("codes", "scale", "mn")):
        assert_exact(g, e, f"{name} (bits={bits}, group={group}, axis={axis}, {x.dtype}, {list(x.shape)})")
        assert g.is_contiguous()


@SETTINGS
@given(quant_case())
def test_quantize_bit_exact(case):
    shape, bits, group, axis, dtype, layout, magnitude, seed = case
    check_quantize(make_x(shape, dtype, layout, magnitude, seed), bits, group, axis)


@SETTINGS
@given(quant_case(), st.integers(0, 2), st.integers(0, 3))
def test_quantize_append_in_place(case, old_groups, spare):
    """Appending N tokens into preallocated padded storage that already holds Nq tokens equals
    quantizing everything at once; the rows before and after are untouched."""
    shape, bits, group, axis, dtype, layout, magnitude, seed = case
    x = make_x(shape, dtype, layout, magnitude, seed)
    B, H, N, D = shape
    nq = old_groups * group if axis == ref.TOKEN_AXIS else old_groups * 3
    old = make_x((B, H, nq, D), dtype, "contiguous", magnitude, seed + 1) if nq else x[:, :, :0]
    c0, s0, m0 = (ref.pad(t) for t in ref.quantize(old, bits, group, axis))
    srows = (lambda n: n // group) if axis == ref.TOKEN_AXIS else (lambda n: n)
    cap = nq + N + spare * (group if axis == ref.TOKEN_AXIS else 1)  # room for more tokens
    codes = torch.full((B, H, PAD + cap, c0.shape[3]), 0xAB, dtype=torch.uint8)
    scale = torch.full((B, H, PAD + srows(cap), s0.shape[3]), 7.0, dtype=dtype)
    mn = scale.clone()
    codes[:, :, :PAD + nq], scale[:, :, :PAD + srows(nq)], mn[:, :, :PAD + srows(nq)] = c0, s0, m0
    before = (codes.clone(), scale.clone(), mn.clone())

    got = tq.quantize(x, bits, group, axis, out=(codes, scale, mn), row=PAD + nq, scale_row=PAD + srows(nq))
    assert got[0] is codes and got[1] is scale and got[2] is mn

    expected = ref.quantize(torch.cat([old, x], dim=2), bits, group, axis)
    end = (PAD + nq + N, PAD + srows(nq + N), PAD + srows(nq + N))
    for t, b, e, stop, name in zip((codes, scale, mn), before, expected, end, ("codes", "scale", "mn")):
        assert_exact(t[:, :, PAD:stop], e, f"appended {name}")
        assert_exact(t[:, :, :PAD], b[:, :, :PAD], f"{name} pad rows")
        assert_exact(t[:, :, stop:], b[:, :, stop:], f"{name} spare rows")


def test_quantize_default_scale_row():
    """Without scale_row, axis 2 writes scale rows from row // group (unpadded storage)."""
    x = torch.randn(1, 2, 8, 16)
    codes = torch.zeros(1, 2, 16, 4, dtype=torch.uint8)
    scale, mn = torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16)
    tq.quantize(x, 2, 4, ref.TOKEN_AXIS, out=(codes, scale, mn), row=8)
    c, s, m = ref.quantize(x, 2, 4, ref.TOKEN_AXIS)
    assert_exact(codes[:, :, 8:], c, "codes")
    assert_exact(scale[:, :, 2:], s, "scale")
    assert_exact(mn[:, :, 2:], m, "mn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,bits,group,axis",
    [
        ((1, 1, 32, 128), 2, 32, 2),  # KIVI keys, head_dim 128
        ((2, 3, 64, 64), 4, 32, 2),  # two groups of 32 tokens
        ((1, 2, 5, 128), 2, 32, 3),  # KIVI values, odd token count
        ((2, 1, 3, 80), 4, 80, 3),  # a group of a whole non-power-of-two head_dim
        ((1, 2, 7, 12), 2, 2, 3),  # groups narrower than a byte
        ((1, 1, 6, 12), 4, 3, 2),  # non-power-of-two token group
        ((1, 1, 256, 16), 2, 256, 2),  # a group longer than one register tile
    ],
)
def test_quantize_regression(shape, bits, group, axis, dtype):
    check_quantize(make_x(shape, dtype, "contiguous", 1.0, 0), bits, group, axis)


def test_quantize_rejects_bad_arguments():
    x = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="bits"):
        tq.quantize(x, 3, 4, 2)
    with pytest.raises(ValueError, match="divide the token count"):
        tq.quantize(x, 2, 3, 2)
    with pytest.raises(ValueError, match="divide head_dim"):
        tq.quantize(x, 2, 5, 3)
    with pytest.raises(NotImplementedError, match="multiple or a divisor"):
        tq.quantize(torch.randn(1, 1, 2, 24), 2, 6, 3)
    with pytest.raises(ValueError, match="out codes"):
        tq.quantize(x, 2, 4, 2, out=(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, 1, 2, 16),
                                     torch.zeros(1, 1, 2, 16)))


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def run_attention(B, Hkv, gq, L, D, k_meta, v_meta, nq_k, nr_k, nq_v, dtype, mask_kind="none", is_causal=False,
                  scale=None, num_splits=None, block_n=16, seed=0, dv=None, spare=0):
    gen = torch.Generator().manual_seed(seed)
    T = nq_k + nr_k
    dv = D if dv is None else dv
    k = packed(B, Hkv, nq_k, nr_k, D, k_meta, dtype, gen)
    v = packed(B, Hkv, nq_v, T - nq_v, dv, v_meta, dtype, gen)
    q = torch.randn(B, Hkv * gq, L, D, generator=gen).to(dtype)
    mask = padding_mask(B, Hkv * gq, L, T, mask_kind, dtype, gen)
    kw = dict(attn_mask=mask, is_causal=is_causal, scale=scale)
    if spare:  # the kernel reads storage with spare capacity; reference and oracle the exact rows
        (ks, km4), (vs, vm4) = with_spare(k, spare, k_meta, nq_k), with_spare(v, spare, v_meta, nq_v)
        out = ta.attention_with_config(q, *ks, *vs, km4, vm4, **kw, num_splits=num_splits, block_n=block_n)
    else:
        out = ta.attention_with_config(q, *k, *v, k_meta, v_meta, **kw, num_splits=num_splits, block_n=block_n)
    assert out.is_contiguous() and out.shape == (B, Hkv * gq, L, dv)
    expected = ref.attention(q, k, v, k_meta, v_meta, **kw)
    oracle = oracle_attention(q, k, v, k_meta, v_meta, **kw)
    name = (f"attention B={B} Hkv={Hkv} gq={gq} L={L} D={D} T={T} k={k_meta} Nq_k={nq_k} v={v_meta} Nq_v={nq_v} "
            f"{dtype} mask={mask_kind} causal={is_causal} splits={num_splits} block_n={block_n} spare={spare}")
    assert_error_within(out, expected, oracle, name)


@st.composite
def attention_case(draw):
    """A decode/short-prefill attention case valid by construction (KV heads divide query heads,
    token groups whole, K and V holding the same T with their own Nq)."""
    D = draw(st.sampled_from([16, 64]))
    k_axis = draw(st.sampled_from([ref.TOKEN_AXIS] * 3 + [ref.CHANNEL_AXIS]))
    v_axis = draw(st.sampled_from([ref.CHANNEL_AXIS] * 3 + [ref.TOKEN_AXIS]))

    def meta(axis):
        bits = draw(st.sampled_from([2, 4, 16]))
        # token groups of 16 / 32 hold whole tiles of 16 / 32 tokens: the kernel's one-scale-row path
        group = draw(st.sampled_from([2, 4, 8, 16, 32] if axis == ref.TOKEN_AXIS else [4, 8, 16]))
        return (bits, group, axis)

    k_meta, v_meta = meta(k_axis), meta(v_axis)
    kg = k_meta[1] if k_axis == ref.TOKEN_AXIS else 1
    nq_k = kg * draw(st.integers(0, max(1, 32 // kg)))
    nr_k = draw(st.integers(0 if nq_k else 1, 17))
    T = nq_k + nr_k
    vg = v_meta[1] if v_axis == ref.TOKEN_AXIS else 1
    nq_v = vg * draw(st.integers(0, T // vg))
    mask_kind = draw(st.sampled_from(["none", "bool", "additive", "additive_full", "causal"]))
    return dict(
        B=draw(st.integers(1, 2)), Hkv=draw(st.integers(1, 2)), gq=draw(st.sampled_from([1, 3, 8])),
        L=draw(st.sampled_from([1, 2, 4])), D=D, k_meta=k_meta, v_meta=v_meta, nq_k=nq_k, nr_k=nr_k, nq_v=nq_v,
        dtype=draw(st.sampled_from(DTYPES)), mask_kind="none" if mask_kind == "causal" else mask_kind,
        is_causal=mask_kind == "causal", scale=draw(st.sampled_from([None, 0.2])),
        num_splits=draw(st.sampled_from([None, 1, 2, 3])), block_n=draw(st.sampled_from([16, 32])),
        seed=draw(st.integers(0, 2**31 - 1)), spare=draw(st.sampled_from([0, 0, 5])),
    )


@settings(max_examples=25, deadline=None)
@given(attention_case())
def test_attention_matches_float64(case):
    run_attention(**case)


KIVI_K = (2, 4, ref.TOKEN_AXIS)
KIVI_V = (2, 8, ref.CHANNEL_AXIS)


@pytest.mark.parametrize("block_n", [16, None])  # None: the launcher's default tile
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,Hkv,gq,L,D,k_meta,v_meta,nq_k,nr_k,nq_v,mask_kind,num_splits",
    [
        (1, 1, 1, 1, 16, KIVI_K, KIVI_V, 0, 1, 0, "none", None),  # T=1: Nq=0, Nr=1
        (1, 2, 3, 1, 16, KIVI_K, KIVI_V, 32, 0, 24, "none", 2),  # Nr_k=0: keys all quantized
        (2, 2, 3, 1, 64, KIVI_K, KIVI_V, 16, 5, 11, "bool", 2),  # SmolLM2-like GQA 3, padding mask
        (2, 1, 8, 1, 16, KIVI_K, KIVI_V, 36, 1, 21, "additive", 3),  # GQA 8, T=37 odd
        (1, 2, 8, 4, 16, (4, 8, 2), (4, 16, 3), 24, 9, 30, "none", 2),  # 4-bit, 32 stacked rows
        (1, 1, 8, 16, 16, KIVI_K, KIVI_V, 16, 8, 4, "causal", None),  # 128 rows: two M blocks
        (2, 2, 1, 2, 16, (16, 1, 2), (16, 1, 3), 0, 19, 0, "bool", 2),  # method "none": residual only
        (1, 1, 2, 1, 8, KIVI_K, (4, 4, 3), 8, 3, 7, "none", None),  # head_dim 8 < 16: padded tile
        (1, 1, 3, 2, 24, (4, 4, 3), (2, 4, 2), 12, 5, 16, "none", 2),  # swapped axes, non-pow2 D
        (1, 2, 4, 1, 64, (2, 32, 2), (2, 32, 3), 64, 7, 43, "bool", 2),  # KIVI defaults (G=32)
        (2, 1, 4, 1, 64, (4, 32, 2), (4, 16, 2), 96, 33, 128, "additive", None),  # token-axis values too
    ],
)
def test_attention_regression(B, Hkv, gq, L, D, k_meta, v_meta, nq_k, nr_k, nq_v, mask_kind, num_splits, dtype,
                              block_n):
    run_attention(B, Hkv, gq, L, D, k_meta, v_meta, nq_k, nr_k, nq_v, dtype,
                  mask_kind="none" if mask_kind == "causal" else mask_kind, is_causal=mask_kind == "causal",
                  num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_spare_capacity(dtype):
    """Packed storage preallocated past its Nq tokens (meta carries nq): the garbage rows are never read."""
    run_attention(2, 2, 3, 1, 64, (2, 32, 2), (2, 32, 3), 64, 9, 45, dtype, mask_kind="bool", spare=40,
                  num_splits=2)


def test_attention_value_head_dim_differs():
    run_attention(1, 2, 2, 1, 16, KIVI_K, KIVI_V, 8, 3, 5, torch.float32, dv=32, num_splits=2)


def test_attention_splits_agree():
    """Every split count gives the same result up to float32 reassociation."""
    gen = torch.Generator().manual_seed(1)
    k = packed(1, 2, 64, 7, 16, KIVI_K, torch.float32, gen)
    v = packed(1, 2, 40, 31, 16, KIVI_V, torch.float32, gen)
    q = torch.randn(1, 6, 1, 16, generator=gen)
    outs = [ta.attention_with_config(q, *k, *v, KIVI_K, KIVI_V, num_splits=s, block_n=16) for s in (1, 2, 3, 5, 100)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ta.attention(q, *k, *v, KIVI_K, KIVI_V), outs[0], atol=1e-6, rtol=1e-5)


def test_attention_fully_masked_row_is_zero():
    """As torch's SDPA: a query row that may attend to no key gives 0, not NaN."""
    gen = torch.Generator().manual_seed(2)
    k = packed(1, 1, 8, 3, 16, KIVI_K, torch.float32, gen)
    v = packed(1, 1, 4, 7, 16, KIVI_V, torch.float32, gen)
    q = torch.randn(1, 2, 2, 16, generator=gen)
    mask = torch.ones(1, 1, 2, 11, dtype=torch.bool)
    mask[..., 1, :] = False
    out = ta.attention_with_config(q, *k, *v, KIVI_K, KIVI_V, attn_mask=mask, num_splits=2, block_n=16)
    expected = ref.attention(q, k, v, KIVI_K, KIVI_V, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_attention_row_masked_by_finite_minimum():
    """transformers masks with finfo.min, not -inf: a row masked everywhere then averages the
    values (softmax of equal finite logits), as SDPA does; the kernel must not overflow to 0."""
    gen = torch.Generator().manual_seed(4)
    k = packed(1, 1, 8, 3, 16, KIVI_K, torch.float32, gen)
    v = packed(1, 1, 4, 7, 16, KIVI_V, torch.float32, gen)
    q = torch.randn(1, 2, 2, 16, generator=gen)
    mask = torch.zeros(1, 1, 2, 11)
    mask[..., 1, :] = torch.finfo(torch.float32).min
    mask[..., 0, :4] = torch.finfo(torch.float32).min
    out = ta.attention_with_config(q, *k, *v, KIVI_K, KIVI_V, attn_mask=mask, num_splits=2, block_n=16)
    torch.testing.assert_close(out, ref.attention(q, k, v, KIVI_K, KIVI_V, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(3)
    k = packed(1, 2, 8, 3, 16, KIVI_K, torch.float32, gen)
    v = packed(1, 2, 4, 7, 16, KIVI_V, torch.float32, gen)
    q = torch.randn(1, 6, 1, 16, generator=gen)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        ta.attention(q, *k, *v, KIVI_K, KIVI_V, dropout_p=0.1)
    with pytest.raises(ValueError, match="is_causal"):
        ta.attention(q, *k, *v, KIVI_K, KIVI_V, attn_mask=torch.ones(1, 11, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="must divide the query heads"):
        ta.attention(torch.randn(1, 5, 1, 16), *k, *v, KIVI_K, KIVI_V)
    with pytest.raises(ValueError, match="tokens"):
        v_short = packed(1, 2, 4, 6, 16, KIVI_V, torch.float32, gen)
        ta.attention(q, *k, *v_short, KIVI_K, KIVI_V)
    with pytest.raises(ValueError, match="inconsistent packed cache"):
        ta.attention(q, *k, *v, (4, 4, 2), KIVI_V)
    with pytest.raises(ValueError, match="broadcast"):
        ta.attention(q, *k, *v, KIVI_K, KIVI_V, attn_mask=torch.zeros(1, 1, 1, 5))


# ----------------------------------------------------------------------------------------------
# qk / pv (eager attention's matmuls)
# ----------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(attention_case())
def test_qk_pv_match_float64(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, Hkv, gq, L, D, dtype = (case[n] for n in ("B", "Hkv", "gq", "L", "D", "dtype"))
    T = case["nq_k"] + case["nr_k"]
    k = packed(B, Hkv, case["nq_k"], case["nr_k"], D, case["k_meta"], dtype, gen)
    v = packed(B, Hkv, case["nq_v"], T - case["nq_v"], D, case["v_meta"], dtype, gen)
    q = torch.randn(B, Hkv * gq, L, D, generator=gen).to(dtype)
    hq = Hkv * gq

    (ks, km4), (vs, vm4) = with_spare(k, case["spare"], case["k_meta"], case["nq_k"]), \
        with_spare(v, case["spare"], case["v_meta"], case["nq_v"])

    # -- scores --
    s = ta.qk(q, *ks, km4, block_n=case["block_n"])
    K64 = ref._repeat_heads(ref.full_padded(k[0], k[1].double(), k[2].double(), k[3].double(), *case["k_meta"]), hq)
    assert_error_within(s, ref.qk(q, k, case["k_meta"]), q.double() @ K64.transpose(2, 3), f"qk {case}")

    # -- probabilities times values --
    p = torch.softmax(torch.randn(B, hq, L, T, generator=gen), dim=-1).to(dtype)
    o = ta.pv(p, *vs, vm4, num_splits=case["num_splits"], block_n=case["block_n"])
    V64 = ref._repeat_heads(ref.full_padded(v[0], v[1].double(), v[2].double(), v[3].double(), *case["v_meta"]), hq)
    assert_error_within(o, ref.pv(p, v, case["v_meta"]), p.double() @ V64, f"pv {case}")


# ----------------------------------------------------------------------------------------------
# the symmetric formats (nqkv's NF, int8, fp8): codes read by the same kernels
# ----------------------------------------------------------------------------------------------

from kvcompile.methods import FP8, INT8, KIVI, NF, NFH  # noqa: E402

# (fmt, bits, group) with head_dim 16 or 64; group = channels per scale (head_dim for int8 / fp8)
SYMMETRIC = [(NF, 4, 16), (NF, 3, 8), (NF, 2, 64), (INT8, 8, None), (FP8, 8, None)]
# NFH is read as NF in the Hadamard basis (q, residuals and output transformed by torch): not exact
HADAMARD = [(NFH, 4, 16), (NFH, 3, 64), (NFH, 2, 8)]


def packed_symmetric(B, H, nq, nr, D, fmt, bits, group, dtype, gen):
    """Padded (codes, scale, mn, res) of nq tokens in a symmetric format + nr residual tokens, and the
    5-field meta (bits, group, 3, nq, fmt). Token magnitudes spread over 3 decades; one zero token."""
    group = D if group is None else min(group, D)
    x = (torch.randn(B, H, nq, D, generator=gen) * 10 ** torch.empty(B, H, nq, 1).uniform_(-2, 1, generator=gen))
    if nq:
        x[0, 0, 0] = 0
    codes, scale, mn = ref.quantize(x.to(dtype), bits, group, ref.CHANNEL_AXIS, fmt)
    res = torch.randn(B, H, nr, D, generator=gen).to(dtype)
    return tuple(ref.pad(t) for t in (codes, scale, mn, res)), (bits, group, ref.CHANNEL_AXIS, nq, fmt)


@pytest.mark.parametrize("fmt, bits, group", SYMMETRIC)
def test_symmetric_dequantization_is_exact(fmt, bits, group):
    """q one-hot rows (float32, IEEE products): qk returns the dequantized keys themselves, so the
    kernel's unpacking (3-bit words too) and level / int8 / e4m3 decoding must equal the reference's."""
    gen = torch.Generator().manual_seed(bits + 10 * fmt)
    D = 64 if group == 64 else 16
    k, meta = packed_symmetric(2, 2, 37, 3, D, fmt, bits, group, torch.float32, gen)
    q = torch.eye(D).expand(2, 2, D, D).contiguous()  # L = D queries, query i picks channel i
    got = ta.qk(q, *k, meta, block_n=16)
    want = ref.full_padded(*k, *meta).transpose(2, 3)
    assert_exact(got, want, f"qk one-hot fmt={fmt} bits={bits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt, bits, group", SYMMETRIC + HADAMARD)
def test_symmetric_attention_qk_pv_match_float64(fmt, bits, group, dtype):
    gen = torch.Generator().manual_seed(bits + fmt)
    B, Hkv, gq, L, D = 2, 2, 3, 1, 64
    k, km = packed_symmetric(B, Hkv, 40, 9, D, fmt, bits, group, dtype, gen)
    v, vm = packed_symmetric(B, Hkv, 45, 4, D, fmt, bits, group, dtype, gen)
    q = torch.randn(B, Hkv * gq, L, D, generator=gen).to(dtype)
    mask = padding_mask(B, Hkv * gq, L, 49, "bool", dtype, gen)
    out = ta.attention_with_config(q, *k, *v, km, vm, attn_mask=mask, num_splits=2, block_n=16)
    name = f"attention fmt={fmt} bits={bits} {dtype}"
    assert_error_within(out, ref.attention(q, k, v, km, vm, attn_mask=mask),
                        oracle_attention(q, k, v, km, vm, attn_mask=mask), name)
    hq = Hkv * gq
    K64 = ref._repeat_heads(ref.full_padded(k[0], k[1].double(), k[2], k[3].double(), *km), hq)
    assert_error_within(ta.qk(q, *k, km), ref.qk(q, k, km), q.double() @ K64.transpose(2, 3), f"qk {name}")
    p = torch.softmax(torch.randn(B, hq, L, 49, generator=gen), dim=-1).to(dtype)
    V64 = ref._repeat_heads(ref.full_padded(v[0], v[1].double(), v[2], v[3].double(), *vm), hq)
    assert_error_within(ta.pv(p, *v, vm, num_splits=2), ref.pv(p, v, vm), p.double() @ V64, f"pv {name}")


def test_mixed_formats_in_one_attention():
    """kivi keys with nf values (one call reads two formats), GQA 8, causal over a short prefill."""
    gen = torch.Generator().manual_seed(5)
    k = packed(1, 1, 32, 5, 16, KIVI_K, torch.float16, gen)
    v, vm = packed_symmetric(1, 1, 30, 7, 16, NF, 4, 8, torch.float16, gen)
    q = torch.randn(1, 8, 4, 16, generator=gen).to(torch.float16)
    out = ta.attention_with_config(q, *k, *v, KIVI_K, vm, is_causal=True, block_n=16)
    assert_error_within(out, ref.attention(q, k, v, KIVI_K, vm, is_causal=True),
                        oracle_attention(q, k, v, KIVI_K, vm, is_causal=True), "kivi keys, nf values")


def test_symmetric_formats_reject_bad_meta():
    gen = torch.Generator().manual_seed(6)
    k, km = packed_symmetric(1, 1, 8, 2, 16, NF, 4, 16, torch.float32, gen)
    q = torch.randn(1, 1, 1, 16, generator=gen)
    with pytest.raises(ValueError, match="format 9 has no Triton kernel"):
        ta.qk(q, *k, (*km[:4], 9))
    with pytest.raises(ValueError, match="bits must be 8 or 16 for format 2"):
        ta.qk(q, *k, (4, 16, ref.CHANNEL_AXIS, 8, INT8))
    with pytest.raises(ValueError, match="inconsistent packed cache"):
        ta.qk(q, *k, (2, 16, ref.CHANNEL_AXIS, 8, NF))  # 2-bit meta on 4-bit codes


# -- the symmetric formats' quantizer (compact_'s write on CUDA) ----------------------------------


@st.composite
def symmetric_quantize_case(draw):
    fmt, bits, group = draw(st.sampled_from(SYMMETRIC + HADAMARD + [(NF, 4, 24), (NF, 2, 4), (NF, 3, 1)]))
    D = draw(st.sampled_from([d for d in (8, 16, 24, 48, 64, 80) if (group is None or d % group == 0)
                              and d % (8 if bits == 3 else 8 // bits) == 0]))
    return dict(fmt=fmt, bits=bits, group=D if group is None else group, D=D, B=draw(st.integers(1, 2)),
                H=draw(st.integers(1, 3)), N=draw(st.integers(1, 70)), dtype=draw(st.sampled_from(DTYPES)),
                seed=draw(st.integers(0, 2**31 - 1)), row=draw(st.sampled_from([0, 2, 5])))


@settings(max_examples=30, deadline=None)
@given(symmetric_quantize_case())
def test_quantize_symmetric_bit_exact(case):
    """Bit for bit the reference, also written in place at a row offset into larger storage."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, H, N, D, dtype = (case[k] for k in ("B", "H", "N", "D", "dtype"))
    x = (torch.randn(B, H, N, D, generator=gen) * 10 ** torch.empty(B, H, N, 1).uniform_(-3, 2, generator=gen))
    x[0, 0, 0] = 0
    x = x.to(dtype)
    args = (case["bits"], case["group"], case["fmt"])
    want = ref.quantize(x, case["bits"], case["group"], ref.CHANNEL_AXIS, case["fmt"])
    for got, w, name in zip(tq.quantize_symmetric(x, *args), want, ("codes", "scale", "mn")):
        assert_exact(got, w, f"{name} {case}")
    r = case["row"]
    out = (torch.full((B, H, r + N + 3, want[0].shape[3]), 7, dtype=torch.uint8),
           torch.full((B, H, r + N + 3, want[1].shape[3]), 5.0, dtype=dtype), torch.zeros(B, H, r + N + 3, 0, dtype=dtype))
    before = [t.clone() for t in out]
    tq.quantize_symmetric(x.transpose(1, 2).contiguous().transpose(1, 2), *args, out=out, row=r)  # strided x
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
    x = torch.cat([torch.full((n, 1), 448.0), x.reshape(n, D - 1).clamp(-448, 448)], dim=1)[None, None]
    got = tq.quantize_symmetric(x, 8, D, FP8)
    want = ref.quantize(x, 8, D, ref.CHANNEL_AXIS, FP8)
    assert torch.equal(want[1], torch.ones_like(want[1]))
    assert_exact(got[0], want[0], "fp8 codes")


def test_quantize_symmetric_rejects_bad_arguments():
    x = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="fmt must be one of"):
        tq.quantize_symmetric(x, 4, 16, KIVI)
    with pytest.raises(ValueError, match="bits must be 8 for format 2"):
        tq.quantize_symmetric(x, 4, 16, INT8)
    with pytest.raises(ValueError, match="group 5 must divide head_dim 16"):
        tq.quantize_symmetric(x, 4, 5, NF)
    with pytest.raises(ValueError, match="power-of-2 blocks"):
        tq.quantize_symmetric(torch.randn(1, 1, 2, 24), 4, 12, NFH)
    with pytest.raises(ValueError, match="out scale"):
        tq.quantize_symmetric(x, 4, 16, NF, out=(torch.zeros(1, 1, 2, 8, dtype=torch.uint8), torch.zeros(1, 1, 2, 2),
                                                torch.zeros(1, 1, 2, 0)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_ties_go_to_the_lower_level(bits):
    """Values exactly on a decision boundary (a block whose absmax is 1, so u = x) and one ulp either side."""
    from kvcompile.methods import nqkv

    m = nqkv.midpoints(bits)
    vals = torch.cat([m, m.nextafter(torch.tensor(-2.0)), m.nextafter(torch.tensor(2.0)), nqkv.levels(bits)])
    x = torch.cat([torch.ones(1), vals, torch.zeros(64 - 1 - vals.numel())])[None, None, None]
    got = tq.quantize_symmetric(x, bits, 64, NF)
    assert_exact(got[0], ref.quantize(x, bits, 64, ref.CHANNEL_AXIS, NF)[0], f"nf{bits} ties")


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
