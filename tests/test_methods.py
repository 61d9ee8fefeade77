"""The nqkv, int8 and fp8 methods: each quantizer bit for bit against a plain per-block loop written
from the semantics (methods/nqkv.py, int8.py, fp8.py), the NormalFloat levels, the compiled tiny
decoder against the eager reference (kvcompile.fakequant), the bytes the state holds, and the
options' errors."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import kvcompile
from kvcompile import Config, KVState
from kvcompile.evaluate import bits_per_element
from kvcompile.fakequant import FakeQuantCache
from kvcompile.kernels import reference as ref
from kvcompile.methods import layouts, nqkv
from kvcompile.state import kv_append, kv_compact, kv_store
from helpers import lay, max_abs_diff
from models import VOCAB, decode, tiny
from strategies import NQKV_BITS, nqkv_blocks, token_rows

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SEEDS = st.integers(0, 2 ** 31 - 1)

# bitsandbytes' NF4 table (QLoRA's create_normal_map(offset=0.9677083), computed with scipy)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


# -- plain references, one block at a time -------------------------------------------------------


def plain_levels(bits: int) -> list:
    """The NormalFloat construction in Python floats (statistics.NormalDist, not torch)."""
    n, half = 2 ** bits, 2 ** (bits - 1)
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))

    def lin(a, b, k):
        return [a + (b - a) * i / (k - 1) for i in range(k)]

    nd = statistics.NormalDist()
    pos = [nd.inv_cdf(p) for p in lin(offset, 0.5, half + 1)[:-1]]
    neg = [-nd.inv_cdf(p) for p in lin(offset, 0.5, half)[:-1]]
    v = sorted(pos + neg + [0.0])
    return [a / v[-1] for a in v]


def plain_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., D] -> bytes, bit by bit: code i's bit j is bit (i * bits + j) of the row's bytes,
    low bits first (so 4/2-bit codes share a byte, and 8 3-bit codes fill 3 bytes)."""
    D = codes.shape[-1]
    packed = torch.zeros(*codes.shape[:-1], D * bits // 8, dtype=torch.int64)
    for i in range(D):
        for j in range(bits):
            pos = i * bits + j
            packed[..., pos // 8] |= ((codes[..., i] >> j) & 1) << (pos % 8)
    return packed.to(torch.uint8)


def _blocks(x: torch.Tensor, block: int):
    B, H, N, D = x.shape
    for b in range(B):
        for h in range(H):
            for n in range(N):
                for j in range(D // block):
                    yield (b, h, n, j), (b, h, n, slice(j * block, (j + 1) * block))


def plain_nqkv(x: torch.Tensor, bits: int, block: int):
    """scale = absmax (in x.dtype); code = number of midpoints below x / scale (nearest level, ties to the
    lower), the zero level's code for an all-zero block; dequantized level[code] * scale."""
    B, H, N, D = x.shape
    lv = torch.tensor(nqkv.levels(bits).tolist())  # the table (checked against plain_levels below)
    mids = (lv[:-1] + lv[1:]) / 2
    codes = torch.zeros(B, H, N, D, dtype=torch.int64)
    scale = torch.zeros(B, H, N, D // block, dtype=x.dtype)
    deq = torch.zeros(B, H, N, D, dtype=x.dtype)
    for si, sl in _blocks(x, block):
        g = x[sl].float()
        s = g.abs().max().to(x.dtype)
        scale[si] = s
        if s.float() > 0:
            u = g / s.float()
            c = (mids[None, :] < u[:, None]).sum(1)
            nearest = (lv[None, :] - u[:, None]).abs().min(1).values
            assert bool(((lv[c] - u).abs() <= nearest + 1e-6).all())
        else:
            c = torch.full((block,), 2 ** (bits - 1) - 1)
        codes[sl] = c
        deq[sl] = (lv[c] * s.float()).to(x.dtype)
    return plain_pack(codes, bits), scale, codes, deq


def plain_int8(x: torch.Tensor):
    """scale = absmax / 127 (in x.dtype); code = clamp(floor(x / scale + 0.5), -127, 127), 0 where the
    scale is 0; stored code + 128; dequantized code * scale."""
    B, H, N, D = x.shape
    stored = torch.zeros(B, H, N, D, dtype=torch.int64)
    scale = torch.zeros(B, H, N, 1, dtype=x.dtype)
    deq = torch.zeros(B, H, N, D, dtype=x.dtype)
    for si, sl in _blocks(x, D):
        g = x[sl].float()
        s = (g.abs().max() / 127).to(x.dtype)
        scale[si] = s
        c = torch.floor(g / s.float() + 0.5).clamp(-127, 127) if s.float() > 0 else torch.zeros(D)
        stored[sl] = c.long() + 128
        deq[sl] = (c * s.float()).to(x.dtype)
    return stored.to(torch.uint8), scale, deq


E4M3 = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).float()


def plain_fp8(x: torch.Tensor):
    """scale = absmax / 448 (in x.dtype); code = the e4m3fn byte of clamp(x / scale, -448, 448) (round to
    nearest even), of 0 where the scale is 0; dequantized float(code) * scale."""
    B, H, N, D = x.shape
    stored = torch.zeros(B, H, N, D, dtype=torch.uint8)
    scale = torch.zeros(B, H, N, 1, dtype=x.dtype)
    deq = torch.zeros(B, H, N, D, dtype=x.dtype)
    finite = E4M3[~E4M3.isnan()]
    for si, sl in _blocks(x, D):
        g = x[sl].float()
        s = (g.abs().max() / 448).to(x.dtype)
        scale[si] = s
        u = (g / s.float()).clamp(-448, 448) if s.float() > 0 else torch.zeros(D)
        c = u.to(torch.float8_e4m3fn).view(torch.uint8)
        got = E4M3[c.long()]
        assert bool(((got - u).abs() == (finite[None, :] - u[:, None]).abs().min(1).values).all())  # nearest
        stored[sl] = c
        deq[sl] = (got * s.float()).to(x.dtype)
    return stored, scale, deq


def _data(shape, dtype, seed, block):
    """Normal values with per-token magnitudes over 5 decades, and some all-zero blocks."""
    B, H, N, D = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, N, D, generator=g) * 10 ** torch.empty(B, H, N, 1).uniform_(-3, 2, generator=g)
    zero = torch.rand(B, H, N, D // block, generator=g) < 0.15
    x = x * (~zero).repeat_interleave(block, dim=-1)
    return x.to(dtype)


FORMAT_OF = {"nqkv": "nf", "int8": "int8", "fp8": "fp8"}


def _check(x, method, bits, group, want_codes, want_scale, want_deq):
    layout = lay(FORMAT_OF[method], bits, group)
    codes, scale, mn = ref.quantize(x, layout)
    torch.testing.assert_close(codes, want_codes, atol=0, rtol=0)
    torch.testing.assert_close(scale, want_scale, atol=0, rtol=0)
    assert mn.shape == (*x.shape[:3], 0)  # no minimum stored
    deq = ref.dequantize(codes, scale, mn, layout, x.shape[-1])
    torch.testing.assert_close(deq, want_deq, atol=0, rtol=0)
    return deq


# -- (a) quantizers, bit for bit -----------------------------------------------------------------


@given(nqkv_blocks(), NQKV_BITS, DTYPES, SEEDS)
def test_nqkv_quantizer_bit_exact(shape, bits, dtype, seed):
    B, H, N, D, block = shape
    x = _data((B, H, N, D), dtype, seed, block)
    packed, scale, codes, deq = plain_nqkv(x, bits, block)
    _check(x, "nqkv", bits, block, packed, scale, deq)
    assert torch.equal(ref.unpack(ref.quantize(x, lay("nf", bits, block))[0], bits).long(), codes)


@given(token_rows(), DTYPES, SEEDS)
@example((1, 3, 4, 3), torch.float16, 4)  # a subnormal half-precision scale (2.7e-6)
def test_int8_quantizer_bit_exact(shape, dtype, seed):
    x = _data(shape, dtype, seed, shape[-1])
    stored, scale, deq = plain_int8(x)
    got = _check(x, "int8", 8, shape[-1], stored, scale, deq)
    s, fi = scale.float(), torch.finfo(dtype)
    # half a step, plus the rounding of the stored scale (its spacing: relative, or absolute where the scale
    # is subnormal: a half-precision scale below 6.1e-5) and of the output to the cache dtype
    ulp = torch.clamp(s * fi.eps, min=fi.smallest_normal * fi.eps)
    assert bool(((got.float() - x.float()).abs() <= s * 0.5 + 127 * ulp + x.float().abs() * fi.eps + 1e-6).all())


@given(token_rows(), DTYPES, SEEDS)
def test_fp8_quantizer_bit_exact(shape, dtype, seed):
    x = _data(shape, dtype, seed, shape[-1])
    stored, scale, deq = plain_fp8(x)
    _check(x, "fp8", 8, shape[-1], stored, scale, deq)


def sylvester(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n), by Kronecker products in float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / n ** 0.5


@pytest.mark.parametrize("n", [2, 4, 8, 64, 256])
def test_fwht_is_the_orthonormal_hadamard_matrix(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    want = (x.double() @ sylvester(n)).float()
    torch.testing.assert_close(nqkv.fwht(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nqkv.fwht(nqkv.fwht(x)), x, atol=1e-5, rtol=1e-5)  # its own inverse
    # elementwise butterflies: a row's transform does not depend on the rows beside it
    assert torch.equal(nqkv.fwht(x)[1:2, 2:3], nqkv.fwht(x[1:2, 2:3]))


@given(NQKV_BITS, DTYPES, SEEDS, st.sampled_from([(4, 8), (8, 8), (16, 64), (64, 64), (32, 128)]))
def test_nqkv_hadamard_is_nf_of_the_transformed_blocks(bits, dtype, seed, block_dim):
    """NFH = the plain NF quantizer applied to each block's transform, dequantized and transformed back."""
    block, D = block_dim
    x = _data((2, 1, 3, D), dtype, seed, block)
    codes, scale, mn = ref.quantize(x, lay("nfh", bits, block))
    y = nqkv.fwht(x.float().reshape(2, 1, 3, D // block, block)).reshape(2, 1, 3, D)
    lv = nqkv.levels(bits)
    _, want_scale, want_codes, _ = plain_nqkv(y, bits, block)  # scale in float32 here
    assert torch.equal(scale, want_scale.to(dtype))
    # codes from the stored (cache-dtype) scale, as the quantizer computes them
    s = scale.float().repeat_interleave(block, dim=-1)
    u = torch.where(s > 0, y / s, 0.0)
    assert torch.equal(ref.unpack(codes, bits).long(), torch.bucketize(u, nqkv.midpoints(bits)))
    deq = ref.dequantize(codes, scale, mn, lay("nfh", bits, block), D)
    blocks = (lv[ref.unpack(codes, bits).long()] * s).reshape(2, 1, 3, D // block, block)
    assert torch.equal(deq, nqkv.fwht(blocks).reshape(2, 1, 3, D).to(dtype))


@pytest.mark.parametrize("bits", [3, 4])
def test_hadamard_spreads_an_outlier_channel(bits):
    """Keys with two channels 8x the rest (as in real models): NF's block absmax is set by them and the
    other channels lose resolution. In the Hadamard basis the relative error is much smaller, and about
    what it is without outliers (the transform makes a block look like a normal sample)."""
    def rel_err(x, fmt):
        deq = ref.qdq(x, lay(fmt, bits, 64))
        return ((deq - x).norm() / x.norm()).item()

    x = torch.randn(1, 2, 256, 64, generator=torch.Generator().manual_seed(bits))
    plain = rel_err(x, "nfh")
    x[..., [3, 40]] *= 8
    nf, nfh = rel_err(x, "nf"), rel_err(x, "nfh")
    assert nfh < 0.65 * nf and abs(nfh / plain - 1) < 0.1, (nf, nfh, plain)


@pytest.mark.parametrize("method, bits, shape, block, dtype", [  # regression grid beside the strategies
    ("nqkv", 2, (1, 1, 1, 4), 4, torch.float32),
    ("nqkv", 3, (2, 3, 5, 24), 4, torch.float16),
    ("nqkv", 4, (1, 2, 3, 192), 64, torch.bfloat16),
    ("nqkv", 4, (2, 1, 7, 8), 1, torch.float16),
    ("int8", 8, (2, 2, 3, 1), 1, torch.bfloat16),
    ("int8", 8, (1, 3, 4, 17), 17, torch.float16),
    ("fp8", 8, (2, 1, 5, 17), 17, torch.float32),
    ("fp8", 8, (1, 2, 2, 128), 128, torch.bfloat16),
])
def test_quantizer_regression(method, bits, shape, block, dtype):
    x = _data(shape, dtype, 7, block)
    if method == "nqkv":
        packed, scale, _, deq = plain_nqkv(x, bits, block)
    else:
        packed, scale, deq = (plain_int8 if method == "int8" else plain_fp8)(x)
    _check(x, method, bits, block, packed, scale, deq)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_levels(bits):
    lv = nqkv.levels(bits)
    assert lv.dtype == torch.float32 and lv.shape == (2 ** bits,)
    assert bool((lv[1:] > lv[:-1]).all())  # sorted, distinct
    assert int((lv == 0).sum()) == 1 and lv[0].item() == -1.0 and lv[-1].item() == 1.0
    assert int((lv < 0).sum()) == 2 ** (bits - 1) - 1 and int((lv > 0).sum()) == 2 ** (bits - 1)
    assert abs(lv.mean().item()) < 0.15  # symmetric-ish: one more level above 0 than below
    torch.testing.assert_close(lv, torch.tensor(plain_levels(bits)), atol=1e-6, rtol=0)
    if bits == 4:
        torch.testing.assert_close(lv, torch.tensor(NF4), atol=1e-6, rtol=0)
    mids = nqkv.midpoints(bits)
    # exact ties go to the lower level; the extremes map to -1 and 1
    u = torch.cat([mids, torch.tensor([-1.0, 1.0, 0.0])])
    codes = torch.bucketize(u, mids, right=False)
    assert codes[:-3].tolist() == list(range(2 ** bits - 1))
    assert codes[-3:].tolist() == [0, 2 ** bits - 1, 2 ** (bits - 1) - 1]


@pytest.mark.parametrize("method, bits", [("nqkv", 2), ("nqkv", 3), ("nqkv", 4), ("int8", 8), ("fp8", 8)])
def test_zero_block_dequantizes_to_exactly_zero(method, bits):
    x = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    x[0, 1, 2] = 0
    x[0, 0, 1, :4] = 0
    group = 4 if method == "nqkv" else 8
    deq = ref.qdq(x, lay(FORMAT_OF[method], bits, group))
    assert bool((deq[0, 1, 2] == 0).all())
    if method == "nqkv":
        assert bool((deq[0, 0, 1, :4] == 0).all())


# -- (b, c) the compiled tiny decoder against the eager reference ------------------------------------

CASES = {  # tiny models have head_dim 8
    "nqkv-4": dict(method="nqkv", bits=4, block_size=4),
    "nqkv-3": dict(method="nqkv", bits=3, block_size=4),
    "nqkv-2": dict(method="nqkv", bits=2),  # block_size 64 -> min(64, head_dim) = 8
    "nqkv-4/2": dict(method="nqkv", bits=4, v_bits=2, block_size=4),
    "nqkv-4-residual": dict(method="nqkv", bits=4, block_size=4, residual_length=5),
    "nqkv-4-hadamard": dict(method="nqkv", bits=4, block_size=4, hadamard=True),
    "nqkv-3-hadamard-residual": dict(method="nqkv", bits=3, hadamard=True, residual_length=5),
    "int8": dict(method="int8"),
    "fp8": dict(method="fp8"),
}


def _ids(batch, n, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _vs_reference(model, ids, options, prefill):
    """(max error against the eager reference, against full precision), and the compiled cache."""
    cache = _dynamic_cache()
    got = decode(torch.compile(model, backend="kvquant", options=options), ids, prefill, cache)
    want = decode(model, ids, prefill, FakeQuantCache(Config.from_options(options)))
    fp = decode(model, ids, prefill)
    err_ref = max_abs_diff(got, want)
    err_fp = max_abs_diff(got, fp)
    return err_ref, err_fp, cache


def _dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache()


@pytest.mark.parametrize("name", list(CASES))
def test_method_follows_reference(name):
    options = dict(CASES[name], compiler="eager")
    prefill = 8 if "residual" in name else 3  # with a window: a prefill that quantizes too
    err_ref, err_fp, cache = _vs_reference(tiny("llama"), _ids(2, prefill + 20), options, prefill)
    if options.get("hadamard"):
        # attention runs in the Hadamard basis (reference.in_basis), the eager reference transforms the
        # cache back: the same values up to float32 rounding
        assert err_ref < 1e-5 and err_ref < 1e-3 * err_fp, (err_ref, err_fp)
    else:
        assert err_ref == 0.0, err_ref
    assert err_fp > 0.0  # closer to the semantics than to full precision
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert isinstance(keys, KVState) and isinstance(values, KVState)
    R = options.get("residual_length", 0)
    assert keys.n_quantized == values.n_quantized == prefill + 20 - R
    assert counters["kvquant"]["cache_updates_quantized"] > 0


@pytest.mark.parametrize("arch, attn, name", [("gpt2", "eager", "nqkv-3"), ("qwen2", "eager", "fp8"),
                                              ("mistral", "sdpa", "int8")])
def test_method_other_archs(arch, attn, name):
    err_ref, err_fp, _ = _vs_reference(tiny(arch, attn), _ids(1, 15), dict(CASES[name], compiler="eager"), 3)
    assert err_ref == 0.0 and err_fp > 0.0, (err_ref, err_fp)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nqkv-3", "int8", "fp8", "nqkv-4-hadamard"])
def test_triton_read_kernels_end_to_end(name, monkeypatch):
    """KVCOMPILE_KERNELS=triton (interpreted here): the Triton kernels write and read nqkv / int8 / fp8
    codes (nqkv's Hadamard blocks too) behind the compiled model."""
    monkeypatch.setenv("KVCOMPILE_KERNELS", "triton")
    err_ref, err_fp, _ = _vs_reference(tiny("llama"), _ids(2, 14), dict(CASES[name], compiler="eager"), 3)
    c = counters["kvquant"]
    assert c["triton_quantize_calls"] > 0 and c["triton_attention_calls"] > 0
    assert err_ref < 1e-4 and err_ref < 1e-2 * err_fp, (err_ref, err_fp)


@pytest.mark.slow
def test_nqkv_inductor():
    err_ref, err_fp, _ = _vs_reference(tiny("llama"), _ids(2, 23), dict(CASES["nqkv-4"], compiler="inductor"), 3)
    assert err_ref < 1e-4 and err_ref < 1e-2 * err_fp, (err_ref, err_fp)
    assert counters["stats"]["unique_graphs"] <= 5


@pytest.mark.slow
def test_nqkv_beam_search_generate():
    options = dict(CASES["nqkv-4"], compiler="eager")
    model = tiny("llama")
    ids = _ids(1, 5)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=2)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=FakeQuantCache(Config(**options)), **kw)
        model.compile(backend="kvquant", options=options)
        assert torch.equal(model.generate(ids, **kw), want)
    assert counters["kvquant"]["cache_updates_quantized"] > 0


# -- (d) the bytes the state holds -------------------------------------------------------------------

BYTE_CASES = [dict(method="nqkv", bits=4), dict(method="nqkv", bits=3), dict(method="nqkv", bits=2),
              dict(method="nqkv", bits=4, block_size=32, residual_length=128), dict(method="int8"),
              dict(method="fp8")]


@pytest.mark.parametrize("options", BYTE_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_state_bytes_match_the_packed_formula(options):
    """A 16-bit cache, head_dim 64, 100-token prefill then 1500 decode steps: the bytes held are the
    packed size of the codes (3-bit codes 8 in 3 bytes), one scale per block and the residual, within a
    few percent (spare capacity and pad rows), and no minimum is stored."""
    B, H, D, dt = 1, 2, 64, torch.float16
    config = Config(**options)
    layout = layouts(config, D)[0]
    s = kv_store(torch.randn(B, H, 100, D).to(dt), layout)
    for _ in range(1500):
        s = kv_compact(kv_append(s, torch.randn(B, H, 1, D).to(dt)))
    T, R, G = 1600, config.residual_length, layout.group
    sb = config.bits
    nq, nr, cap = s.n_quantized, s.res.shape[2] - 2, s.codes.shape[2] - 2
    assert nq + nr == T and nr == R and s.mn.numel() == 0
    exact = B * H * ((cap + 2) * D * sb // 8 + (cap + 2) * (D // G) * 2 + (nr + 2) * D * 2)
    assert kvcompile.nbytes(s) == exact
    packed = B * H * (nq * D * sb // 8 + nq * (D // G) * 2 + nr * D * 2)
    assert packed <= kvcompile.nbytes(s) <= 1.05 * packed, (kvcompile.nbytes(s), packed)
    if R == 0:  # bits per element: storage bits + 16 / block
        assert sb + 16 / G <= kvcompile.nbytes(s) * 8 / (B * H * T * D) <= 1.05 * (sb + 16 / G)


def test_bits_per_element_of_a_compiled_cache():
    model = tiny("llama", head_dim=8)
    _, _, cache = _vs_reference(model, _ids(1, 40), dict(CASES["nqkv-4"], compiler="eager"), 3)
    bpe = bits_per_element(cache)
    elements = 2 * 2 * 1 * 2 * 40 * 8  # layers, keys and values, B, Hkv, T, D
    assert bpe == kvcompile.cache_nbytes(cache) * 8 / elements
    assert bpe >= 4 + 32 / 4  # float32 cache: 4-bit codes and a 32-bit scale per block of 4 (plus spare rows)
    fp = _dynamic_cache()
    decode(model, _ids(1, 6), 3, fp)
    assert bits_per_element(fp) == 32


# -- (e) options -------------------------------------------------------------------------------------


def test_defaults_per_method():
    assert (Config().bits, Config().residual_length) == (2, 128)
    assert (Config(method="nqkv").bits, Config(method="nqkv").residual_length) == (4, 0)
    assert Config(method="nqkv").block_size == 64
    for m in ("int8", "fp8"):
        assert (Config(method=m).bits, Config(method=m).residual_length) == (8, 0)
    # kivi's residual rule is kivi's: any window for the others
    assert Config(method="nqkv", residual_length=5, group_size=32).residual_length == 5
    k, v = layouts(Config(method="nqkv", block_size=128), 64)  # larger than head_dim: one block
    assert k.group == v.group == 64


def test_block_that_does_not_fit_head_dim_is_named():
    with pytest.raises(ValueError, match=r"block_size 24 does not fit head_dim 64.*1, 2, 4, 8, 16, 32, 64"):
        layouts(Config(method="nqkv", block_size=24), 64)
    with pytest.raises(ValueError, match="v_bits=2 packs 4 codes into a byte, so head_dim must be a multiple of 4; "
                                         "got head_dim 6"):
        layouts(Config(method="nqkv", bits=4, v_bits=2, block_size=2), 6)
    with pytest.raises(ValueError, match="bits=3 packs 8 codes into 3 bytes, so head_dim must be a multiple of 8; "
                                         "got head_dim 12"):
        layouts(Config(method="nqkv", bits=3, block_size=4), 12)


def test_bad_block_through_torch_compile_is_a_value_error():
    f = torch.compile(tiny("llama"), backend="kvquant", options=dict(method="nqkv", block_size=3, compiler="eager"))
    with pytest.raises(ValueError, match="block_size 3 does not fit head_dim 8"):
        f(torch.zeros(1, 3, dtype=torch.long), use_cache=True)


def test_hadamard_block_that_is_not_a_power_of_2_is_named():
    with pytest.raises(ValueError, match=r"hadamard=True needs blocks of a power-of-2 size: min\(block_size 64, "
                                         r"head_dim 48\) = 48 is not \(valid block sizes here: 2, 4, 8, 16\)"):
        layouts(Config(method="nqkv", hadamard=True), 48)
    k, v = layouts(Config(method="nqkv", hadamard=True, block_size=16), 80)
    assert k.format == v.format == "nfh" and k.group == 16
