"""End-to-end decode throughput on a GPU (issue 18, item 4): a decoder compiled with plain Inductor (a
bf16 DynamicCache) and with the kvquant backend (kivi-2, kivi-4, int8; the Triton kernels), decoding one
token per sequence per step from a cache of `context` tokens, at batch x context; then, at a fixed KV
memory budget, the largest batch each setting fits and the throughput it reaches there.

The caches are made directly (random keys and values of the context's length, stored as the backend would
store a prefill: state.kv_store), not by a prefill through the model, so a 32k-token batch costs no
prefill time; decode reads the same bytes either way. Weights are random (no hub on the device): a
Llama-3-8B-shaped decoder (32 layers, hidden 4096, 32 / 8 heads, head_dim 128, bf16) and a SmolLM2-135M-
shaped one (SmolLM2's real weights, 94 MB, exceed what a device call carries). Each setting is measured in
turn in this process, median of the timed steps; the JSON is rewritten after every row, so a run cut by
its time limit keeps what it measured.

    python benchmarks/bench_decode_gpu.py --out $OUT/decode.json            # on CUDA (one device call)
    TRITON_INTERPRET=1 python benchmarks/bench_decode_gpu.py --smoke --out x # CPU dry run (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"bf16": None, "kivi-2": dict(method="kivi", bits=2, group_size=32, residual_length=128),
            "kivi-4": dict(method="kivi", bits=4, group_size=32, residual_length=128), "int8": dict(method="int8")}
MODELS = {  # LlamaConfig fields
    "llama3-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      num_hidden_layers=32, intermediate_size=14336, vocab_size=128256),
    "smollm2-135m": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         num_hidden_layers=30, intermediate_size=1536, vocab_size=49152),
}
SMOKE_MODEL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=1,
                   intermediate_size=32, vocab_size=64)


def make_cache(cfg, setting, batch: int, context: int, device, dtype):
    """A DynamicCache holding `context` random tokens per layer, full precision or stored as kvquant stores
    a prefill (what the compiled prefill graph would have returned)."""
    import torch
    from transformers import DynamicCache

    from kvcompile import Config
    from kvcompile.methods import layouts
    from kvcompile.state import kv_store

    cache = DynamicCache()
    H, D = cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(batch, H, context, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        cache.update(k, v, layer)
        if setting is not None:
            lk, lv = layouts(Config(**setting), D)
            cache.layers[layer].keys, cache.layers[layer].values = kv_store(k, lk), kv_store(v, lv)
    return cache


def kv_bytes_per_token(cfg, setting, context: int, dtype) -> float:
    """KV bytes one sequence holds per token at this context (the setting's format, its window included)."""
    from kvcompile import cache_nbytes

    return cache_nbytes(make_cache(_one_layer(cfg), setting, 1, context, "cpu", dtype)) * cfg.num_hidden_layers / context


def _one_layer(cfg):
    import copy

    c = copy.copy(cfg)
    c.num_hidden_layers = 1
    return c


def measure(model, cfg, name, batch, context, steps, device, dtype) -> dict:
    import torch

    from kvcompile import cache_nbytes

    setting = SETTINGS[name]
    torch._dynamo.reset()
    f = torch.compile(model) if setting is None else torch.compile(model, backend="kvquant", options=setting)
    cache = make_cache(cfg, setting, batch, context, device, dtype)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(steps + 3):  # 3 warm-up steps compile the decode graph(s)
            sync()
            t0 = time.perf_counter()
            tok = f(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sync()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return dict(model=cfg.name, setting=name, batch=batch, context=context, ms_per_step=ms,
                tokens_per_s=batch / ms * 1e3, kv_bytes=cache_nbytes(cache))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, Triton interpreter)")
    p.add_argument("--models", default="llama3-8b,smollm2-135m")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--budget-gib", type=float, default=40.0, help="the fixed KV memory budget")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("KVCOMPILE_KERNELS", "triton")
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    models = {"smoke": SMOKE_MODEL} if args.smoke else {m: MODELS[m] for m in args.models.split(",")}
    batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
    contexts = [16] if args.smoke else [int(c) for c in args.contexts.split(",")]
    steps = 2 if args.smoke else args.steps
    budget = (64 * 1024 if args.smoke else args.budget_gib * 2 ** 30)
    free = torch.cuda.mem_get_info()[0] if cuda else 2 ** 40
    report = dict(device=torch.cuda.get_device_name() if cuda else "cpu (smoke)", torch=torch.__version__,
                  budget_bytes=budget, rows=[], budget_rows=[], skipped=[])

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2))

    for mname, fields in models.items():
        cfg = LlamaConfig(max_position_embeddings=max(contexts) + 64, **fields)
        cfg.name = mname
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        for context in contexts:
            per_token = {n: kv_bytes_per_token(cfg, s, context, dtype) for n, s in SETTINGS.items()}
            for batch in batches:
                for name in SETTINGS:
                    need = per_token[name] * context * batch
                    if need > 0.8 * (free - weights):
                        report["skipped"].append(dict(model=mname, setting=name, batch=batch, context=context,
                                                      kv_bytes=need, why="does not fit"))
                        continue
                    row = measure(model, cfg, name, batch, context, steps, device, dtype)
                    report["rows"].append(row)
                    print(f"{mname:<13} {name:<7} B={batch:<3} T={context:<6} {row['ms_per_step']:8.2f} ms/step "
                          f"{row['tokens_per_s']:9.1f} tok/s  KV {row['kv_bytes'] / 2**30:7.2f} GiB", flush=True)
                    save()
            for name in SETTINGS:  # the largest batch the budget holds, and its throughput
                fit = int(budget // (per_token[name] * context))
                if fit < 1 or fit * per_token[name] * context > 0.8 * (free - weights):
                    report["skipped"].append(dict(model=mname, setting=name, batch=fit, context=context,
                                                  why="the budget's batch does not fit"))
                    continue
                row = measure(model, cfg, name, fit, context, steps, device, dtype)
                row["budget_batch"] = fit
                report["budget_rows"].append(row)
                print(f"{mname:<13} {name:<7} budget {budget / 2**30:.1f} GiB at T={context}: B={fit} "
                      f"{row['tokens_per_s']:9.1f} tok/s", flush=True)
                save()
        del model
        if cuda:
            torch.cuda.empty_cache()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
