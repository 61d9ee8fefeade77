"""The `kvquant` command.

    kvquant demo     generate from a long prompt with full precision, kivi-4 and kivi-2 on SmolLM2-135M:
                     the texts, KV-cache bytes, compression and time per token
    kvquant bench    decode throughput at a fixed KV-cache memory budget on SmolLM2-135M: the largest batch
                     each setting fits and the tokens/s it reaches (a table and a PNG plot)
    kvquant eval     decode perplexity (prefill, then one token at a time), greedy agreement and
                     stored bits per element on SmolLM2-135M or Gemma-3-270M (Jargon File text)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import List, Optional



def _quiet() -> None:
    for name in ("transformers", "torch._inductor", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _settings(names: str) -> List[str]:
    from .evaluate import SETTINGS

    out = split_names(names)
    bad = [n for n in out if n not in SETTINGS]
    if bad:
        raise SystemExit(f"unknown setting(s) {', '.join(bad)}; valid: {', '.join(SETTINGS)}")
    return out


def _progress(name: str):
    """A one-line progress report on stderr for one setting's generation (stage, tokens done / total)."""
    def show(stage: str, done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r  [{name}] {stage}: {done}/{total} tokens", end=end, file=sys.stderr, flush=True)

    return show


def demo(args: argparse.Namespace) -> None:
    import time

    from . import evaluate as ev

    print(f"loading SmolLM2-135M-Instruct (float32) on {ev.machine()} ...", flush=True)
    model, tok = ev.load_smollm2()
    prompt = args.prompt if args.prompt is not None else ev.long_prompt(tok, args.context)
    prompt_tokens = ev.prompt_ids(tok, prompt).shape[1]
    results = []
    for name in _settings(args.settings):
        backend = "inductor (no quantization)" if ev.SETTINGS[name] is None else f"kvquant {ev.SETTINGS[name]}"
        print(f"[{name}] {backend}: a {prompt_tokens}-token prompt, {args.max_new_tokens} new tokens, twice (the "
              f"first run compiles)", flush=True)
        t0 = time.perf_counter()
        results.extend(ev.compare_generations(model, tok, prompt, args.max_new_tokens, [name], _progress(name)))
        g = results[-1]
        print(f"  [{name}] first token {g.first_token_s:.1f} s (compile included), first run {g.first_run_s:.1f} s, "
              f"then {g.ms_per_token:.1f} ms per decoded token ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    base = results[0].kv_bytes
    shown = prompt if len(prompt) < 300 else f"{prompt[:120]} [...] {prompt[-120:]}"
    print(f"\nprompt ({prompt_tokens} tokens): {shown!r}\n")
    for g in results:
        print(f"--- {g.name} ---\n{g.text.strip()}\n")
    print(f"KV cache after {prompt_tokens + args.max_new_tokens} tokens (30 layers, 3 KV heads, head_dim 64, "
          f"float32), times on {ev.machine()}:")
    print(f"{'setting':<8} {'KV bytes':>12} {'bits/elem':>9} {'vs ' + results[0].name:>10} {'ms/token':>9} "
          f"{'1st token s':>11} {'1st run s':>9}")
    for g in results:
        print(f"{g.name:<8} {g.kv_bytes:>12,} {g.bits_per_element:>9.2f} {base / g.kv_bytes:>9.2f}x "
              f"{g.ms_per_token:>9.1f} {g.first_token_s:>11.1f} {g.first_run_s:>9.1f}")
    print("(ms/token: the second run's decode; 1st token and 1st run: the first run's, compilation included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": ev.machine(), "prompt_tokens": prompt_tokens, "results": [vars(g) for g in results]},
                      f, indent=2)


def bench(args: argparse.Namespace) -> None:
    from . import evaluate as ev

    names = _settings(args.settings)
    budget = int(args.budget_mib * 2**20)
    print(f"loading SmolLM2-135M-Instruct (float32) on {ev.machine()} ...", flush=True)
    model, tok = ev.load_smollm2()
    print(f"KV-cache budget {args.budget_mib:g} MiB, context {args.context} tokens, settings {', '.join(names)}: each "
          f"setting at 1, 1/4, 1/2 and all of the largest batch it fits (the first point of each compiles)",
          flush=True)
    ids = tok(ev.long_prompt(tok, args.context), return_tensors="pt").input_ids[:, :args.context]
    points = ev.fixed_budget(model, ids, {n: ev.SETTINGS[n] for n in names}, budget, args.steps, progress=_bar())
    title = (f"SmolLM2-135M float32 decode at a {args.budget_mib:g} MiB KV budget, {args.context}-token context, "
             f"{ev.machine()}")
    print(f"\n{title}; median of {args.steps} steps per point")
    print(f"{'setting':<8} {'batch':>5} {'ms/step':>9} {'tokens/s':>9} {'KV bytes':>13}")
    for p in points:
        print(f"{p.name:<8} {p.batch:>5} {p.ms_per_step:>9.1f} {p.tokens_per_s:>9.1f} {p.kv_bytes:>13,}")
    print("\nat the largest batch each fits:\n" + ev.budget_table(points))
    if ev.budget_plot(points, budget, title, args.png):
        print(f"plot: {args.png}")
    else:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": ev.machine(), "budget_bytes": budget, "context": args.context, "steps": args.steps,
                       "command": " ".join(sys.argv), "points": [vars(p) for p in points]}, f, indent=2)


def _bar():
    """A progress bar on stderr over the points of all settings, one per line of a setting."""
    def show(name: str, done: int, total: int) -> None:
        bar = "#" * done + "." * (total - done)
        end = "\n" if done == total else ""
        print(f"\r  [{name}] [{bar}] {done}/{total} batch points", end=end, file=sys.stderr, flush=True)

    return show


def add_study_options(p: argparse.ArgumentParser, settings: str) -> None:
    """The options `kvquant eval` and benchmarks/accuracy.py share: evaluate.study's arguments."""
    from .evaluate import BASELINES, DEFAULT_TEXT, SETTINGS

    p.add_argument("--settings", default=settings,
                   help=f"comma-separated (fp always runs), from: {', '.join([*SETTINGS, *BASELINES])}")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="windows per forward")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=512)
    p.add_argument("--agree", type=int, default=64, help="greedy-agreement tokens after each prefill (0: skip)")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the model's dtype, hence the cache's and its scales'")
    p.add_argument("--compiler", default="eager", choices=["inductor", "aot_eager", "eager"],
                   help="the kvquant backend's compiler for the rest of the graph (the kvquant ops are the same; "
                        "eager skips Inductor's minutes of CPU codegen per setting)")


def split_names(text: str) -> List[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def evaluate(args: argparse.Namespace) -> None:
    import torch

    from . import evaluate as ev

    print(f"loading {args.model} ({args.dtype}) on {ev.machine()} ...", flush=True)
    model, tok = ev.load_model(args.model, getattr(torch, args.dtype))
    try:
        rows = ev.study(model, tok, split_names(args.settings), args.windows, args.prefill, args.decode, args.agree, args.batch,
                        args.text, args.reference, args.compiler)
    except ValueError as e:
        raise SystemExit(str(e))
    print(f"\n{args.model}: decode perplexity, {args.windows} window(s) of {args.prefill} + {args.decode} tokens "
          f"({os.path.basename(args.text)}), greedy agreement over {args.agree} tokens, {args.dtype}, "
          f"{ev.machine()}\n")
    print(ev.table(rows))
    if args.json:
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump({"machine": ev.machine(), "model": args.model, "dtype": args.dtype, "prefill": args.prefill,
                       "decode": args.decode, "windows": args.windows, "agree": args.agree, "text": args.text,
                       "rows": [asdict(r) for r in rows]}, f, indent=2)


def main(argv: Optional[List[str]] = None) -> None:
    from .evaluate import MODELS, SETTINGS

    names = ", ".join(SETTINGS)

    p = argparse.ArgumentParser(prog="kvquant", description="KV-cache quantization as a torch.compile backend")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="generate with full precision and kivi-4/kivi-2 on SmolLM2-135M")
    d.add_argument("--prompt", default=None, help="the prompt (default: about --context tokens of the Jargon File "
                                                   "excerpt, then a question on it)")
    d.add_argument("--context", type=int, default=1024, help="the default prompt's length in tokens")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--settings", default="fp,kivi-4,kivi-2", help=f"comma-separated, from: {names}")
    d.add_argument("--json", help="also write the results here")
    d.set_defaults(fn=demo)
    b = sub.add_parser("bench", help="decode throughput at a fixed KV-cache memory budget (KIVI's headline)")
    b.add_argument("--budget-mib", type=float, default=1024, help="the KV-cache memory budget, MiB")
    b.add_argument("--context", type=int, default=2048, help="tokens of prompt in every sequence")
    b.add_argument("--settings", default="fp,kivi-2,kivi-4,int8", help=f"comma-separated, the first the baseline, "
                                                                      f"from: {names}")
    b.add_argument("--steps", type=int, default=6, help="timed decode steps per point")
    b.add_argument("--png", default="kvquant_bench.png", help="where the plot goes")
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(fn=bench)
    e = sub.add_parser("eval", help="decode perplexity, greedy agreement and bits per element on a real model "
                                    "(benchmarks/accuracy.py runs the full study)")
    e.add_argument("--model", default="smollm2", choices=list(MODELS))
    add_study_options(e, settings="kivi-4,kivi-2,nqkv-4,nqkv-3")
    e.add_argument("--reference", action="store_true",
                   help="also run each kvquant setting through FakeQuantCache (eager) and show the gap")
    e.add_argument("--json", help="also write the results here")
    e.set_defaults(fn=evaluate)
    args = p.parse_args(argv)
    _quiet()
    args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
