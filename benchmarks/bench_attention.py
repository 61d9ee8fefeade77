"""Decode attention over a quantized KV cache (Triton, fused dequantization) vs SDPA over the
full-precision cache, per method and shape.

For each (D, B, T): the time of one decode step's attention (L = 1, Hq = 32 query heads over
Hkv = 8 KV heads: Llama-3-8B's), the bytes it must read (packed codes + scales + minimums + the
full-precision window, or the K and V of SDPA, plus q and the output), the bandwidth that makes and
its ratio to the device's copy bandwidth, measured in the same run (a large device-to-device clone,
read + write), and the speedup over SDPA. Methods: kivi-2, kivi-4 (keys per channel in groups of 32
tokens, values per token, a 128-token window), nqkv-4 (blocks of 64), int8, fp8 (per token), as
kvcompile stores them (methods.layouts), random codes: the kernel's time does not depend on them.
SDPA is torch's (flash on CUDA) in the cache's dtype; FlashInfer's fp8 decode where it is installed.

    python benchmarks/bench_attention.py                     # CUDA: D 64/128/256 x B 1/8/32 x T 1k..64k
    python benchmarks/bench_attention.py --quick             # CUDA: D 128 only
    python benchmarks/bench_attention.py --sweep             # also try block_n x num_warps (kivi-2)
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke   # CPU, seconds (tests)
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

HQ, HKV = 32, 8
METHODS = {"kivi-2": dict(method="kivi", bits=2), "kivi-4": dict(method="kivi", bits=4),
           "nqkv-4": dict(method="nqkv", bits=4), "int8": dict(method="int8"), "fp8": dict(method="fp8")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/results/attention.json, or attention_smoke.json on the CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), seconds")
    p.add_argument("--quick", action="store_true", help="head_dim 128 only")
    p.add_argument("--sweep", action="store_true", help="CUDA: also time block_n in (16, 32, 64) x num_warps (4, 8)")
    p.add_argument("--T", type=int, nargs="*", help="override the context lengths")
    p.add_argument("--B", type=int, nargs="*", help="override the batch sizes")
    p.add_argument("--D", type=int, nargs="*", help="override the head dims")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    return p.parse_args()


ARGS = parse_args()
CUDA = torch.cuda.is_available() and not ARGS.smoke
if not CUDA:
    # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from kvcompile import Config  # noqa: E402
from kvcompile.kernels import reference as ref  # noqa: E402
from kvcompile.kernels import triton_attention as ta  # noqa: E402
from kvcompile.layout import PAD, TOKEN_AXIS, Layout, Packed  # noqa: E402
from kvcompile.methods import layouts  # noqa: E402


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


def split(lay: Layout, T: int):
    """(nq, nr): T tokens as the layout keeps them, the window full (token groups whole)."""
    nr = min(lay.residual, T)
    nq = T - nr
    if lay.axis == TOKEN_AXIS:
        nq = nq // lay.group * lay.group
    return nq, T - nq


def packed_cache(lay: Layout, B: int, T: int, D: int, device, dtype) -> Packed:
    """T tokens of one (B, Hkv, T, D) cache tensor in `lay`, random codes and scales."""
    nq, nr = split(lay, T)
    cw, sw, mw = lay.widths(D)
    rows = PAD + lay.scale_rows(nq)
    codes = torch.randint(0, 256, (B, HKV, PAD + nq, cw), dtype=torch.uint8, device=device)
    if lay.format == "fp8":  # no NaN codes (0x7F, 0xFF): e4m3fn's only specials
        codes = codes & 0x7E
    scale = torch.rand(B, HKV, rows, sw, dtype=dtype, device=device) * 0.1
    mn = torch.randn(B, HKV, rows, mw, dtype=dtype, device=device)
    res = torch.randn(B, HKV, PAD + nr, D, dtype=dtype, device=device)
    return Packed(codes, scale, mn, res, lay, nq)


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def packed_nbytes(p: Packed) -> int:
    return nbytes((p.codes, p.scale, p.mn, p.res))


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------


def sdpa(B: int, T: int, D: int, device, dtype):
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


def flashinfer_fp8(B: int, T: int, D: int, device, dtype):
    """FlashInfer's batch decode over an fp8 e4m3 paged cache (one page per sequence), if installed."""
    import flashinfer  # noqa: F401  (ImportError: not installed)

    q = torch.randn(B, HQ, D, dtype=dtype, device=device)
    kv = torch.randn(B, 2, T, HKV, D, dtype=dtype, device=device).to(torch.float8_e4m3fn)
    work = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(work, "NHD")
    indptr = torch.arange(B + 1, dtype=torch.int32, device=device)
    wrapper.plan(indptr, torch.arange(B, dtype=torch.int32, device=device),
                 torch.full((B,), T, dtype=torch.int32, device=device), HQ, HKV, D, T,
                 q_data_type=dtype, kv_data_type=torch.float8_e4m3fn)
    return bench(lambda: wrapper.run(q, kv)), nbytes((kv,)) + 2 * nbytes((q,))


def run_config(D: int, B: int, T: int, device, dtype, copy_bw: float, rows: list):
    def record(method, seconds, nbytes_read, **extra):
        bw = nbytes_read / seconds
        rows.append(dict(D=D, B=B, T=T, method=method, us=seconds * 1e6, MB=nbytes_read / 1e6, GBps=bw / 1e9,
                         pct_copy=100 * bw / copy_bw, **extra))

    def guarded(name, fn):
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(D=D, B=B, T=T, method=name, skipped="out of memory"))
        except ImportError as e:
            rows.append(dict(D=D, B=B, T=T, method=name, skipped=f"not installed ({e.name})"))
        finally:
            if CUDA:
                torch.cuda.empty_cache()
        return None

    got = guarded("sdpa", lambda: sdpa(B, T, D, device, dtype))
    base = None
    if got is not None:
        base = got[0]
        record(f"sdpa {str(dtype)[6:]}", got[0], got[1], impl=got[2])
    for name in METHODS:
        guarded(name, lambda: run_method(name, D, B, T, device, dtype, base, record))
    if CUDA:
        got = guarded("flashinfer fp8", lambda: flashinfer_fp8(B, T, D, device, dtype))
        if got is not None:
            record("flashinfer fp8", got[0], got[1], speedup=base / got[0] if base else None)


def run_method(name: str, D: int, B: int, T: int, device, dtype, base, record):
    """Time one method at one shape; its cache is freed on return."""
    lk, lv = layouts(Config(**METHODS[name]), D)
    k, v = packed_cache(lk, B, T, D, device, dtype), packed_cache(lv, B, T, D, device, dtype)
    q = torch.randn(B, HQ, 1, D, dtype=dtype, device=device)
    nb = packed_nbytes(k) + packed_nbytes(v) + 2 * nbytes((q,))
    t = bench(lambda: ta.attention(q, k, v))
    record(name, t, nb, speedup=(base / t) if base else None)
    if ARGS.sweep and CUDA and name == "kivi-2":
        best = None
        for bn in (16, 32, 64):
            for nw in (4, 8):
                ts = bench(lambda: ta.attention(q, k, v, block_n=bn, num_warps=nw))
                if best is None or ts < best[0]:
                    best = (ts, bn, nw)
        record(f"{name} best", best[0], nb, block_n=best[1], num_warps=best[2],
               speedup=(base / best[0]) if base else None)
    if not CUDA:
        record(f"{name} reference", bench(lambda: ref.attention(q, k, v)), nb)


def main():
    global HQ, HKV
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = getattr(torch, ARGS.dtype)
    if CUDA:
        Ds, Ts, Bs = ([128] if ARGS.quick else [64, 128, 256]), [1024, 4096, 16384, 65536], [1, 8, 32]
    else:
        if not ARGS.smoke:
            print("no CUDA device: running the --smoke shapes on the CPU (Triton interpreter)")
        HQ, HKV = 4, 2  # keep the interpreter to seconds
        Ds, Ts, Bs = [64], [160], [1]
    Ds, Ts, Bs = ARGS.D or Ds, ARGS.T or Ts, ARGS.B or Bs

    copy_bw = copy_bandwidth(device)
    name = device_name(device)
    print(f"device: {name}")
    print(f"copy bandwidth (clone, read + write): {copy_bw / 1e9:.1f} GB/s")
    print(f"Hq={HQ} Hkv={HKV} L=1 {dtype}; methods {', '.join(METHODS)} as methods.layouts stores them")
    rows: list = []
    out = Path(ARGS.out or ROOT / "benchmarks" / "results" / ("attention.json" if CUDA else "attention_smoke.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, interpreter=not CUDA,
                copy_bandwidth_GBps=copy_bw / 1e9, Hq=HQ, Hkv=HKV, L=1, dtype=str(dtype), smoke=not CUDA,
                command=" ".join(sys.argv))
    for D in Ds:
        for B in Bs:
            for T in Ts:
                run_config(D, B, T, device, dtype, copy_bw, rows)
                out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))  # kept if the run is cut short

    hdr = (f"{'D':>3} {'B':>3} {'T':>6} {'method':<20} {'time us':>10} {'MB read':>9} {'GB/s':>8} {'% copy':>7} "
           f"{'vs sdpa':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "skipped" in r:
            print(f"{r['D']:>3} {r['B']:>3} {r['T']:>6} {r['method']:<20} skipped: {r['skipped']}")
            continue
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        print(f"{r['D']:>3} {r['B']:>3} {r['T']:>6} {r['method']:<20} {r['us']:>10.1f} {r['MB']:>9.2f} "
              f"{r['GBps']:>8.1f} {r['pct_copy']:>6.1f}% {sp:>8}")

    print(f"wrote {out}")


if __name__ == "__main__":
    main()
