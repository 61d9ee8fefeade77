"""The decoder zoo: tiny random configs of transformers decoder families, and what the backend
does with each. `test_zoo.py` runs it; `python tests/zoo.py --readme README.md` regenerates the
README's support table from a fresh run (never written by hand).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from helpers import max_abs_diff
from models import decode

FAMILIES = {  # model_type -> config overrides on top of COMMON
    "llama": {}, "mistral": {}, "mixtral": dict(num_local_experts=2, num_experts_per_tok=1), "qwen2": {},
    "qwen3": {}, "gemma": {}, "gemma2": dict(sliding_window=12),  # soft-capping, sliding + global layers
    "gemma3_text": dict(sliding_window=12, layer_types=["sliding_attention", "full_attention"]),
    "phi3": {}, "gpt2": {}, "gpt_neox": dict(rotary_pct=0.5),  # partial rotary
    "gptj": dict(rotary_dim=4), "gpt_bigcode": dict(multi_query=True), "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, head_dim=None), "starcoder2": {}, "olmo2": {},
    "cohere": {}, "stablelm": dict(partial_rotary_factor=0.5), "bloom": {},  # ALiBi
}
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
# More families, beyond the twenty above: `python tests/zoo.py --survey` (about 10 minutes, not in CI) runs
# them as the zoo does, or, where the model keeps a cache of its own (hybrids with Mamba or linear
# attention layers), through generate(). What the backend does with decoders it was not written for.
SURVEY = {
    "granite": {}, "olmo": {}, "olmo3": dict(sliding_window=12), "phi": dict(partial_rotary_factor=0.5),
    "qwen2_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16), "glm": {}, "glm4": {},
    "helium": {}, "smollm3": {}, "ministral": dict(sliding_window=12), "arcee": {}, "nemotron": {}, "persimmon": {},
    "mpt": {}, "codegen": dict(rotary_dim=4), "xglm": {}, "biogpt": {}, "exaone4": dict(sliding_window=12),
    "seed_oss": {}, "apertus": {}, "ernie4_5": {}, "cohere2": dict(sliding_window=12),
    "gpt_oss": dict(num_local_experts=2, num_experts_per_tok=1, sliding_window=12),  # attention sinks
    "deepseek_v3": dict(head_dim=4, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, kv_lora_rank=16,
                        q_lora_rank=16, n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1,
                        n_group=1, topk_group=1, moe_intermediate_size=16),  # MLA
    "hunyuan_v1_dense": {}, "llama4_text": {}, "lfm2": {}, "olmoe": {}, "granitemoe": {}, "phimoe": {},
    "doge": {}, "falcon_h1": {},  # Mamba + attention
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_period=2, num_experts=2,
                  num_experts_per_tok=1),  # Mamba + attention
    "minimax": dict(layer_types=["linear_attention", "full_attention"]),  # lightning (linear) + softmax attention
}
OPTIONS = dict(method="kivi", bits=2, compiler="eager", group_size=4, residual_length=8)


def make(family: str, attn: str):
    """(model, config) or raise if the family does not offer this attention implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    over = FAMILIES[family] if family in FAMILIES else SURVEY[family]
    kw = {k: v for k, v in {**COMMON, **over}.items() if v is not None}
    cfg = AutoConfig.for_model(family, **kw)
    if "sliding_window" not in over and getattr(cfg, "sliding_window", None):
        cfg.sliding_window = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # fewer argmax ties in generate comparisons
    return model, cfg


def attentions(family: str) -> List[str]:
    out = []
    for attn in ("sdpa", "eager"):
        try:
            make(family, attn)
            out.append(attn)
        except ValueError:  # "does not support an attention implementation through ..."
            pass
    return out


@dataclass
class Result:
    family: str
    attn: str
    layers: int
    per_graph_quantized: List[int] = field(default_factory=list)
    left_alone: List[str] = field(default_factory=list)  # reasons
    own_cache: bool = False  # checked through generate() only (the model keeps a cache of its own)
    error: str = ""  # the survey records a backend failure instead of stopping
    err_kivi_vs_reference: float = float("nan")
    err_kivi_vs_fp: float = float("nan")
    none_exact: Optional[bool] = None
    err_none_vs_uncompiled: float = float("nan")
    err_dynamo_vs_uncompiled: float = float("nan")

    @property
    def status(self) -> str:
        full = 2 * self.layers
        if self.error:
            return "FAILS"
        if self.own_cache:  # not every layer has attention: rewritten where nothing was left alone
            full = max(self.per_graph_quantized, default=0) if not self.left_alone else -1
        if self.per_graph_quantized and all(q == full for q in self.per_graph_quantized):
            return "quantized"
        if any(self.per_graph_quantized):
            return "partly quantized"
        return "left alone"



def run(family: str, attn: str, steps: int = 15, check_none: bool = True) -> Result:
    """Compile the family's tiny model with kivi (compiler eager) and compare with the eager reference
    (FakeQuantCache with the model's layer types, sliding-window layers included); with `check_none`,
    also compare method none with the uncompiled model."""
    import kvcompile
    from kvcompile import Config
    from kvcompile.fakequant import FakeQuantCache
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    model, cfg = make(family, attn)
    ids = torch.randint(0, 64, (2, 5 + steps), generator=torch.Generator().manual_seed(0))
    attention_layers = sum(isinstance(layer, DynamicLayer) for layer in DynamicCache(config=cfg).layers)
    res = Result(family, attn, attention_layers)  # (a hybrid's Mamba / linear-attention layers hold no K, V)
    torch._dynamo.reset()
    kvcompile.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = decode(torch.compile(model, backend="kvquant", options=OPTIONS), ids, 5, DynamicCache(config=cfg))
    res.per_graph_quantized = [len(r.quantized) for r in kvcompile.reports()]
    res.left_alone = sorted({e.reason for r in kvcompile.reports() for e in r.left_alone})
    want = decode(model, ids, 5, FakeQuantCache(Config(**OPTIONS), cfg))
    res.err_kivi_vs_reference = max_abs_diff(got, want)
    fp = decode(model, ids, 5, DynamicCache(config=cfg))
    res.err_kivi_vs_fp = max_abs_diff(got, fp)
    if check_none:
        # method none must give what the same Dynamo graph gives unrewritten (bit for bit), and the
        # uncompiled model's logits (bit for bit where plain Dynamo's graph gives them: Gemma 3's, and Falcon's
        # since transformers 5.25, already differ from eager by ~1 ulp)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            none = decode(torch.compile(model, backend="kvquant", options=dict(OPTIONS, method="none")), ids, 5,
                          DynamicCache(config=cfg))
        torch._dynamo.reset()
        dynamo = decode(torch.compile(model, backend="eager"), ids, 5, DynamicCache(config=cfg))
        res.none_exact = all(torch.equal(a, b) for a, b in zip(none, dynamo))
        res.err_none_vs_uncompiled = max_abs_diff(none, fp)
        res.err_dynamo_vs_uncompiled = max_abs_diff(dynamo, fp)
    return res


def keeps_own_cache(family: str, attn: str) -> bool:
    """Whether the model ignores (or refuses) a DynamicCache passed to it, keeping a cache of its own."""
    from transformers import DynamicCache

    model, cfg = make(family, attn)
    cache = DynamicCache(config=cfg)
    try:
        with torch.no_grad():
            return model(torch.ones(1, 3, dtype=torch.long), past_key_values=cache, use_cache=True).past_key_values \
                is not cache
    except ValueError:
        return True


def runs_uncompiled(family: str, attn: str) -> bool:
    try:
        with torch.no_grad():
            make(family, attn)[0].generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, do_sample=False)
        return True
    except Exception:
        return False


def run_generate(family: str, attn: str, steps: int = 10) -> Result:
    """For a model with a cache of its own: greedy generate() compiled with `none` must equal the
    uncompiled model's; compiled with kivi, it must run, and the reports say what was rewritten."""
    import kvcompile

    model, cfg = make(family, attn)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    res = Result(family, attn, cfg.num_hidden_layers, own_cache=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(ids, **kw)
        torch._dynamo.reset()
        model.compile(backend="kvquant", options=dict(OPTIONS, method="none"))
        res.none_exact = torch.equal(model.generate(ids, **kw), want)
        model, cfg = make(family, attn)
        torch._dynamo.reset()
        kvcompile.reset()
        model.compile(backend="kvquant", options=OPTIONS)
        model.generate(ids, **kw)
    res.per_graph_quantized = [len(r.quantized) for r in kvcompile.reports()]
    res.left_alone = sorted({e.reason for r in kvcompile.reports() for e in r.left_alone})
    return res


def table(results: List[Result]) -> str:
    lines = ["| family | attention | status | kivi vs eager reference (left alone: vs full precision) | `none` exact | left alone because |",
             "|---|---|---|---|---|---|"]
    for r in results:
        why = "; ".join(r.left_alone) or ""
        err = r.err_kivi_vs_fp if r.status == "left alone" else r.err_kivi_vs_reference
        diff = r.error or (f"max diff {err:.0e}" if not r.own_cache else
                           f"own cache: generate() runs; K/V rewritten per graph {r.per_graph_quantized}")
        lines.append(f"| {r.family} | {r.attn} | {r.status} | {diff} | "
                     f"{'yes' if r.none_exact else 'no'} | {why} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--readme", help="replace the table between the zoo (or survey) markers of this file")
    p.add_argument("--survey", action="store_true", help="run the SURVEY families instead of the zoo's")
    args = p.parse_args(argv)
    results = []
    for family in SURVEY if args.survey else FAMILIES:
        for attn in attentions(family):
            try:
                own = args.survey and keeps_own_cache(family, attn)
                results.append(run_generate(family, attn) if own else run(family, attn))
            except Exception as e:
                if not args.survey:
                    raise
                if not runs_uncompiled(family, attn):  # the tiny config itself does not run: not the backend's
                    print(family, attn, "skipped: does not run uncompiled", file=sys.stderr, flush=True)
                    continue
                results.append(Result(family, attn, 0, error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(results[-1].family, results[-1].attn, results[-1].status, file=sys.stderr, flush=True)
    cmd = "python tests/zoo.py --survey --readme README.md" if args.survey else "python tests/zoo.py --readme README.md"
    md = (f"Generated by `{cmd}` with torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}: tiny random configs "
          f"(2 layers, 4 query / 2 KV heads where the family has GQA), kivi-2 with G=4, R=8, "
          f"prefill 5 then 15 decode steps, batch 2; sliding layers keep a 12-token window"
          + ("; a model keeping a cache of its own is checked through greedy generate() instead (6-token prompts, "
             "10 new tokens): `none` equal to the uncompiled model, kivi runs" if args.survey else "")
          + ".\n\n" + table(results))
    print(md)
    if args.readme:
        tag = "survey" if args.survey else "zoo"
        text = open(args.readme).read()
        if f"<!-- {tag}:start -->" not in text:
            raise SystemExit(f"{args.readme} has no <!-- {tag}:start --> ... <!-- {tag}:end --> block")
        text = re.sub(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", lambda m: m.group(1) + md + "\n" + m.group(2),
                      text, flags=re.S)
        open(args.readme, "w").write(text)


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    main()
