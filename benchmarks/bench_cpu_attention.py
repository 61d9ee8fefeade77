"""CPU decode attention over a quantized cache: the torch reference (dequantize the whole cache, then
SDPA), the Inductor-compiled path that reads the packed cache (kvcompile/kernels/cpu.py,
KVCOMPILE_KERNELS=cpu), and SDPA over the full-precision cache (no quantization), at SmolLM2-135M's
attention shape (Hq 9, Hkv 3, head_dim 64, float32), one query per sequence. Median of interleaved
repeats (the settings alternate, so a noisy neighbour hits them alike). Prints a table, writes JSON.

The compiled path is warmed up as decode meets it: compiled afresh for each shape, first at T - 64 tokens,
then at T, so the graph timed is the one dynamic in the token count only (batch and heads static), as in
a decode loop. (A graph that has also seen another batch size is dynamic in B too, and its loops are
several times slower: 31.7 against 2.5-4.4 ms for kivi-2 at 8x2048 on this machine.)

    python benchmarks/bench_cpu_attention.py [--shapes 1x512 8x2048] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcompile import Config  # noqa: E402
from kvcompile.kernels import cpu, reference as ref  # noqa: E402
from kvcompile.layout import PAD, TOKEN_AXIS, Packed  # noqa: E402
from kvcompile.methods import layouts  # noqa: E402

HQ, HKV, D = 9, 3, 64
METHODS = {"kivi-2": dict(method="kivi", bits=2), "kivi-4": dict(method="kivi", bits=4), "int8": dict(method="int8"),
           "nqkv-2": dict(method="nqkv", bits=2),
           "nqkv-4": dict(method="nqkv", bits=4), "fp8": dict(method="fp8")}


def cache(lay, B: int, T: int) -> Packed:
    """T tokens quantized by the reference from random data (the window full, token groups whole)."""
    nr = min(lay.residual, T)
    nq = T - nr
    if lay.axis == TOKEN_AXIS:
        nq = nq // lay.group * lay.group
    x = torch.randn(B, HKV, T, D)
    c, s, m = ref.quantize(x[:, :, :nq], lay)
    return Packed(*(ref.pad(t) for t in (c, s, m, x[:, :, nq:])), lay, nq)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["1x512", "8x2048"], help="BxT")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_attention.json"))
    args = ap.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    rows = []
    with torch.no_grad():
        for shape in args.shapes:
            B, T = map(int, shape.split("x"))
            torch._dynamo.reset()  # a fresh compiled path per shape: dynamic in the tokens only, as in decode
            cpu._compiled.cache_clear()
            q = torch.randn(B, HQ, 1, D)
            K, V = torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
            fns = {"sdpa fp32 (no quantization)": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, K, V, enable_gqa=True)}
            for name, opts in METHODS.items():
                lk, lv = layouts(Config(**opts), D)
                cpu.attention(q, cache(lk, B, T - 64), cache(lv, B, T - 64))  # compiles for T - 64, then T: dynamic T
                k, v = cache(lk, B, T), cache(lv, B, T)
                fns[f"{name} reference"] = lambda k=k, v=v: ref.attention(q, k, v)
                fns[f"{name} compiled"] = lambda k=k, v=v: cpu.attention(q, k, v)
                err = (cpu.attention(q, k, v) - ref.attention(q, k, v)).abs().max().item()
                rows.append(dict(B=B, T=T, setting=f"{name} compiled vs reference", max_abs_diff=err))
            for fn in fns.values():  # warm up (compiles)
                fn()
            times = {n: [] for n in fns}
            for _ in range(args.reps):
                for n, fn in fns.items():
                    times[n].append(timed(fn))
            base = statistics.median(times["sdpa fp32 (no quantization)"])
            for n, ts in times.items():
                med = statistics.median(ts)
                rows.append(dict(B=B, T=T, setting=n, ms=med * 1e3, vs_sdpa=med / base))
    print(f"CPU decode attention, Hq {HQ} / Hkv {HKV}, head_dim {D}, float32, L=1; {machine}; torch {torch.__version__}")
    print(f"{'BxT':>8} {'setting':<32} {'ms':>9} {'vs sdpa fp32':>13}")
    for r in rows:
        if "ms" in r:
            print(f"{r['B']}x{r['T']:<6} {r['setting']:<32} {r['ms']:>9.3f} {r['vs_sdpa']:>12.2f}x")
    for r in rows:
        if "max_abs_diff" in r:
            print(f"{r['B']}x{r['T']:<6} {r['setting']:<32} max |diff| {r['max_abs_diff']:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(machine=machine, torch=torch.__version__, command=" ".join(sys.argv),
                                              results=rows), indent=2))


if __name__ == "__main__":
    main()
