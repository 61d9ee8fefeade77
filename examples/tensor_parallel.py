"""kvquant under tensor parallelism: a Llama-shaped decoder sharded over the ranks by transformers'
`tp_plan="auto"`, each rank's share of the KV cache quantized by the kvquant backend.

    .venv/bin/torchrun --nproc-per-node 2 examples/tensor_parallel.py            # per-rank decode timing
    .venv/bin/torchrun --nproc-per-node 2 examples/tensor_parallel.py --smoke    # a tiny model, a few steps

Per rank it prints what is sharded, the KV-cache bytes the rank holds (`kvcompile.cache_nbytes`) in full
precision and with kivi-2, and the decode time per step of plain Inductor (`torch.compile(model)`, the same
sharding) and of kvquant kivi-2. Everything runs on the local machine (CPU: gloo, CUDA: nccl) with no
network: the model is a random Llama built here (saved once to a temporary directory), since the installed
SmolLM2-135M has 3 KV heads and 9 query heads, which do not split over 2 ranks (its k_proj would give each
rank 1.5 heads). The KV heads must divide by the number of ranks.

Compiling: the default `torch.compile(model, ...)` (dynamic shapes as Dynamo picks them) works as long as
each call's token ids are a contiguous tensor; a view such as `ids[:, t:t + 1]` of a longer tensor gives
Dynamo a symbolic stride, which DTensor's vocab-parallel embedding fails to hash ("unhashable type:
non-nested SymInt"). `--dynamic false` compiles with `dynamic=False` instead (the KV states' token counts are
still dynamic, so the graphs stay bounded unless a growing attention mask is passed). The CPU has few cores:
run this alone (two CPU-heavy jobs at once distort each other), and give each rank cores / ranks threads
(the default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import kvcompile


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (must divide by the number of ranks)")
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual", type=int, default=128, help="kivi's full-precision window")
    p.add_argument("--dynamic", default="auto", choices=["auto", "false"],
                   help="torch.compile's dynamic: auto (None, the default) or false")
    p.add_argument("--threads", type=int, default=0, help="threads per rank (0: CPU cores / local ranks)")
    p.add_argument("--json", help="also write the results of every rank to this file (rank 0)")
    p.add_argument("--smoke", action="store_true",
                   help="a quick check: a tiny model, 16 prompt tokens, 4 steps, kivi group 4 and window 8")
    args = p.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, args.vocab = 2, 64, 8, 4, 128, 256
        args.batch, args.prompt, args.steps, args.group_size, args.residual = 2, 16, 4, 4, 8
    return args


def build_model(args, world: int) -> Path:
    """A random Llama of the requested shape, saved once (by rank 0) to a directory named by its shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.kv_heads % world or args.heads % world:
        raise SystemExit(f"--kv-heads {args.kv_heads} and --heads {args.heads} must divide by the {world} ranks")
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, max_position_embeddings=max(4096, 2 * (args.prompt + args.steps)),
                 tie_word_embeddings=False)
    key = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"kvcompile-tp-llama-{key}"
    if dist.get_rank() == 0 and not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(path)
    dist.barrier()
    return path


def load_sharded(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig

        kwargs = dict(distributed_config=DistributedConfig(tp_plan="auto"))
    except ImportError:  # older transformers: tp_plan= directly
        kwargs = dict(tp_plan="auto")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


def sharding(model) -> list:
    """What this rank holds of each parameter (one line per kind of layer: layers.* stands for all)."""
    lines, seen = [], set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            name = ".".join(parts[:i + 1] + ["*"] + parts[i + 2:])
        if name in seen:
            continue
        seen.add(name)
        placements = getattr(p, "placements", None)
        local = p.to_local() if hasattr(p, "to_local") else p
        how = ", ".join(map(repr, placements)) if placements else "replicated: a plain tensor"
        lines.append(f"{name}: {list(p.shape)} -> local {list(local.shape)} ({how})")
    return lines


@torch.no_grad()
def decode(fn, ids: torch.Tensor, steps: int):
    """Greedy: prefill `ids`, then `steps` decode steps; returns the cache and each step's seconds."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = fn(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    times = []
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)  # (B, 1), contiguous: see the module doc
        start = time.perf_counter()
        logits = fn(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return cache, times


def run(model, name: str, options, ids: torch.Tensor, args) -> dict:
    from kvcompile.evaluate import bits_per_element

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dynamic = None if args.dynamic == "auto" else False
    if options is None:
        fn = torch.compile(model, dynamic=dynamic)
    else:
        fn = torch.compile(model, backend="kvquant", options=options, dynamic=dynamic)
    decode(fn, ids, args.steps)  # compiles the prefill and decode graphs
    cache, times = decode(fn, ids, args.steps)  # timed
    tensors = kvcompile.cache_tensors(cache)
    return dict(name=name, kv_bytes=kvcompile.cache_nbytes(cache), bits=bits_per_element(cache),
                kv_heads=int(tensors[0].shape[1]), state=type(tensors[0]).__name__,
                ms_median=1e3 * statistics.median(times), ms_mean=1e3 * statistics.fmean(times),
                graphs=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))


def main() -> None:
    args = parse()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        dtype = getattr(torch, args.dtype)
        model = load_sharded(build_model(args, world), dtype)
        device = next(model.parameters()).device
        ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)  # the same on every rank
        kivi = dict(method="kivi", bits=args.bits, group_size=args.group_size, residual_length=args.residual)
        results = [run(model, "inductor", None, ids, args), run(model, f"kivi-{args.bits}", kivi, ids, args)]
        mine = dict(rank=rank, threads=torch.get_num_threads(), sharding=sharding(model), results=results)
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            report(args, world, every, device)
            if args.json:
                Path(args.json).write_text(json.dumps(dict(args=vars(args), world=world, ranks=every), indent=1))
    finally:
        dist.destroy_process_group()


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def report(args, world: int, every: list, device) -> None:
    print(f"tensor parallel over {world} ranks ({device}, {every[0]['threads']} threads each); a random Llama: "
          f"{args.layers} layers, hidden {args.hidden}, {args.heads} query / {args.kv_heads} KV heads, "
          f"{args.dtype}; batch {args.batch}, prompt {args.prompt}, {args.steps} decode steps timed; "
          f"kivi-{args.bits}: group {args.group_size}, residual {args.residual}; dynamic={args.dynamic}")
    for r in every:
        print(f"\n[rank {r['rank']}] sharded (transformers tp_plan='auto'):")
        for line in r["sharding"]:
            print(f"  {line}")
        fp, q = r["results"]
        print(f"  KV cache held by this rank ({q['kv_heads']} of {args.kv_heads} KV heads, "
              f"{args.prompt + args.steps} tokens): {_size(fp['kv_bytes'])} in full precision (plain Inductor, "
              f"{fp['bits']:.1f} bits/element) vs {_size(q['kv_bytes'])} {q['name']} ({q['state']}, {q['bits']:.2f} "
              f"bits/element, window included): {fp['kv_bytes'] / q['kv_bytes']:.2f}x compression")
        for res in (fp, q):
            print(f"  decode {res['name']:>9}: {res['ms_median']:.2f} ms/step median ({res['ms_mean']:.2f} mean), "
                  f"{res['graphs']} graphs compiled")


if __name__ == "__main__":
    main()
