"""End-to-end generation with SmolLM2-135M: time per decoded token and compiled graphs, for plain
Inductor (no quantization) and the kvquant backend (none, kivi-4, kivi-2), through `generate()`.

    python benchmarks/bench_generate.py [--new-tokens 200] [--out benchmarks/results/generate.json]

Each setting: a fresh Dynamo, one warm-up generate (compiles), then a timed greedy generate of
--new-tokens tokens (prompt ~30 tokens), both with a DynamicCache passed in (so the timed run
finds every graph compiled). Graphs = Dynamo's unique compiled graphs for the generation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvcompile import cache_nbytes  # noqa: E402
from kvcompile import evaluate as ev  # noqa: E402

SETTINGS = {
    "inductor (fp)": None,
    "kvquant none": {"method": "none"},
    "kvquant kivi-4": {"method": "kivi", "bits": 4},
    "kvquant kivi-2": {"method": "kivi", "bits": 2},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "generate.json"))
    args = p.parse_args()
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    model, tok = ev.load_smollm2()
    ids = ev.prompt_ids(tok, "Write a short essay on the hacker ethic.")
    rows = []
    for name, options in SETTINGS.items():
        torch._dynamo.reset()
        counters.clear()
        if options is None:
            model.compile()
        else:
            model.compile(backend="kvquant", options=options)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        with torch.no_grad():
            model.generate(ids, past_key_values=DynamicCache(), **kw)  # compile (same guards as below)
            cache = DynamicCache()
            start = time.perf_counter()
            out = model.generate(ids, past_key_values=cache, **kw)
            elapsed = time.perf_counter() - start
        rows.append(dict(setting=name, ms_per_token=1e3 * elapsed / args.new_tokens,
                         graphs=counters["stats"]["unique_graphs"], kv_bytes=cache_nbytes(cache),
                         tokens=out.shape[1]))
        print(rows[-1], flush=True)
    base = rows[0]["ms_per_token"]
    print(f"\n{args.new_tokens}-token greedy generate(), SmolLM2-135M float32, {ev.machine()}, torch {torch.__version__}")
    print(f"{'setting':<16} {'ms/token':>9} {'vs fp':>7} {'graphs':>7} {'KV bytes':>12}")
    for r in rows:
        print(f"{r['setting']:<16} {r['ms_per_token']:>9.1f} {r['ms_per_token'] / base:>6.2f}x {r['graphs']:>7} "
              f"{r['kv_bytes']:>12,}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(machine=ev.machine(), torch=torch.__version__, new_tokens=args.new_tokens, rows=rows), f,
                  indent=2)


if __name__ == "__main__":
    main()
