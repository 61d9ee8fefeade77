"""A hand-written decoder (nanoGPT / gpt-fast style) that keeps its KV cache as plain tensors grown
with `torch.cat`: no transformers, no cache class. The kvquant backend quantizes its cache with no
change to the model code.

    python examples/catdecoder.py
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Cache = List[Tuple[torch.Tensor, torch.Tensor]]


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_head * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]]):
        B, L, C = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, L, hs)
        k, v = self.kv(h).view(B, L, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nkv, L, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, T, hs)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None, enable_gqa=True)  # (B, nh, L, hs)
        x = x + self.o(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.ln2(x)), (k, v)


class CatDecoder(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, n_layer: int = 2, n_head: int = 4, n_kv_head: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head, n_kv_head) for _ in range(n_layer))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, cache: Optional[Cache] = None) -> Tuple[torch.Tensor, Cache]:
        """idx (B, L) -> logits (B, L, vocab), new cache. Prefill with cache=None, then L = 1 steps."""
        x, new_cache = self.emb(idx), []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.head(x), new_cache


@torch.no_grad()
def generate(model, idx: torch.Tensor, steps: int) -> Tuple[torch.Tensor, Cache]:
    logits, cache = model(idx)
    out = [idx]
    for _ in range(steps):
        nxt = logits[:, -1:].argmax(-1)
        out.append(nxt)
        logits, cache = model(nxt, cache)
    return torch.cat(out, 1), cache


if __name__ == "__main__":
    torch.manual_seed(0)
    model = CatDecoder(dim=256, n_head=4, n_kv_head=2).eval()  # head_dim 64
    idx = torch.randint(0, 64, (1, 40))
    fast = torch.compile(model, backend="kvquant", options={"method": "kivi", "bits": 4, "residual_length": 32})
    tokens, cache = generate(fast, idx, 100)
    ref_tokens, ref_cache = generate(model, idx, 100)
    k = cache[0][0]
    print(type(k).__name__, tuple(k.shape), k)
    nbytes = sum(getattr(t, "packed_nbytes", lambda: t.numel() * t.element_size())() for kv in cache for t in kv)
    ref_nbytes = sum(t.numel() * t.element_size() for kv in ref_cache for t in kv)
    print(f"cache bytes: {nbytes} quantized vs {ref_nbytes} full precision ({ref_nbytes / nbytes:.1f}x smaller)")
    print(f"greedy tokens equal to full precision: {(tokens == ref_tokens).float().mean().item():.0%}")
