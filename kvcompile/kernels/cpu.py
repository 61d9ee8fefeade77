"""Decode attention over the packed cache on the CPU, compiled by Inductor: the CPU's fast path (opt-in
for now: KVCOMPILE_KERNELS=cpu; the torch reference, reference.attention, stays the oracle and the
default).

The reference dequantizes the whole cache to full precision, then calls SDPA: it reads the packed
bytes, writes a full-precision copy and reads that again. Here the attention is written as reductions
over the packed tensors (`(q * dequant(K)).sum(-1)` over the head dim for the scores, `(p *
dequant(V)).sum(-2)` over the tokens for the output), and torch.compile (Inductor, dynamic shapes)
fuses unpack -> affine (or level lookup) -> multiply -> reduce into vectorised C++ loop nests that
read the codes, scales and minimums once and never write a full-precision K or V. The full-precision
window is read as it is. For few queries (decode, L <= 16), where attention is bound by reading the
cache; a longer prefill keeps the reference.

Arithmetic: float32 throughout (the scores, a softmax of its own that gives 0 for a row every key of
which is masked, as SDPA does), rounded once to q's dtype: within the reference's own error against
float64, not bit-exact to it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..layout import PAD, Packed
from . import reference as ref

MAX_QUERIES = 16  # decode and short chunks; longer prefills are compute-bound: the reference's SDPA
RECOMPILE_LIMIT = 256


def _packed_tokens(p: Packed) -> Tensor:
    """The packed rows' tokens [B, H, nq - skip, D], dequantized in float32: an expression Inductor fuses
    into its consumer, not a tensor it writes."""
    lay, D = p.layout, p.res.shape[-1]
    ns = lay.scale_rows(p.nq)
    x = ref.dequantize(p.codes[:, :, PAD:PAD + p.nq], p.scale[:, :, PAD:PAD + ns].float(),
                       p.mn[:, :, PAD:PAD + ns].float(), lay, D)
    return x[:, :, p.skip:]


def _attend(q: Tensor, k: Packed, v: Packed, mask: Optional[Tensor], is_causal: bool, scale: float) -> Tensor:
    B, Hq, L, D = q.shape
    Hkv = k.res.shape[1]
    rows = Hq // Hkv * L  # the query rows of one KV head: (query head, query) pairs
    qg = q.float().reshape(B, Hkv, rows, D) * scale
    kr, vr = ref.unpad(k.res).float(), ref.unpad(v.res).float()
    s = torch.matmul(qg, kr.transpose(2, 3))  # the window: [B, Hkv, rows, Nr]
    if k.layout.quantized:
        kq = _packed_tokens(k)
        s = torch.cat([(qg[:, :, :, None, :] * kq[:, :, None, :, :]).sum(-1), s], dim=-1)
    T = s.shape[-1]
    if mask is not None:
        m = mask.expand(B, Hq, L, T).reshape(B, Hkv, rows, T)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    if is_causal:
        qi = torch.arange(rows, device=q.device) % L
        s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > qi[:, None], float("-inf"))
    top = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(top == float("-inf"), 0.0, top))
    total = e.sum(-1, keepdim=True)
    nvq = T - vr.shape[2]  # values: packed tokens first, then the window (their own split)
    out = torch.matmul(e[..., nvq:], vr)
    if v.layout.quantized:
        out = out + (e[..., :nvq, None] * _packed_tokens(v)[:, :, None]).sum(-2)
    out = out / torch.where(total == 0.0, 1.0, total)
    return out.reshape(B, Hq, L, -1).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_attend, dynamic=True, fullgraph=True)


# Formats whose codes are whole bytes (int8, fp8): measured faster than the reference here
# (benchmarks/bench_cpu_attention.py). Sub-byte codes (kivi, nf: 2-4 bits) compile to loops that are
# slower than the reference's (the unpack is not vectorised), so they keep the reference.
FORMATS = ("int8", "fp8")


def usable(q: Tensor, k: Packed, v: Packed, dropout_p: float) -> bool:
    """Whether the fast path serves this call: CPU, few queries, no dropout, byte formats (FORMATS)."""
    return (q.device.type == "cpu" and q.shape[2] <= MAX_QUERIES and dropout_p == 0.0
            and all(p.layout.format in FORMATS + ("none",) for p in (k, v))
            and (k.layout.quantized or v.layout.quantized))


def attention(q: Tensor, k: Packed, v: Packed, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
              scale: Optional[float] = None) -> Tensor:
    """SDPA of q [B, Hq, L, D] over packed keys and values (Hkv divides Hq) -> [B, Hq, L, Dv]."""
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # one graph per layout pair, mask kind and dtype: more than Dynamo's default 8 in a process that mixes them
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=limit):
        warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")  # NF's level table: traced, fine
        return _compiled()(q, k, v, attn_mask, bool(is_causal), s)
