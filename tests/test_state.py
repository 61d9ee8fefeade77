"""The quantized state outside compiled graphs: every op it does not implement runs on its
dequantized value; the ones it implements keep it packed."""

from __future__ import annotations


import pytest
import torch

from kvcompile import KVState, nbytes
from kvcompile.config import Config
from kvcompile.methods import layouts
from kvcompile.state import kv_append, kv_compact, kv_store


def _state(role="k", T=21, bits=2):
    k_layout, v_layout = layouts(Config(bits=bits, group_size=4, residual_length=8), 8)
    layout = k_layout if role == "k" else v_layout
    x = torch.randn(3, 2, T, 8, generator=torch.Generator().manual_seed(0))
    return kv_store(x, layout), x


@pytest.mark.parametrize("role", ["k", "v"])
def test_logical_view(role):
    s, x = _state(role)
    assert isinstance(s, KVState) and s.shape == x.shape and s.dtype == x.dtype
    full = s.dequantize()
    # residual tokens are exact, quantized ones within the quantization error
    n_res = s.res.shape[2] - 2
    assert torch.equal(full[:, :, -n_res:], x[:, :, -n_res:])
    assert (full - x).abs().max() < (x.max() - x.min()) / 3
    # ops it does not implement: on the dequantized value
    torch.testing.assert_close(s + 1, full + 1, atol=0, rtol=0)
    torch.testing.assert_close(s[:, :, :-3], full[:, :, :-3], atol=0, rtol=0)  # DynamicCache.crop
    torch.testing.assert_close(s.sum(), full.sum(), atol=0, rtol=0)
    assert "KVState(" in repr(s) and "bits=2" in repr(s)


def test_ops_that_keep_it_packed():
    s, _ = _state()
    full = s.dequantize()
    for out in (s.clone(), s.detach(), s.to("cpu"), s.index_select(0, torch.tensor([2, 0]))):
        assert isinstance(out, KVState) and nbytes(out) <= nbytes(s)
    torch.testing.assert_close(s.index_select(0, torch.tensor([2, 0])).dequantize(), full[[2, 0]], atol=0, rtol=0)
    assert not isinstance(s.to(torch.float64), KVState)  # leaving the dtype leaves the state
    torch.testing.assert_close(s.to(torch.float64), full.double(), atol=0, rtol=0)


def test_in_place_ops_are_refused():
    s, _ = _state()
    with pytest.raises(RuntimeError, match="in-place"):
        s.add_(1)


@pytest.mark.parametrize("role", ["k", "v"])
def test_append_then_compact_follows_the_residual_rules(role):
    s, x = _state(role, T=5)  # keys: 5 % 8 stay fp; values: all within the window
    assert s.n_quantized == 0 and s.res.shape[2] - 2 == 5
    for t in range(5, 20):
        s = kv_append(s, torch.randn(3, 2, 1, 8))
        n_q, n_res = s.n_quantized, s.res.shape[2] - 2
        assert n_q + n_res == t + 1 == s.shape[2]  # attention reads all tokens before the flush
        s = kv_compact(s)
        n_q, n_res = s.n_quantized, s.res.shape[2] - 2
        assert s.shape[2] == t + 1 and s.codes.shape[2] - 2 >= n_q
        if role == "k":
            assert n_res == (t + 1) % 8 and n_q == t + 1 - n_res
        else:
            assert n_res == min(t + 1, 8)


@pytest.mark.parametrize("bits", [2, 4])
def test_spare_capacity_is_a_few_percent_and_appends_in_place(bits):
    """Default options, 1 layer's keys and values over 1500 decode steps after a 100-token prefill:
    the bytes held stay within a few percent of the packed size, and most steps write in place."""
    k_layout, v_layout = layouts(Config(bits=bits), 64)
    B, H, D = 1, 2, 64
    states = [kv_store(torch.randn(B, H, 100, D), lay) for lay in (k_layout, v_layout)]
    moved = 0
    for t in range(1500):
        new = []
        for s in states:
            ptr = s.codes.data_ptr()
            s = kv_compact(kv_append(s, torch.randn(B, H, 1, D)))
            moved += s.codes.data_ptr() != ptr
            new.append(s)
        states = new
    T = 1600
    for s, lay in zip(states, (k_layout, v_layout)):
        nq, nr = s.n_quantized, s.res.shape[2] - 2
        scale_rows = nq // 32 if lay.role == "k" else nq
        scale_cols = D if lay.role == "k" else D // 32
        formula = B * H * (nq * D * bits // 8 + 2 * scale_rows * scale_cols * 4 + nr * D * 4)
        assert nq + nr == T
        assert formula <= nbytes(s) <= 1.05 * formula, (nbytes(s), formula)
    assert moved < 0.05 * 2 * 1500  # storage reallocated on a few percent of the steps at most


def test_dynamic_marks_are_maybe_mark_dynamics():
    """A state marks its token and batch dims, and every inner tensor's dims 0 and 2, as
    torch._dynamo.maybe_mark_dynamic would (state._mark_dynamic sets those marks itself: the function's
    fan-out over a subclass's inner tensors cost ~4.5 us a dim)."""
    from kvcompile.state import _mark_dynamic

    def marks(t):
        return {k: v for k, v in vars(t).items() if k.startswith("_dynamo") or k == "_has_dynamo_dim_marking"}

    a, b = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    torch._dynamo.maybe_mark_dynamic(a, 0)
    torch._dynamo.maybe_mark_dynamic(a, 2)
    _mark_dynamic(b, (0, 2))
    assert marks(a) and marks(a) == marks(b)
    s, _ = _state()
    assert s._dynamo_weak_dynamic_indices == set(s.kv_layout.dynamic_dims) == {0, 2}
    for t in (s.codes, s.scale, s.mn, s.res):
        assert t._dynamo_weak_dynamic_indices == {0, 2}
