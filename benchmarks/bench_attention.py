"""Decode attention over a KIVI-quantized KV cache (Triton, fused dequantization) vs fp16 SDPA.

For each (B, T): time of one decode step's attention (L = 1, Hq = 32 query heads over Hkv = 8 KV
heads, head_dim 128) and the bandwidth it achieves, counted as the bytes of the cache it must
read (packed codes + scales + minimums + the fp16 residual, or the fp16 K and V for SDPA) divided
by the time; beside it, the device's copy bandwidth (a large tensor clone, read + write) so the
table shows how close each kernel gets to the memory system.

KIVI layout as kvcompile stores it: keys per channel in groups of 32 tokens, values per token in
groups of 32 channels, a 128-token residual window (keys: 64 residual tokens, mid-window; values:
the newest 128).

    python benchmarks/bench_attention.py                     # CUDA: the full grid
    python benchmarks/bench_attention.py --sweep             # also try block_n x num_warps
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke   # CPU, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HQ, HKV, D = 32, 8, 128
GROUP, RESIDUAL, NR_K = 32, 128, 64


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/results/attention.json, or attention_smoke.json on the CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), seconds")
    p.add_argument("--sweep", action="store_true", help="CUDA: also time block_n in (16, 32, 64) x num_warps (4, 8)")
    p.add_argument("--T", type=int, nargs="*", help="override the context lengths")
    p.add_argument("--B", type=int, nargs="*", help="override the batch sizes")
    return p.parse_args()


ARGS = parse_args()
CUDA = torch.cuda.is_available() and not ARGS.smoke
if not CUDA:
    # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from kvcompile.kernels import reference as ref  # noqa: E402
from kvcompile.kernels import triton_attention as ta  # noqa: E402
from kvcompile.layout import CHANNEL_AXIS, PAD, TOKEN_AXIS, Layout, Packed  # noqa: E402


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def bench(fn) -> float:
    """Seconds per call: triton.testing.do_bench (median) on CUDA, perf_counter on the CPU."""
    if CUDA:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()  # compile / warm up
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or (time.perf_counter() - t0 < 0.2 and reps < 50):
        fn()
        reps += 1
    return (time.perf_counter() - t0) / reps


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large clone (read + write)."""
    n = (1 << 30) if CUDA else (1 << 24)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    t = bench(lambda: x.clone())
    return 2 * n / t


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), Triton interpreter"


# ----------------------------------------------------------------------------------------------
# caches
# ----------------------------------------------------------------------------------------------


def kivi_cache(B: int, T: int, bits: int, device, dtype=torch.float16):
    """Packed keys (token groups) and values (channel groups) holding T tokens, with random codes: the
    kernel's time does not depend on the values."""
    per = 8 // bits
    nr_k = min(NR_K, T)
    nq_k = ((T - nr_k) // GROUP) * GROUP
    nr_k = T - nq_k
    nr_v = min(RESIDUAL, T)
    nq_v = T - nr_v

    def rnd_codes(n):
        return torch.randint(0, 256, (B, HKV, PAD + n, D // per), dtype=torch.uint8, device=device)

    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    k = (rnd_codes(nq_k), rnd(B, HKV, PAD + nq_k // GROUP, D).abs() * 0.1, rnd(B, HKV, PAD + nq_k // GROUP, D),
         rnd(B, HKV, PAD + nr_k, D))
    v = (rnd_codes(nq_v), rnd(B, HKV, PAD + nq_v, D // GROUP).abs() * 0.1, rnd(B, HKV, PAD + nq_v, D // GROUP),
         rnd(B, HKV, PAD + nr_v, D))
    return (Packed(*k, Layout("kivi", "k", "kivi", bits, GROUP, TOKEN_AXIS, RESIDUAL), nq_k),
            Packed(*v, Layout("kivi", "v", "kivi", bits, GROUP, CHANNEL_AXIS, RESIDUAL), nq_v))


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------


def sdpa_fp16(B: int, T: int, device, dtype):
    q = torch.randn(B, HQ, 1, D, dtype=dtype, device=device)
    k = torch.randn(B, HKV, T, D, dtype=dtype, device=device)
    v = torch.randn(B, HKV, T, D, dtype=dtype, device=device)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        how = "enable_gqa"
    except (TypeError, RuntimeError):  # older torch: repeat the KV heads as transformers does
        kr, vr = ref.repeat_heads(k, HQ), ref.repeat_heads(v, HQ)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr)  # noqa: E731
        how = "repeat_kv"
    return bench(fn), nbytes((k, v)) + nbytes((q,)) * 2, how


def run_config(B: int, T: int, device, dtype, copy_bw: float, rows: list):
    def record(method, seconds, nbytes_read, **extra):
        bw = nbytes_read / seconds
        rows.append(dict(B=B, T=T, method=method, us=seconds * 1e6, MB=nbytes_read / 1e6, GBps=bw / 1e9,
                         pct_copy=100 * bw / copy_bw, **extra))

    # -- fp16 SDPA over the full-precision cache --
    base = None
    try:
        t, nb, how = sdpa_fp16(B, T, device, dtype)
        record("sdpa fp16", t, nb, impl=how)
        base = t
    except torch.cuda.OutOfMemoryError:
        rows.append(dict(B=B, T=T, method="sdpa fp16", skipped="out of memory"))
    finally:
        if CUDA:
            torch.cuda.empty_cache()

    # -- KIVI 2 / 4 bit, Triton fused dequantization (and the torch reference on the CPU) --
    for bits in (2, 4):
        try:
            run_kivi(B, T, bits, device, dtype, base, record)
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(B=B, T=T, method=f"kivi{bits} triton", skipped="out of memory"))
        finally:
            if CUDA:
                torch.cuda.empty_cache()


def run_kivi(B: int, T: int, bits: int, device, dtype, base, record):
    """Time one KIVI configuration; its cache is freed on return."""
    k, v = kivi_cache(B, T, bits, device, dtype)
    q = torch.randn(B, HQ, 1, D, dtype=dtype, device=device)
    nb = nbytes(k.tensors) + nbytes(v.tensors) + 2 * nbytes((q,))
    t = bench(lambda: ta.attention(q, k, v))
    record(f"kivi{bits} triton", t, nb, speedup=(base / t) if base else None)
    if ARGS.sweep and CUDA:
        best = None
        for bn in (16, 32, 64):
            for nw in (4, 8):
                ts = bench(lambda: ta.attention(q, k, v, block_n=bn, num_warps=nw))
                if best is None or ts < best[0]:
                    best = (ts, bn, nw)
        record(f"kivi{bits} triton best", best[0], nb, block_n=best[1], num_warps=best[2],
               speedup=(base / best[0]) if base else None)
    if not CUDA:
        t = bench(lambda: ref.attention(q, k, v))
        record(f"kivi{bits} reference", t, nb)


def main():
    global HQ, HKV, D
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.float16
    if CUDA:
        Ts, Bs = [1024, 4096, 16384, 65536], [1, 8, 32]
    else:
        if not ARGS.smoke:
            print("no CUDA device: running the --smoke shapes on the CPU (Triton interpreter)")
        HQ, HKV, D = 8, 2, 64  # keep the interpreter to seconds
        Ts, Bs = [100, 500], [1, 2]
    Ts, Bs = ARGS.T or Ts, ARGS.B or Bs

    copy_bw = copy_bandwidth(device)
    name = device_name(device)
    print(f"device: {name}")
    print(f"copy bandwidth (clone, read + write): {copy_bw / 1e9:.1f} GB/s")
    print(f"Hq={HQ} Hkv={HKV} D={D} L=1 {dtype}; KIVI group {GROUP}, key residual {NR_K}, value window {RESIDUAL}")
    rows: list = []
    for B in Bs:
        for T in Ts:
            run_config(B, T, device, dtype, copy_bw, rows)

    hdr = f"{'B':>3} {'T':>6} {'method':<20} {'time us':>10} {'MB read':>9} {'GB/s':>8} {'% copy':>7} {'vs sdpa':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "skipped" in r:
            print(f"{r['B']:>3} {r['T']:>6} {r['method']:<20} skipped: {r['skipped']}")
            continue
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        print(f"{r['B']:>3} {r['T']:>6} {r['method']:<20} {r['us']:>10.1f} {r['MB']:>9.2f} {r['GBps']:>8.1f} "
              f"{r['pct_copy']:>6.1f}% {sp:>8}")

    out = Path(ARGS.out or ROOT / "benchmarks" / "results" / ("attention.json" if CUDA else "attention_smoke.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, interpreter=not CUDA,
                copy_bandwidth_GBps=copy_bw / 1e9, Hq=HQ, Hkv=HKV, D=D, L=1, dtype=str(dtype), group=GROUP,
                key_residual=NR_K, value_window=RESIDUAL, smoke=not CUDA)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
