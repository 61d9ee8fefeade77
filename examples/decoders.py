"""Hand-written decoders in the idioms public decoders use (written here from scratch): each keeps its
own cache and runs its own decode loop, so the backend sees graphs nobody tuned it for.

    python examples/decoders.py       # every layout x attention form, kivi-2: quantized, and how

tests/test_decoders.py checks each against the eager reference.

`Idiom` picks, independently:
  layout     how the cache is kept:  bhtd  [B, H, T, D], cat on dim 2
                                     bthd  [B, T, H, D], cat on dim 1, transposed before attention
                                     tbhd  [T, B, H, D], sequence first, cat on dim 0, then permuted
                                     btc   [B, T, H*D], heads split after the cat (view + transpose)
                                     keys_t keys [B, H, D, T] (cat on the last dim, q @ k with no transpose),
                                            values [B, H, T, D]
  repeat     GQA/MQA head repeat:    none (MHA) | interleave (repeat_interleave) | index (x[:, :, None] +
                                     expand + reshape) | unsqueeze (unsqueeze + expand + flatten) | contiguous
                                     (expand + contiguous + view)
  attention  sdpa | matmul (torch.matmul) | at (@) | method (.matmul) | bmm (3-D views; baddbmm for the
             scores) | einsum
  scale      where 1/sqrt(D) is applied: scores | q | k
  softmax32  softmax in float32, then back
  cache      tuple (a tuple of (k, v) per layer, returned and fed back) | object (lists on a cache object
             the decoder updates in place: Dynamo writes them back) | preallocated buffers of max_len
             tokens, written in place and never returned: buffer (module buffers) | attribute (plain
             tensor attributes, reassigned `self.cache_k = self.cache_k.to(x)` each call, as the reference
             Llama does) | argument (created by the caller, Decoder.buffers, and passed to forward)
  write      how a buffer is written: index (`buf[:, :, pos] = k`) | index_copy (`buf.index_copy_(2, pos,
             k)`) | index_copy_used (`buf = buf.index_copy_(2, pos, k)`, its result read: litgpt's) |
             index_put (`torch.ops.aten.index_put_(buf, [None, None, pos], k)`: ExecuTorch's) | scatter
             (`buf.scatter_(2, pos.view(1, 1, n, 1).expand_as(k), k)`) | slice (`buf[:bsz, start:start + n] = k`) | rolling (`buf[:, :, pos % max_len] = k`: a
             sliding window of max_len tokens, read whole); along the layout's tokens dim
  read       how a buffer is read: whole (every max_len token, masked by position) | prefix (`buf[:bsz,
             :start + n]`)
  rope       post (RoPE on the new keys, then cached) | pre (the cache holds keys before RoPE; RoPE is
             applied to the whole concatenation every step)

`hook(layer, role, tensor)`, if given, transforms each cache tensor before it is returned: the eager
reference passes fakequant.FakeQuantStream's, so that the reference keeps the same cache semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BUFFERS = ("buffer", "attribute", "argument")
LOGICAL = {"bhtd": ("bhtd", "bhtd"), "bthd": ("bthd", "bthd"), "tbhd": ("tbhd", "tbhd"),
           "btc": ("bt(hd)", "bt(hd)"), "keys_t": ("bhdt", "bhtd")}


@dataclass(frozen=True)
class Idiom:
    layout: str = "bhtd"
    repeat: str = "index"
    attention: str = "sdpa"
    scale: str = "scores"
    softmax32: bool = False
    rope: str = "post"
    cache: str = "tuple"
    write: str = "index"
    read: str = "whole"
    max_len: int = 48
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8

    def logical(self, role: str) -> str:
        """The cache's layout in kvcompile's letters (Layout.logical), keys or values."""
        return LOGICAL[self.layout][0 if role == "k" else 1]

    def valid(self) -> "Idiom":
        """An equivalent idiom that exists: MHA repeats nothing, einsum and sdpa have their own GQA paths."""
        kv = self.kv_heads if self.repeat != "none" else self.heads
        return replace(self, kv_heads=kv)


def _rope(x: Tensor, pos: Tensor) -> Tensor:
    """RoPE on [B, H, T, D] at positions pos [T] (rotate-half form)."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, dim: int, idiom: Idiom):
        super().__init__()
        self.idiom = idiom
        H, Hkv, D = idiom.heads, idiom.kv_heads, idiom.head_dim
        self.q = nn.Linear(dim, H * D, bias=False)
        self.kv = nn.Linear(dim, 2 * Hkv * D, bias=False)
        self.o = nn.Linear(H * D, dim, bias=False)

    # -- the cache, in the idiom's layout --

    def buffers(self, batch: int, dtype=torch.float32) -> Tuple[Tensor, Tensor]:
        """Zero-filled key and value buffers of max_len tokens, in the layout (bhtd or bthd)."""
        idiom = self.idiom
        shape = [batch, idiom.kv_heads, idiom.max_len, idiom.head_dim]
        if idiom.layout == "bthd":
            shape[1], shape[2] = shape[2], shape[1]
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def _write(self, buf: Tensor, new: Tensor, pos: Tensor, start: int) -> Tensor:
        """Write new tokens (in the layout) at positions pos = start + [0, n) of buf, in place; the buffer
        to read from (the write's result for index_copy_used / index_put)."""
        axis, how, n = self._axis("k"), self.idiom.write, new.shape[self._axis("k")]
        if how in ("index_copy", "index_copy_used"):
            out = buf.index_copy_(axis, pos, new)
            return out if how == "index_copy_used" else buf
        if how == "index_put":
            return torch.ops.aten.index_put_(buf, [None] * axis + [pos], new)
        if how == "scatter":  # the positions broadcast over the other dims
            at = pos.view([1] * axis + [n] + [1] * (new.dim() - axis - 1)).expand_as(new)
            buf.scatter_(axis, at, new)
            return buf
        if how in ("index", "rolling"):
            buf[(slice(None),) * axis + (pos % self.idiom.max_len if how == "rolling" else pos,)] = new
        else:  # a batch prefix, a slice of the tokens
            buf[(slice(None, new.shape[0]),) + (slice(None),) * (axis - 1) + (slice(start, start + n),)] = new
        return buf

    def _from_buffers(self, kbuf: Tensor, vbuf: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor, start: int,
                      hook: Optional[Callable], layer: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Write this call's tokens, read the cache back: (keys, values, mask over max_len or None)."""
        if hook is not None:  # the eager reference: what the buffer holds once the tokens are written
            k_new, v_new = hook(layer, "k", k_new), hook(layer, "v", v_new)
        kbuf, vbuf = self._write(kbuf, k_new, pos, start), self._write(vbuf, v_new, pos, start)
        B, end = k_new.shape[0], start + k_new.shape[self._axis("k")]
        if self.idiom.read == "prefix":
            cut = (slice(None, B),) + (slice(None),) * (self._axis("k") - 1) + (slice(None, end),)
            return kbuf[cut], vbuf[cut], None
        S = self.idiom.max_len
        mask = torch.arange(S, device=pos.device)[None, :] <= pos[:, None]  # [L, S]
        if self.idiom.write == "rolling":  # once it has wrapped, every slot holds one of the newest S tokens
            mask = mask | (pos[:, None] >= S - 1)
        return kbuf, vbuf, mask

    def _store(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """[B, Hkv, L, D] -> the layout the idiom keeps its cache in."""
        lay = self.idiom.layout
        if lay == "bthd":
            return k.transpose(1, 2), v.transpose(1, 2)
        if lay == "tbhd":
            return k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)
        if lay == "btc":
            B, H, L, D = k.shape
            return k.transpose(1, 2).reshape(B, L, H * D), v.transpose(1, 2).reshape(B, L, H * D)
        if lay == "keys_t":
            return k.transpose(2, 3), v
        return k, v

    def _axis(self, role: str) -> int:
        lay = self.idiom.layout
        return {"bhtd": 2, "bthd": 1, "tbhd": 0, "btc": 1, "keys_t": 3 if role == "k" else 2}[lay]

    def _load(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """The cache in its layout -> keys [B, Hkv, T, D] (keys_t: [B, Hkv, D, T]) and values [B, Hkv, T, D]."""
        lay, H, D = self.idiom.layout, self.idiom.kv_heads, self.idiom.head_dim
        if lay == "bthd":
            return k.transpose(1, 2), v.permute(0, 2, 1, 3)
        if lay == "tbhd":
            return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        if lay == "btc":
            B, T, _ = k.shape
            return k.view(B, T, H, D).transpose(1, 2), v.reshape(B, T, H, D).permute(0, 2, 1, 3)
        return k, v

    def _repeat(self, x: Tensor, dim: int = 1) -> Tensor:
        """Repeat the KV heads (dim 1) for GQA, in the idiom's way."""
        n = self.idiom.heads // self.idiom.kv_heads
        how = self.idiom.repeat
        if how == "none":
            return x
        if how == "interleave":
            return x.repeat_interleave(n, dim=1)
        B, H = x.shape[:2]
        rest = x.shape[2:]
        if how == "index":
            return x[:, :, None].expand(B, H, n, *rest).reshape(B, H * n, *rest)
        if how == "unsqueeze":
            return x.unsqueeze(2).expand(B, H, n, *rest).flatten(1, 2)
        return x[:, :, None, :, :].expand(B, H, n, *rest).contiguous().view(B, H * n, *rest)

    def forward(self, x: Tensor, pos: Tensor, past: Optional[Tuple[Tensor, Tensor]],
                hook: Optional[Callable] = None, layer: int = 0, start: int = 0) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        idiom = self.idiom
        B, L, _ = x.shape
        H, Hkv, D = idiom.heads, idiom.kv_heads, idiom.head_dim
        q = self.q(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).view(B, L, 2, Hkv, D).permute(2, 0, 3, 1, 4)  # (B, Hkv, L, D) each
        q = _rope(q, pos)
        if idiom.rope == "post":
            k = _rope(k, pos)
        k_new, v_new = self._store(k, v)
        mask = None
        if idiom.cache in BUFFERS:
            if idiom.cache == "argument":
                kbuf, vbuf = past
            elif idiom.cache == "buffer":
                kbuf, vbuf = self.k_cache, self.v_cache
            else:  # the reference Llama's: attributes, reassigned
                self.cache_k, self.cache_v = self.cache_k.to(x), self.cache_v.to(x)
                kbuf, vbuf = self.cache_k, self.cache_v
            k_all, v_all, mask = self._from_buffers(kbuf, vbuf, k_new, v_new, pos, start, hook, layer)
        elif past is not None:
            k_all = torch.cat([past[0], k_new], dim=self._axis("k"))
            v_all = torch.cat([past[1], v_new], dim=self._axis("v"))
        else:
            k_all, v_all = k_new, v_new
        keys, values = self._load(k_all, v_all)
        if idiom.rope == "pre":  # the cache holds keys before RoPE: rotate all of them, every step
            if idiom.layout == "keys_t":  # [B, Hkv, D, T]
                keys = _rope(keys.transpose(2, 3), torch.arange(keys.shape[3], device=x.device)).transpose(2, 3)
            else:
                keys = _rope(keys, torch.arange(keys.shape[2], device=x.device))
        out = self._attend(q, keys, values, L, mask)
        present = (k_all, v_all)
        if hook is not None and idiom.cache not in BUFFERS:
            present = (hook(layer, "k", k_all), hook(layer, "v", v_all))
        return self.o(out.transpose(1, 2).reshape(B, L, H * D)), present

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, L: int, mask: Optional[Tensor] = None) -> Tensor:
        """q [B, H, L, D] over keys [B, Hkv, T, D] (keys_t: [B, Hkv, D, T]) and values [B, Hkv, T, D];
        mask [L, T] (True: attend), causal with the newest queries last if None."""
        idiom = self.idiom
        D = idiom.head_dim
        transposed = idiom.layout == "keys_t"
        T = keys.shape[-1] if transposed else keys.shape[-2]
        scale = 1.0 / math.sqrt(D)
        if mask is None:
            mask = torch.ones(L, T, dtype=torch.bool, device=q.device).tril(T - L)  # causal, newest queries last
        if idiom.attention == "sdpa" and not transposed:
            if idiom.scale == "q":
                q = q * scale
            keys_r, values_r = self._repeat(keys), self._repeat(values)
            return F.scaled_dot_product_attention(q, keys_r, values_r, attn_mask=mask,
                                                  scale=1.0 if idiom.scale == "q" else None)
        if idiom.scale == "q":
            q = q * scale
        if idiom.scale == "k":
            keys = keys * scale
        keys_r, values_r = self._repeat(keys), self._repeat(values)
        kt = keys_r if transposed else keys_r.transpose(-2, -1)  # (B, H, D, T)
        att = idiom.attention
        if att in ("matmul", "sdpa"):
            scores = torch.matmul(q, kt)
        elif att == "at":
            scores = q @ kt
        elif att == "method":
            scores = q.matmul(kt)
        elif att == "einsum":
            scores = torch.einsum("bhld,bhdt->bhlt", q, kt)
        else:  # bmm, the scores through baddbmm (a zero bias)
            B, H = q.shape[:2]
            bias = torch.zeros(B * H, L, T, dtype=q.dtype, device=q.device)
            scores = torch.baddbmm(bias, q.reshape(B * H, L, D), kt.reshape(B * H, D, T)).view(B, H, L, T)
        if idiom.scale == "scores":
            scores = scores * scale
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype) if idiom.softmax32 else F.softmax(scores, dim=-1)
        if att in ("matmul", "sdpa"):
            return torch.matmul(probs, values_r)
        if att == "at":
            return probs @ values_r
        if att == "method":
            return probs.matmul(values_r)
        if att == "einsum":
            return torch.einsum("bhlt,bhtd->bhld", probs, values_r)
        B, H = q.shape[:2]
        return torch.bmm(probs.reshape(B * H, L, T), values_r.reshape(B * H, T, D)).view(B, H, L, D)


class Decoder(nn.Module):
    """A tiny decoder of `layers` attention blocks, keeping its cache as a tuple of (k, v) per layer."""

    def __init__(self, idiom: Idiom, vocab: int = 64, layers: int = 2, seed: int = 0, max_batch: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        idiom = idiom.valid()
        self.idiom = idiom
        dim = 32
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Attention(dim, idiom) for _ in range(layers)])
        for block in self.blocks:  # buffers of max_batch rows (the reference Llama's max_batch_size)
            if idiom.cache == "buffer":
                k, v = block.buffers(max_batch)
                block.register_buffer("k_cache", k, persistent=False)
                block.register_buffer("v_cache", v, persistent=False)
            elif idiom.cache == "attribute":
                block.cache_k, block.cache_v = block.buffers(max_batch)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.mul_(4.0)  # fewer argmax ties

    def forward(self, idx: Tensor, past=None, start: int = 0, hook: Optional[Callable] = None):
        """past: None, a tuple of (k, v) per layer (returned anew), or a Cache object (updated in place)."""
        x = self.embed(idx)
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        presents = []
        for i, block in enumerate(self.blocks):
            if isinstance(past, Cache):
                layer = (past.keys[i], past.values[i]) if past.keys[i] is not None else None
            else:
                layer = past[i] if past is not None else None
            h, present = block(x, pos, layer, hook, i, start)
            x = x + h
            presents.append(present)
            if isinstance(past, Cache):
                past.keys[i], past.values[i] = present
        if self.idiom.cache in BUFFERS:
            return self.head(self.norm(x)), past
        return self.head(self.norm(x)), past if isinstance(past, Cache) else tuple(presents)

    def buffers(self, batch: int) -> List[Tuple[Tensor, Tensor]]:
        """Zero-filled (key, value) buffers per layer, for cache="argument"."""
        return [block.buffers(batch) for block in self.blocks]


class Cache:
    """A cache object of the decoder's own: lists of keys and values per layer, updated in place."""

    def __init__(self, layers: int):
        self.keys: List[Optional[Tensor]] = [None] * layers
        self.values: List[Optional[Tensor]] = [None] * layers

    def __iter__(self):
        return iter(zip(self.keys, self.values))


@torch.no_grad()
def run(model: Callable, idx: Tensor, prefill: int, hook: Optional[Callable] = None) -> Tuple[List[Tensor], tuple]:
    """The decoder's own loop: prefill `prefill` tokens, then one at a time. Logits of every call, and the
    last cache."""
    inner = getattr(model, "_orig_mod", model)
    out, past = [], Cache(len(inner.blocks)) if inner.idiom.cache == "object" else None
    if inner.idiom.cache == "argument":
        past = inner.buffers(idx.shape[0])
    for s, e in [(0, prefill)] + [(t, t + 1) for t in range(prefill, idx.shape[1])]:
        kw = {} if hook is None else dict(hook=hook)
        logits, past = model(idx[:, s:e], past, s, **kw)
        out.append(logits)
    return out, past


if __name__ == "__main__":
    import kvcompile

    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    options = dict(method="kivi", bits=2, group_size=4, residual_length=8)
    for layout in LOGICAL:
        for attention in ("sdpa", "matmul", "bmm", "einsum"):
            idiom = Idiom(layout=layout, attention=attention, repeat="none" if attention == "einsum" else "index")
            model = Decoder(idiom).eval()
            torch._dynamo.reset()
            kvcompile.reset()
            _, cache = run(torch.compile(model, backend="kvquant", options=options), ids, 8)
            states = [t for layer in cache for t in layer]
            status = {e.status for r in kvcompile.reports()[1:] for e in r.entries}
            print(f"{layout:>7} {attention:>7}: {sum(isinstance(t, kvcompile.KVState) for t in states)}/{len(states)} "
                  f"cache tensors quantized, {kvcompile.cache_nbytes(list(cache)):,} bytes; {'; '.join(sorted(status))}")
