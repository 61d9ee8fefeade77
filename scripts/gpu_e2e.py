"""End to end on the GPU, the Triton path forced: a small random Llama (GQA, head_dim 64, bf16) compiled
with the kvquant backend (Inductor), decoded by hand and by generate(), per method; checks that the
Triton kernels ran (kvquant counters), that the logits equal the eager reference of the same semantics
(FakeQuantCache) within the kernels' tolerance, and that every cache tensor is a KVState. Writes JSON.

    python scripts/gpu_e2e.py --out $OUT/e2e.json        # on CUDA (scripts/gpu_check.sh runs it)
    TRITON_INTERPRET=1 python scripts/gpu_e2e.py --smoke # a CPU dry run (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["KVCOMPILE_KERNELS"] = "triton"  # the kernels, also where the backend would pick them anyway


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, Triton interpreter)")
    args = p.parse_args()
    import torch
    from torch._dynamo.utils import counters
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import kvcompile
    from kvcompile import Config, KVState
    from kvcompile.fakequant import FakeQuantCache

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    size = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_hidden_layers=2,
                intermediate_size=1024) if cuda else \
        dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=1,
             intermediate_size=32)
    prefill, steps = (300, 40) if cuda else (6, 3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, max_position_embeddings=4096, **size)).to(device, dtype).eval()
    ids = torch.randint(0, 256, (2, prefill + steps), device=device)
    methods = {"kivi-2": dict(method="kivi", bits=2, group_size=32, residual_length=64),
               "int8": dict(method="int8"), "nqkv-4": dict(method="nqkv", bits=4, block_size=32 if cuda else 8)}
    if not cuda:
        methods = {"kivi-2": dict(method="kivi", bits=2, group_size=4, residual_length=4)}
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    rows, ok = [], True

    @torch.no_grad()
    def decode(f, cache):
        out = [f(ids[:, :prefill], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(prefill, prefill + steps):
            out.append(f(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack(out).float()

    for name, opts in methods.items():
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="kvquant", options=dict(opts, compiler="inductor"))
        cache = DynamicCache()
        t0 = time.perf_counter()
        got = decode(compiled, cache)
        seconds = time.perf_counter() - t0
        want = decode(model, FakeQuantCache(Config(**opts)))
        fp = decode(model, DynamicCache())
        c = dict(counters["kvquant"])
        states = all(isinstance(t, KVState) for t in kvcompile.cache_tensors(cache))
        err, quant = (got - want).abs().max().item(), (got - fp).abs().max().item()
        kernels = c.get("triton_attention_calls", 0) > 0 and c.get("triton_quantize_calls", 0) > 0
        with torch.no_grad():
            gen = compiled.generate(ids[:, :prefill], max_new_tokens=8, do_sample=False)
        passed = bool(states and kernels and err < tol and gen.shape[1] == prefill + 8)
        ok &= passed
        rows.append(dict(method=name, passed=passed, max_diff_vs_reference=err, max_diff_vs_fp=quant,
                         kv_states=states, counters=c, decode_seconds_incl_compile=seconds))
        print(f"{name:>7}: {'PASS' if passed else 'FAIL'}  vs reference {err:.2e} (tol {tol:.0e}), vs fp {quant:.2e}, "
              f"states {states}, triton attention/quantize calls {c.get('triton_attention_calls', 0)}/"
              f"{c.get('triton_quantize_calls', 0)}")
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", torch=torch.__version__,
                dtype=str(dtype), prefill=prefill, steps=steps, model=size)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print("e2e:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
