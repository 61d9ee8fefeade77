"""kvquant under torch.distributed: tensor parallelism (transformers' `tp_plan="auto"`) and pipeline
parallelism (`DistributedConfig(pp_size=2)`) on 2 CPU processes (gloo, loopback).

The test starts its own 2 worker processes (this file run as a script, with the environment torchrun would
give them: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT, 1 OpenMP thread), each
with a hard timeout; they write their results to a file and the test compares them with the same model run
in this one process. The model: a tiny random Llama with GQA, 8 query heads and 4 KV heads, so each of the 2
tensor-parallel ranks holds 4 query heads and 2 KV heads (its KV cache holds those 2 heads).

What is held (measured on 2 CPU cores, torch 2.13, transformers 5.24; kvquant's `compiler="eager"`, so that
the rewrite itself is what is compared):
- `none`: the compiled tensor-parallel logits equal the uncompiled tensor-parallel model's bit for bit, and the
  single-process uncompiled model's within all-reduce rounding (row-parallel o_proj and down_proj sum their
  partial products across ranks in another order than one matmul does): max |diff| 6.0e-7 on logits up to
  2.35, 2.5 float32 ulps; asserted <= 1e-6 times the largest logit.
- `kivi` (4 bits, group 4, residual 4; prefill 6 + 10 decode steps, so key groups and value tokens leave the
  residual): equal to the single-process compiled kivi run within the same tolerance (measured 6.0e-7), while
  it differs from full precision by 2.6e-2.
- each rank's cache layers are `KVState`s with 2 of the 4 KV heads; `kvcompile.cache_nbytes` per rank is half
  the single-process state's, exactly.
- greedy `generate()` (batch 2, left padding) gives the single-process compiled run's tokens.
- no more graphs than the single-process model compiles (2 here, for the 10 steps and for generate()).
- pipeline parallelism (`test_pipeline_parallel`): each rank holds its own layer's cache, quantized;
  `generate()` gives the tokens of the single-process eager reference (`FakeQuantCache`). Without padding:
  transformers 5.24's pipeline stages after the first size the attention mask from layer 0 of their cache,
  which they never fill (masking_utils.create_causal_mask -> cache.get_mask_sizes(q_length, layer_idx=0)),
  so a padded batch decodes wrong there even uncompiled.
Default dynamic shapes (`torch.compile`'s `dynamic=None`) work as long as the token ids fed to each call are
contiguous: a view such as `ids[:, t:t + 1]` of a longer tensor gives Dynamo a symbolic stride, which
DTensor's vocab-parallel embedding cannot hash ("unhashable type: non-nested SymInt"). `generate()` feeds
contiguous ids. `dynamic=False` compiles that case too, but then every input whose size changes per step other
than the KV states (an attention mask: generate() with padding) recompiles each step (20 graphs in 20 steps).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD = 2
VOCAB = 128
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 8, 4, 8, 2
PREFILL, STEPS, NEW_TOKENS = 6, 10, 8
KIVI = dict(method="kivi", bits=4, group_size=4, residual_length=4, compiler="eager")
NONE = dict(method="none", compiler="eager")
TOL = 1e-6  # relative to the largest logit: all-reduce rounding (measured 6.0e-7 on logits up to 2.35)
TIMEOUT_S = 300  # the workers' hard limit (they take 10 to 25 s on 2 CPU cores)


def _distributed_unavailable() -> str:
    """Why the distributed test cannot run here ('' when it can)."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build (the CPU test needs gloo)"
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError:
        return "this transformers has no transformers.distributed (tensor / pipeline parallelism)"
    return ""


# ---------------------------------------------------------------------------------------------------
# shared by both sides


def _make_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=128,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # fewer near-ties under argmax (generate comparisons)
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path)


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _ids():
    return torch.randint(0, VOCAB, (2, PREFILL + STEPS), generator=torch.Generator().manual_seed(1))


def _prompt():
    ids = torch.randint(0, VOCAB, (2, PREFILL), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on the first row
    return ids, mask


def _counters_reset():
    import kvcompile

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kvcompile.reset()


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@torch.no_grad()
def _decode(fn, ids):
    """Teacher-forced prefill + one token at a time, each call's ids contiguous (see the module doc)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = [fn(ids[:, :PREFILL].contiguous(), past_key_values=cache, use_cache=True).logits]
    for t in range(PREFILL, ids.shape[1]):
        out.append(fn(ids[:, t:t + 1].contiguous(), past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1), cache


@torch.no_grad()
def _generate(model, pad: bool = True, **kwargs):
    ids, mask = _prompt()
    return model.generate(ids, attention_mask=mask if pad else torch.ones_like(mask), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def _compiled(model, options):
    _counters_reset()
    return torch.compile(model, backend="kvquant", options=options)


def _cache_summary(cache) -> dict:
    import kvcompile

    tensors = kvcompile.cache_tensors(cache)
    return dict(types=[type(t).__name__ for t in tensors], heads=[int(t.shape[1]) for t in tensors],
                nbytes=kvcompile.cache_nbytes(cache))


# ---------------------------------------------------------------------------------------------------
# the worker side (this file run as a script, one process per rank)


def _worker(mode: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # env://: RANK, WORLD_SIZE, MASTER_*
    rank = dist.get_rank()
    try:
        from transformers.distributed import DistributedConfig

        res: dict = {}
        if mode == "tp":
            model = _load(model_dir, distributed_config=DistributedConfig(tp_plan="auto"))
            res["sharded"] = {n: str(p.placements) for n, p in model.named_parameters() if hasattr(p, "placements")}
            res["uncompiled"], _ = _decode(model, _ids())
            for name, options in (("none", NONE), ("kivi", KIVI)):
                res[name], cache = _decode(_compiled(model, options), _ids())
                res[name + "_graphs"] = _graphs()
                res[name + "_cache"] = _cache_summary(cache)
            res["generate"] = _generate(_compiled(model, KIVI))
            res["generate_graphs"] = _graphs()
        else:  # pipeline parallelism: layer i on rank i
            import kvcompile
            from kvcompile.fakequant import FakeQuantCache
            from transformers import DynamicCache

            model = _load(model_dir, distributed_config=DistributedConfig(pp_size=WORLD))
            res["layers"] = [type(layer).__name__ for layer in model.model.layers]
            res["reference"] = _generate(model, pad=False, past_key_values=FakeQuantCache(kvcompile.Config(**KIVI)))
            cache = DynamicCache()
            res["generate"] = _generate(_compiled(model, KIVI), pad=False, past_key_values=cache)
            res["generate_graphs"] = _graphs()
            res["cache"] = [type(getattr(layer, "keys", None)).__name__ for layer in cache.layers]
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# the test side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    """WORLD worker processes running `mode`, started at once; `results()` waits for them (hard timeout),
    kills them all if one fails or hangs, and returns what each wrote."""

    def __init__(self, mode: str, model_dir: Path, out: Path):
        self.mode, self.out, self.logs, self.procs = mode, out, [], []
        port = _free_port()
        path = os.pathsep.join([str(Path(__file__).parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        try:
            for rank in range(WORLD):
                env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                           LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=path)
                self.logs.append(open(out / f"rank{rank}.log", "w+"))
                self.procs.append(subprocess.Popen([sys.executable, __file__, mode, str(model_dir), str(out)],
                                                   env=env, stdout=self.logs[-1], stderr=subprocess.STDOUT,
                                                   start_new_session=True))
        except BaseException:
            self.kill()
            raise
        self.deadline = time.monotonic() + TIMEOUT_S

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def results(self) -> list:
        try:
            while any(p.poll() is None for p in self.procs):
                if time.monotonic() > self.deadline or any(p.returncode not in (None, 0) for p in self.procs):
                    break
                time.sleep(0.2)
        finally:
            self.kill()
        failed = [r for r, p in enumerate(self.procs) if p.returncode != 0]
        tails = []
        for r, log in enumerate(self.logs):
            log.seek(0)
            tails.append(f"--- rank {r} (exit {self.procs[r].returncode}) ---\n" + log.read()[-4000:])
            log.close()
        if failed:
            pytest.fail(f"{self.mode} workers failed or timed out (limit {TIMEOUT_S} s): ranks {failed}\n"
                        + "\n".join(tails))
        return [torch.load(self.out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture
def workers():
    """Start workers with `workers(mode, model_dir, out)`; whatever happens in the test, they are killed."""
    started = []

    def start(*args):
        started.append(_Workers(*args))
        return started[-1]

    yield start
    for w in started:
        w.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-gqa")
    _make_model(path)
    return path


_SKIP = _distributed_unavailable()


@pytest.mark.slow
@pytest.mark.skipif(bool(_SKIP), reason=_SKIP or "runs")
def test_tensor_parallel(model_dir, tmp_path, workers):
    running = workers("tp", model_dir, tmp_path)

    # the single-process references, run here while the workers run
    full = _load(model_dir)
    want_fp, _ = _decode(full, _ids())
    kivi_single, kivi_cache = _decode(_compiled(full, KIVI), _ids())
    single_graphs = _graphs()
    _, none_cache = _decode(_compiled(full, NONE), _ids())
    single = dict(kivi=_cache_summary(kivi_cache), none=_cache_summary(none_cache))
    want_tokens = _generate(_compiled(full, KIVI))
    ranks = running.results()
    assert (kivi_single - want_fp).abs().max() > 1e-3  # quantization took place: the kivi check is not vacuous

    tol = TOL * want_fp.abs().max().item()
    for rank, res in enumerate(ranks):
        assert "model.layers.0.self_attn.k_proj.weight" in res["sharded"], res["sharded"]  # it is sharded
        # (a) none: the compiled tensor-parallel model computes the uncompiled one's logits, and so the
        # single-process model's within all-reduce rounding
        assert torch.equal(res["none"], res["uncompiled"]), (res["none"] - res["uncompiled"]).abs().max()
        err = (res["none"] - want_fp).abs().max().item()
        assert err <= tol, (rank, err, tol)
        # (b) kivi: the single-process compiled kivi run's logits, over prefill + decode
        err = (res["kivi"] - kivi_single).abs().max().item()
        assert err <= tol, (rank, err, tol)
        # (c) each rank's cache: KVStates of its 2 of the 4 KV heads, half the single process's bytes
        for name in ("none", "kivi"):
            got = res[name + "_cache"]
            assert set(got["types"]) == {"KVState"}, (rank, name, got)
            assert set(got["heads"]) == {KV_HEADS // WORLD}, (rank, name, got)
            assert set(single[name]["heads"]) == {KV_HEADS}
            assert 2 * got["nbytes"] == single[name]["nbytes"], (rank, name, got["nbytes"], single[name]["nbytes"])
        # (d) greedy generate() with padding: the single-process tokens
        assert torch.equal(res["generate"], want_tokens), (rank, res["generate"], want_tokens)
        # a bounded number of graphs, as in one process
        assert res["kivi_graphs"] <= single_graphs, (rank, res["kivi_graphs"], single_graphs)
        assert res["none_graphs"] <= 3 and res["generate_graphs"] <= 3, res
    assert torch.equal(ranks[0]["kivi"], ranks[1]["kivi"])  # every rank computes the same logits


@pytest.mark.skipif(bool(_SKIP), reason=_SKIP or "runs")
def test_pipeline_parallel(model_dir, tmp_path, workers):
    running = workers("pp", model_dir, tmp_path)
    from kvcompile import Config
    from kvcompile.fakequant import FakeQuantCache

    want = _generate(_load(model_dir), pad=False, past_key_values=FakeQuantCache(Config(**KIVI)))
    ranks = running.results()
    for rank, res in enumerate(ranks):
        assert res["layers"][rank] == "LlamaDecoderLayer" and res["layers"][1 - rank] == "PipelineIdentityLayer"
        assert torch.equal(res["reference"], want)  # the pipeline computes the single-process model
        assert torch.equal(res["generate"], want), (rank, res["generate"], want)
        # the rank's own layer's cache, quantized; the other stage's layer is not held here
        assert res["cache"][rank] == "KVState" and "KVState" not in res["cache"][:rank] + res["cache"][rank + 1:], res
        assert res["generate_graphs"] <= 10, res["generate_graphs"]


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
