"""`kvquant bench`'s measurement (evaluate.fixed_budget): the largest batch each setting's KV cache fits in a
memory budget, and the decode throughput there, on a tiny random decoder (the kvquant ops, no Inductor)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvcompile import evaluate as ev

from models import VOCAB, tiny

SETTINGS = {"fp": None, "kivi-2": {"method": "kivi", "bits": 2, "group_size": 16, "residual_length": 16},
            "int8": {"method": "int8"}}


def _compile(model, options):
    return model if options is None else torch.compile(model, backend="kvquant", options={**options, "compiler": "eager"})


@pytest.fixture(scope="module")
def points():
    model = tiny("llama", heads=4, kv_heads=2, head_dim=16, layers=2)
    ids = torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(0))
    fp_bytes = 2 * 2 * 2 * (96 + 3) * 16 * 4  # layers x (K, V) x heads x tokens after 3 steps x head_dim x fp32
    return ev.fixed_budget(model, ids, SETTINGS, budget=4 * fp_bytes + 100, steps=2, warmup=1, compile_fn=_compile), \
        4 * fp_bytes + 100


def test_each_setting_is_measured_up_to_the_largest_batch_that_fits(points):
    points, budget = points
    for name in SETTINGS:
        mine = [p for p in points if p.name == name]
        assert [p.batch for p in mine] == ev.budget_batches(mine[0].max_batch)
        assert mine[0].max_batch == budget // mine[0].bytes_per_sequence
        for p in mine:  # the repeated cache holds batch copies of one sequence's, within the budget
            assert p.kv_bytes == p.batch * p.bytes_per_sequence <= budget
            assert p.tokens_per_s > 0
    best = {p.name: p.max_batch for p in points}
    assert best["fp"] == 4  # the budget was made for 4 full-precision sequences
    assert best["int8"] >= 2 * best["fp"] and best["kivi-2"] > best["int8"]


def test_budget_table_and_plot(points, tmp_path):
    points, budget = points
    table = ev.budget_table(points)
    assert all(name in table for name in SETTINGS) and "vs fp" in table
    path = tmp_path / "bench.png"
    drew = ev.budget_plot(points, budget, "test", str(path))
    assert drew == (importlib.util.find_spec("matplotlib") is not None)
    if drew:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_budget_below_one_sequence_is_an_error_that_names_the_bytes():
    model = tiny("llama", layers=1)
    with pytest.raises(ValueError, match="over the budget of 1,000 bytes"):
        ev.fixed_budget(model, torch.zeros(1, 64, dtype=torch.long), {"fp": None}, budget=1000, steps=1, warmup=0,
                        compile_fn=_compile)
