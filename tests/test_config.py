"""Bad options raise a ValueError naming the bad value and the valid ones."""

from __future__ import annotations

import pytest
import torch

from kvcompile import Config
from models import tiny


@pytest.mark.parametrize("options, words", [
    (dict(method="kivy"), ["'kivy'", "'kivi'", "'none'"]),
    (dict(method="nqkv", bits=8), ["bits", "8", "2, 3, 4", "'nqkv'"]),
    (dict(method="nqkv", bits=5), ["bits", "5", "2, 3, 4", "'nqkv'"]),
    (dict(method="nqkv", v_bits=8), ["v_bits", "8", "2, 3, 4"]),
    (dict(method="int8", bits=4), ["bits", "4", "8", "'int8'"]),
    (dict(method="fp8", k_bits=16), ["k_bits", "16", "8", "'fp8'"]),
    (dict(method="nqkv", block_size=0), ["block_size", "0"]),
    (dict(method="nqkv", block_size="64"), ["block_size", "'64'"]),
    (dict(method="nqkv", residual_length=-1), ["residual_length", "-1", ">= 0", "'nqkv'"]),
    (dict(method="int8", residual_length=2.5), ["residual_length", "2.5"]),
    (dict(method="kivi", hadamard=True), ["hadamard", "'nqkv'", "'kivi'"]),
    (dict(method="nqkv", hadamard="yes"), ["hadamard", "'yes'", "True or False"]),
    (dict(bits=3), ["bits", "3", "2, 4"]),
    (dict(k_bits=8), ["k_bits", "8", "2, 4"]),
    (dict(v_bits=1), ["v_bits", "1", "2, 4"]),
    (dict(bits="2"), ["bits", "'2'"]),
    (dict(group_size=0), ["group_size", "0"]),
    (dict(group_size=32, residual_length=100), ["residual_length", "100", "multiple", "32"]),
    (dict(compiler="cudagraphs"), ["'cudagraphs'", "'inductor'", "'aot_eager'", "'eager'"]),
    (dict(bitz=2), ["'bitz'", "method", "bits", "group_size", "residual_length", "compiler"]),
])
def test_bad_option_is_named(options, words):
    with pytest.raises(ValueError) as e:
        Config.from_options(options)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_defaults():
    c = Config.from_options(None)
    assert (c.method, c.bits, c.group_size, c.residual_length, c.compiler) == ("kivi", 2, 32, 128, "inductor")
    assert Config(bits=4, v_bits=2).key_bits == 4 and Config(bits=4, v_bits=2).value_bits == 2
    with pytest.raises(Exception):
        c.bits = 4  # frozen


def test_bad_option_through_torch_compile_is_a_value_error():
    model = tiny("llama")
    f = torch.compile(model, backend="kvquant", options={"method": "kivi", "bits": 5})
    with pytest.raises(ValueError, match="bits must be one of 2, 4 for method 'kivi'; got 5"):
        f(torch.zeros(1, 3, dtype=torch.long))


def test_group_that_does_not_fit_head_dim_is_a_value_error():
    model = tiny("llama", head_dim=8)  # values: groups of min(12, 8) = 8 channels fit; 6 do not
    f = torch.compile(model, backend="kvquant", options=dict(group_size=6, residual_length=12, compiler="eager"))
    with pytest.raises(ValueError, match="group_size 6 does not fit head_dim 8"):
        f(torch.zeros(1, 3, dtype=torch.long), use_cache=True)
