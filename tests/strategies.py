"""Hypothesis strategies that build valid shapes by construction (no `assume`)."""

from __future__ import annotations

from hypothesis import strategies as st

BITS = st.sampled_from([2, 4])


@st.composite
def token_groups(draw):
    """(B, H, N, D, group) for keys: N a multiple of the group (whole groups of tokens)."""
    group = draw(st.sampled_from([1, 2, 4, 8, 32]))
    n_groups = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8, 12, 16, 64]))
    return draw(st.integers(1, 2)), draw(st.integers(1, 3)), n_groups * group, d, group


@st.composite
def channel_groups(draw):
    """(B, H, N, D, group) for values: the group divides D."""
    group = draw(st.sampled_from([4, 8, 16, 32]))
    d = group * draw(st.integers(1, 3))
    return draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)), d, group


@st.composite
def kivi_options(draw):
    """Valid kivi options for a model of head_dim 8: residual a multiple of the group."""
    group = draw(st.sampled_from([2, 4, 8]))
    return dict(method="kivi", bits=draw(BITS), v_bits=draw(BITS), group_size=group,
                residual_length=group * draw(st.integers(1, 3)))


NQKV_BITS = st.sampled_from([2, 3, 4])


@st.composite
def nqkv_blocks(draw):
    """(B, H, N, D, block) for nqkv: the block divides D, and D holds whole bytes of 2-, 3- and 4-bit
    codes (a multiple of 8: 3-bit codes pack 8 in 3 bytes)."""
    block = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    d = max(block, 8) * draw(st.integers(1, 3))
    return draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)), d, block


@st.composite
def token_rows(draw):
    """(B, H, N, D) for int8 / fp8 (one group per token: any head_dim, odd ones included)."""
    d = draw(st.sampled_from([1, 3, 8, 17, 64, 96]))
    return draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)), d


LAYOUTS = ["bhtd", "bthd", "tbhd", "btc", "keys_t"]
REPEATS = ["none", "interleave", "index", "unsqueeze", "contiguous"]
ATTENTION = ["sdpa", "matmul", "at", "method", "bmm", "einsum"]


@st.composite
def idioms(draw):
    """A hand-written decoder's idioms (examples/decoders.py Idiom), valid by construction: einsum reads
    the cache with its own heads (no repeat)."""
    from decoders import Idiom

    attention = draw(st.sampled_from(ATTENTION))
    return Idiom(layout=draw(st.sampled_from(LAYOUTS)), attention=attention,
                 repeat=draw(st.sampled_from(["none"] if attention == "einsum" else REPEATS)),
                 scale=draw(st.sampled_from(["scores", "q", "k"])), softmax32=draw(st.booleans()),
                 rope=draw(st.sampled_from(["post", "pre"])), cache=draw(st.sampled_from(["tuple", "object"])),
                 kv_heads=draw(st.sampled_from([1, 2, 4])))
