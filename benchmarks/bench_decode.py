"""Decode time per step of SmolLM2-135M (float32) at batch x context shapes, each setting in its own
process: plain eager, plain Inductor, the kvquant backend (none, kivi-2, kivi-4, nqkv-4, int8) and
transformers' QuantizedCache (quanto 4-bit, eager: the peer a user would otherwise pick).

    python benchmarks/bench_decode.py [--shapes 1x512 1x4096 8x2048 16x4096] [--settings ...] [--steps 24] [--rounds 1]

A worker prefills `context` tokens of the long prompt (evaluate.long_prompt, repeated per sequence) into
a DynamicCache (or the QuantizedCache), then runs a manual decode loop: greedy next token, one forward
of one token per step. The first steps compile every graph the loop meets (their time, and the
prefill's, are reported as time to first token and warm-up); the median of the last `--steps` steps is
the decode time. Settings run in the order given, one process each, so two never share the 2 cores;
`--rounds N` runs the whole list N times (settings interleaved) and reports medians over the rounds.
`--cold` gives every worker an empty Inductor (and Triton) cache, so that time to first token includes every
compile (without it, a setting's graphs may come from an earlier run's cache, and TTFT depends on what ran before).
Prints one table, writes JSON (incrementally, after every worker).

`--profile` also runs PROFILED more steps under torch.profiler and reports, per decode step, what it
launches and allocates: calls of the compiled graphs, of kvcompile's ops (kvquant::*) and of aten ops
(outside the compiled graphs' own kernels: the ops' torch reference and the glue between ops), Dynamo
cache lookups, allocations (aten::empty*) and the bytes they allocate, and the self time by op.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "eager fp32": ("eager", None),
    "inductor fp32": ("inductor", None),
    "kvquant none": ("kvquant", {"method": "none"}),
    "kvquant kivi-2": ("kvquant", {"method": "kivi", "bits": 2}),
    "kvquant kivi-4": ("kvquant", {"method": "kivi", "bits": 4}),
    "kvquant nqkv-4": ("kvquant", {"method": "nqkv", "bits": 4}),
    "kvquant int8": ("kvquant", {"method": "int8"}),
    "quanto-4 (QuantizedCache, eager)": ("quanto", None),
}
PROFILED = 4  # steps under the profiler (--profile)
WARMUP = 4  # decode steps before timing: the graphs a loop meets (prefill, first decode, dynamic decode, growth)


def profile_steps(step, n: int) -> dict:
    """Per-step counts of what `step` (one decode step) launches and allocates, from torch.profiler."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()

    def per_step(pred, attr="count"):
        return sum(getattr(e, attr) for e in events if pred(e.key)) / n

    return dict(
        graph_calls=per_step(lambda k: k.startswith("## Call CompiledFxGraph")),
        kvquant_calls={e.key: e.count / n for e in events if e.key.startswith("kvquant::")},
        aten_calls=per_step(lambda k: k.startswith("aten::")),
        dynamo_lookups=per_step(lambda k: k == "TorchDynamo Cache Lookup"),
        allocations=per_step(lambda k: k.startswith("aten::empty")),
        alloc_mb=per_step(lambda k: k.startswith("aten::empty"), "self_cpu_memory_usage") / 1e6,
        self_ms={e.key: e.self_cpu_time_total / n / 1e3 for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]},
    )


def worker(setting: str, batch: int, context: int, steps: int, profiled: bool = False) -> dict:
    import torch
    from transformers import DynamicCache

    from kvcompile import cache_nbytes
    from kvcompile import evaluate as ev

    kind, options = SETTINGS[setting]
    model, tok = ev.load_smollm2(torch.float32)
    ids = tok(ev.long_prompt(tok, context), return_tensors="pt").input_ids[:, :context].repeat(batch, 1)
    if kind == "inductor":
        fn = torch.compile(model)
    elif kind == "kvquant":
        fn = torch.compile(model, backend="kvquant", options=options)
    else:
        fn = model
    if kind == "quanto":
        from transformers import QuantizedCache

        cache = QuantizedCache("quanto", model.config, nbits=4)
    else:
        cache = DynamicCache()
    times = []
    with torch.no_grad():
        t0 = time.perf_counter()
        # logits of the last position only: all of them would be batch x context x 49,152 floats (12.9 GB at 16x4096)
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        ttft = time.perf_counter() - t0
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal out, nxt
            out = fn(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)

        for _ in range(WARMUP + steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        counts = profile_steps(step, PROFILED) if profiled else {}
    kv = cache_nbytes(cache) if kind != "quanto" else ev.quantized_cache_nbytes(cache)
    return dict(setting=setting, batch=batch, context=context, ms_per_step=statistics.median(times[WARMUP:]) * 1e3,
                warmup_s=sum(times[:WARMUP]), ttft_s=ttft, kv_bytes=kv, threads=torch.get_num_threads(),
                kernels=os.environ.get("KVCOMPILE_KERNELS", "auto"), **counts)


def summarize(runs: list) -> list:
    """One row per (shape, setting): the first round's row (its profile counts), with the median over rounds of
    ms per step, TTFT and warm-up, and every round's ms per step (`ms_per_step_rounds`)."""
    rows = {}
    for r in runs:
        key = (r["batch"], r["context"], r["setting"])
        if "error" in r:
            rows.setdefault(key, r)
            continue
        row = rows.get(key)
        if row is None or "error" in row:
            rows[key] = row = dict(r, ms_per_step_rounds=[], ttft_s_rounds=[], warmup_s_rounds=[])
        for name in ("ms_per_step", "ttft_s", "warmup_s"):
            row[name + "_rounds"].append(r[name])
            row[name] = statistics.median(row[name + "_rounds"])
    return list(rows.values())


def relative(r: dict, rows: list, base: str) -> str:
    """r's time per step over the `base` setting's at the same shape ("-" if that was not run)."""
    same = [x for x in rows if x.get("setting") == base and x["batch"] == r["batch"] and x["context"] == r["context"]
            and "ms_per_step" in x]
    return f"{r['ms_per_step'] / same[0]['ms_per_step']:.2f}x" if same else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["1x512", "1x4096", "8x2048", "16x4096"], help="BxT")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every setting this many times, interleaved; report the median over rounds")
    ap.add_argument("--profile", action="store_true", help="also count what a decode step launches and allocates")
    ap.add_argument("--cold", action="store_true", help="an empty Inductor cache for every worker: TTFT with every compile")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    ap.add_argument("--worker", nargs=3, metavar=("SETTING", "BATCH", "CONTEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        setting, b, t = args.worker
        print("RESULT " + json.dumps(worker(setting, int(b), int(t), args.steps, args.profile)))
        return
    from kvcompile import evaluate as ev

    runs = []  # one row per worker
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for rnd in range(args.rounds):
        for shape in args.shapes:
            b, t = shape.split("x")
            for setting in args.settings:
                print(f"round {rnd + 1}/{args.rounds}: {shape} {setting} ...", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--steps", str(args.steps), *(["--profile"] if args.profile else []),
                       "--worker", setting, b, t]
                env, cache = dict(os.environ), None
                if args.cold:  # Inductor's FX graph, AOTAutograd and kernel caches all live under this folder
                    cache = tempfile.mkdtemp(prefix="kvquant-bench-cache-")
                    env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
                try:
                    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                finally:
                    if cache:
                        shutil.rmtree(cache, ignore_errors=True)
                lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
                if run.returncode or not lines:
                    runs.append(dict(setting=setting, batch=int(b), context=int(t), error=run.stderr[-2000:]))
                else:
                    runs.append(json.loads(lines[-1][7:]))
                rows = summarize(runs)
                out.write_text(json.dumps(dict(machine=ev.machine(), command=" ".join(sys.argv), cold=args.cold, results=rows),
                                          indent=2))
    print(f"SmolLM2-135M float32 decode, {ev.machine()}, KVCOMPILE_KERNELS={os.environ.get('KVCOMPILE_KERNELS', 'auto')}; "
          f"median ms per step over {args.steps} steps" + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
          + ("; TTFT and warm-up from an empty Inductor cache" if args.cold else ""))
    print(f"{'shape':>8} {'setting':<34} {'ms/step':>9} {'vs inductor':>12} {'vs eager':>9} {'TTFT s':>8} {'warm-up s':>10} {'KV MB':>8}  {'each round' if args.rounds > 1 else ''}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']}x{r['context']:<6} {r['setting']:<34} failed: {r['error'].splitlines()[-1:]}")
            continue
        print(f"{r['batch']}x{r['context']:<6} {r['setting']:<34} {r['ms_per_step']:>9.1f} "
              f"{relative(r, rows, 'inductor fp32'):>12} {relative(r, rows, 'eager fp32'):>9} "
              f"{r['ttft_s']:>8.1f} {r['warmup_s']:>10.1f} {r['kv_bytes'] / 1e6:>8.1f}  "
              f"{' '.join(f'{x:.1f}' for x in r['ms_per_step_rounds']) if args.rounds > 1 else ''}")
    if args.profile:
        print(f"\nper decode step, under torch.profiler ({PROFILED} steps):")
        print(f"{'shape':>8} {'setting':<34} {'graphs':>6} {'kvquant ops':>11} {'aten ops':>8} {'lookups':>7} "
              f"{'allocs':>6} {'alloc MB':>8}  top self time (ms)")
        for r in rows:
            if "graph_calls" in r:
                top = ", ".join(f"{k.replace('## Call CompiledFxGraph', 'graph')[:28]} {v:.1f}"
                                for k, v in list(r["self_ms"].items())[:4])
                print(f"{r['batch']}x{r['context']:<6} {r['setting']:<34} {r['graph_calls']:>6.0f} "
                      f"{sum(r['kvquant_calls'].values()):>11.0f} {r['aten_calls']:>8.0f} {r['dynamo_lookups']:>7.0f} "
                      f"{r['allocations']:>6.0f} {r['alloc_mb']:>8.1f}  {top}")


if __name__ == "__main__":
    main()
