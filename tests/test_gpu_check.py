"""scripts/gpu_check.sh, the one command a lent GPU runs, dry-run on the CPU (Triton interpreter, tiny
shapes) so that it cannot rot between GPU sessions: every step runs and passes, and writes what the
device tool brings back (at most 8 files under $OUT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_SMOKE="1", PYTHON=sys.executable)
    env.pop("KVCOMPILE_KERNELS", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "gpu_check: PASS" in run.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"env.txt", "tests.txt", "attention.json", "e2e.json", "decode.json"} <= set(files), files
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["results"] and all(r["passed"] and r["counters"]["triton_attention_calls"] > 0 for r in e2e["results"])
    attention = json.loads((tmp_path / "attention.json").read_text())
    methods = {r["method"] for r in attention["results"]}
    assert {"kivi-2", "kivi-4", "nqkv-4", "int8", "fp8"} <= methods, methods
    assert "passed" in (tmp_path / "tests.txt").read_text()
    decode = json.loads((tmp_path / "decode.json").read_text())
    settings = {r["setting"] for r in decode["rows"]}
    assert settings == {"bf16", "kivi-2", "kivi-4", "int8"} and decode["budget_rows"], decode
    assert all(r["tokens_per_s"] > 0 and r["kv_bytes"] > 0 for r in decode["rows"] + decode["budget_rows"])
    assert all(r["budget_batch"] == r["batch"] >= 1 for r in decode["budget_rows"])
