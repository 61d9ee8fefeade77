"""Helpers the tests share: layouts and packed cache tensors built from the reference, exact and
max-difference comparisons."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from kvcompile.kernels import reference as ref
from kvcompile.layout import CHANNEL_AXIS, PAD, TOKEN_AXIS, Layout, Packed

METHOD_OF = {"kivi": "kivi", "nf": "nqkv", "nfh": "nqkv", "int8": "int8", "fp8": "fp8", "none": "none"}


def lay(fmt: str, bits: int, group: int, axis: int = CHANNEL_AXIS, residual: int = 0, **flags) -> Layout:
    """A Layout of storage format `fmt` (the role follows the axis: keys group along tokens)."""
    return Layout(METHOD_OF[fmt], "k" if axis == TOKEN_AXIS else "v", fmt, bits, group, axis, residual, **flags)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels' tests: real kernels, or the interpreter


def packed(B: int, H: int, nq: int, nr: int, D: int, layout: Layout, dtype=torch.float32, seed: int = 0,
           gen: Optional[torch.Generator] = None, spare: int = 0, device: str = "cpu",
           spread: float = 0.0, first: float = 0.75) -> Packed:
    """A Packed holding nq quantized tokens (quantized with the reference) and nr residual ones, with
    `spare` rows of garbage after the nq (preallocated capacity: no read may touch them). A layout of
    format "none" keeps all nq + nr tokens in the residual. `spread`: token magnitudes drawn over that
    many decades around 1 (per-token scales then differ widely). The first token is constant, `first` in
every channel (scale 0 for kivi's channel groups; 0 gives a zero block to every format)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    if not layout.quantized:
        nr, nq = nr + nq, 0
    x = torch.randn(B, H, nq + nr, D, generator=gen)
    if spread:
        x = x * 10 ** torch.empty(B, H, nq + nr, 1).uniform_(-spread / 2, spread / 2, generator=gen)
    x = x.to(dtype)
    if nq:
        x[0, 0, 0] = first
    if layout.quantized:
        c, s, m = ref.quantize(x[:, :, :nq], layout)
    else:
        c, s, m = (torch.zeros(B, H, 0, 0, dtype=t) for t in (torch.uint8, dtype, dtype))
    if spare and layout.quantized:
        junk = 1e4 if dtype != torch.float16 else 6e4
        srows = layout.scale_rows(spare)
        c = torch.cat([c, torch.full((B, H, spare, c.shape[3]), 0xFF, dtype=torch.uint8)], dim=2)
        s = torch.cat([s, torch.full((B, H, srows, s.shape[3]), junk, dtype=dtype)], dim=2)
        m = torch.cat([m, torch.full((B, H, srows, m.shape[3]), -junk, dtype=dtype)], dim=2)
    return Packed(*(ref.pad(t).to(device) for t in (c, s, m, x[:, :, nq:])), layout, nq)


def full_packed(p: Packed) -> Packed:
    """p as a Packed whose every codes row is a token (nq = all rows)."""
    return p._replace(nq=p.codes.shape[2] - PAD)


def assert_exact(actual: Tensor, expected: Tensor, name: str = "tensor") -> None:
    """atol=0, rtol=0; on failure name the first mismatching index (Liger style)."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    bad = actual != expected
    if actual.dtype.is_floating_point:
        bad &= ~(torch.isnan(actual) & torch.isnan(expected))
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: "
            f"got {actual[idx].item()}, expected {expected[idx].item()}"
        )


def max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """The largest |a_i - b_i| over paired lists of tensors (or two tensors); raises if the lists
    differ in length or are empty, so a comparison of nothing cannot pass."""
    if isinstance(a, Tensor):
        a, b = [a], [b]
    assert len(a) == len(b) and len(a) > 0, f"compared {len(a)} against {len(b)} tensors"
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
