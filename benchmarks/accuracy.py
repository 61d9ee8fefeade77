"""Accuracy study: decode perplexity, greedy agreement and stored bits per element of every KV-cache
setting on real models, side by side with transformers' QuantizedCache (quanto, HQQ).

    python benchmarks/accuracy.py                       # SmolLM2-135M and Gemma-3-270M, 16 windows
    python benchmarks/accuracy.py --models smollm2 --windows 4 --settings kivi-4,nqkv-4

Per model: `--windows` consecutive windows of the text (default: the Jargon File excerpt shipped in
kvcompile/data; `--text` for another), each prefilled with `--prefill` tokens, then `--decode`
tokens fed one at a time through the cache under test (decode perplexity = exp of the mean
next-token NLL over those tokens). Greedy agreement: after the prefill, the full-precision cache's
greedy continuation of `--agree` tokens is teacher-forced through the cache under test, and the
share of steps whose argmax equals it is reported. Every kvquant setting runs compiled (backend
"kvquant") and, with --reference (default), also through FakeQuantCache (the eager reference of the
same semantics); the table shows the gap. Bits per element are measured from the cache after the
window (codes, scales, minimums, spare rows and the full-precision residual, over the elements a
full-precision cache holds). Windows run as one batch (`--batch`).

Writes a Markdown table to stdout, JSON (--out) and a plot of PPL increase vs bits per element
(--plot). The model runs in --dtype (default bfloat16, so the cache, its scales and the fp baseline
are 16-bit, as in serving).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvcompile import evaluate as ev  # noqa: E402
from kvcompile.cli import _quiet, add_study_options, split_names  # noqa: E402

HERE = os.path.dirname(__file__)
DEFAULT_SETTINGS = ("kivi-4,kivi-4-g128,kivi-2,kivi-2-g128,kivi-k4v2-r32,nqkv-4,nqkv-4-b16,nqkv-3,nqkv-2,int8,fp8,"
                    "nqkv-4-r32,nqkv-4-h,nqkv-4-h-r32,nqkv-3-h-r8,nqkv-3-h-r16,nqkv-k4v2-h-r16,"
                    "quanto-4,quanto-2,hqq-4,hqq-2")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = results["models"][model]["rows"]
        base = next(r["perplexity"] for r in rows if r["kind"] == "fp")
        for r in rows:
            if r["kind"] == "reference" or r["bits_per_element"] is None or r["perplexity"] != r["perplexity"]:
                continue
            delta = 100 * (r["perplexity"] / base - 1)
            style = {"fp": ("k", "*"), "kvquant": ("tab:blue", "o"), "quantized-cache": ("tab:red", "s")}[r["kind"]]
            ax.scatter(r["bits_per_element"], max(delta, 0.01), color=style[0], marker=style[1], s=36)
            ax.annotate(r["setting"], (r["bits_per_element"], max(delta, 0.01)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bits per element stored (measured)")
        ax.set_ylabel("decode perplexity increase over fp (%, <= 0.01 drawn at 0.01)")
        ax.set_title(f"{model}: {results['windows']} windows, prefill {results['prefill']} + {results['decode']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].scatter([], [], color="tab:blue", marker="o", label="kvquant")
    axes[0][0].scatter([], [], color="tab:red", marker="s", label="transformers QuantizedCache")
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"KV-cache quantization accuracy ({results['machine']}, {results['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(results: dict) -> str:
    """The README block: how it was made, then one table per model."""
    out = [f"`{results['command']}` ({results['machine']}, torch {results['torch']}, {results['dtype']} model and "
           f"cache; kvquant compiler `{results['compiler']}`): {results['windows']} windows of "
           f"{results['prefill']} + {results['decode']} tokens of `{results['text']}`, greedy agreement over "
           f"{results['agree']} tokens."]
    for model, r in results["models"].items():
        rows = [ev.Scored(**row) for row in r["rows"]]
        out += ["", f"**{model}** ({r['seconds'] / 60:.0f} min)", "", ev.table(rows)]
    return "\n".join(out)


def write_readme(results: dict, readme: str) -> None:
    with open(readme) as f:
        text = f.read()
    block = f"<!-- accuracy:start -->\n{render(results)}\n<!-- accuracy:end -->"
    new, n = re.subn(r"<!-- accuracy:start -->.*?<!-- accuracy:end -->", lambda m: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{readme} has no <!-- accuracy:start --> ... <!-- accuracy:end --> block")
    with open(readme, "w") as f:
        f.write(new)


def merge(old: dict, new: dict) -> dict:
    """One model's rows from an earlier run and a new one: the new rows replace those of the same setting
    and kind, the others are kept (first the old order, then new settings). The fp baseline runs in
    both; a different fp perplexity means the runs are not comparable, which is an error."""
    fp_old = next(r["perplexity"] for r in old["rows"] if r["kind"] == "fp")
    fp_new = next(r["perplexity"] for r in new["rows"] if r["kind"] == "fp")
    if abs(fp_new / fp_old - 1) > 1e-6:
        raise SystemExit(f"--append: full precision gives {fp_new:.4f} now and {fp_old:.4f} in the earlier run "
                         f"(other windows, dtype or text?): not merging")
    fresh = {(r["setting"], r["kind"]): r for r in new["rows"]}
    rows = [fresh.pop((r["setting"], r["kind"]), r) for r in old["rows"]]
    return {"rows": rows + list(fresh.values()), "seconds": old["seconds"] + new["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma3", help=f"comma-separated, from: {', '.join(ev.MODELS)}")
    add_study_options(p, settings=DEFAULT_SETTINGS)
    p.add_argument("--reference", default="kivi-4,kivi-2,nqkv-4,nqkv-3,nqkv-4-h-r32,nqkv-3-h-r16",
                   help="kvquant settings also run through FakeQuantCache (eager reference): comma-separated, "
                        "'all' or 'none'")
    p.add_argument("--out", default=os.path.join(HERE, "results", "accuracy.json"))
    p.add_argument("--plot", default=os.path.join(HERE, "results", "accuracy.png"))
    p.add_argument("--append", action="store_true",
                   help="keep what --out already holds: the other models, and this model's other settings "
                        "(rows of a setting run again are replaced)")
    p.add_argument("--readme", help="only render --out (JSON of an earlier run) into this README's accuracy "
                                    "block (and redraw --plot); runs nothing")
    args = p.parse_args()
    if args.readme:
        with open(args.out) as f:
            results = json.load(f)
        write_readme(results, args.readme)
        if args.plot:
            plot(results, args.plot)
        return
    _quiet()
    torch.manual_seed(0)
    names = split_names(args.settings)
    results = {"machine": ev.machine(), "dtype": args.dtype, "windows": args.windows, "prefill": args.prefill,
               "decode": args.decode, "agree": args.agree, "text": os.path.basename(args.text),
               "compiler": args.compiler, "torch": torch.__version__,
               "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]), "models": {}}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        results["models"] = previous["models"]
        results["command"] = previous["command"] + " && " + results["command"]
    for model_name in split_names(args.models):
        start = time.perf_counter()
        print(f"loading {model_name} ({args.dtype}) ...", flush=True)
        model, tok = ev.load_model(model_name, getattr(torch, args.dtype))
        reference = {"all": True, "none": False}.get(args.reference, split_names(args.reference))
        rows = ev.study(model, tok, names, args.windows, args.prefill, args.decode, args.agree, args.batch,
                        args.text, reference, args.compiler)
        print(f"\n{model_name}: decode perplexity, {args.windows} windows of {args.prefill} + {args.decode} "
              f"tokens ({results['text']}), greedy agreement over {args.agree} tokens, {args.dtype}, "
              f"{results['machine']}\n")
        print(ev.table(rows), flush=True)
        entry = {"rows": [asdict(r) for r in rows], "seconds": time.perf_counter() - start}
        if model_name in results["models"]:
            entry = merge(results["models"][model_name], entry)
        results["models"][model_name] = entry
        del model
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        if args.plot:
            plot(results, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
