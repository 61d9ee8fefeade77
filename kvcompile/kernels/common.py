"""What the Triton kernels share: named constants, reductions, rounding, and the launch helpers.

The storage formats' kernel ids, the axes and the padding come from their one declaration
(methods/*.py: `Format.kernel`, layout.py), named here as `tl.constexpr` values so that kernels
branch on `FMT == FMT_NF` rather than on a number.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import layout as _layout
from ..methods import FORMATS, fp8, int8

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# storage formats (Format.kernel)
FMT_KIVI = tl.constexpr(FORMATS["kivi"].kernel)  # asymmetric: code * scale + mn
FMT_NF = tl.constexpr(FORMATS["nf"].kernel)  # NormalFloat: levels[code] * scale
FMT_INT8 = tl.constexpr(FORMATS["int8"].kernel)  # (byte - INT8_ZERO) * scale
FMT_FP8 = tl.constexpr(FORMATS["fp8"].kernel)  # e4m3fn(byte) * scale
FMT_NONE = tl.constexpr(FORMATS["none"].kernel)  # nothing quantized: only the residual holds tokens
INT8_QMAX = tl.constexpr(int8.QMAX)
INT8_ZERO = tl.constexpr(int8.ZERO)
FP8_MAX = tl.constexpr(fp8.FP8_MAX)
# layouts
TOKEN_AXIS = tl.constexpr(_layout.TOKEN_AXIS)
CHANNEL_AXIS = tl.constexpr(_layout.CHANNEL_AXIS)
PAD = tl.constexpr(_layout.PAD)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if interpreting() and type(tl.sum).__name__ != "InterpretedFunction":
    # tl.sum & co. are @triton.jit functions of Triton's standard library, decorated when triton is
    # imported: the kernels below would be interpreted but not the library they call.
    raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported (torch._dynamo imports it): set it "
                       "in the environment, or before importing torch._dynamo")


@triton.jit
def round_to_storage(x, IS_BF16: tl.constexpr, DTYPE: tl.constexpr):
    """float32 x rounded (to nearest even) to DTYPE, returned as DTYPE.

    For bfloat16 the rounding is done on the bits: the interpreter's float32 -> bfloat16 cast
    truncates (TRITON_INTERPRET=1, Triton <= 3.9), while GPUs round to nearest even. Once x holds a
    bfloat16 value exactly, the cast is exact everywhere. NaN is not expected (groups are finite)."""
    if IS_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def head_rows(C, S, MN, R, b, h, stride_cb, stride_ch, stride_cn, stride_sb, stride_sh, stride_sn,
              stride_rb, stride_rh, stride_rn):
    """The pointers of one (batch, head)'s codes, scale, mn and residual, past their PAD rows (mn shares
    scale's strides)."""
    c = C + b * stride_cb + h * stride_ch + PAD * stride_cn
    s = S + b * stride_sb + h * stride_sh + PAD * stride_sn
    m = MN + b * stride_sb + h * stride_sh + PAD * stride_sn
    r = R + b * stride_rb + h * stride_rh + PAD * stride_rn
    return c, s, m, r


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_splits(device: torch.device, programs: int, n_tiles: int, num_splits: Optional[int]) -> Tuple[int, int]:
    """(splits, tiles per split) of n_tiles along the cache (flash-decoding). By default enough splits
    to give every SM about two programs, keeping at least two tiles per split so the partial results
    stay small next to the cache they summarize; one split off CUDA and under the interpreter. No
    split is empty; at most 65535 (a grid dim's limit)."""
    if num_splits is None:
        num_splits = 1
        if device.type == "cuda" and not interpreting():
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            num_splits = max(1, min(triton.cdiv(2 * sms, max(programs, 1)), n_tiles // 2))
    num_splits = max(1, min(int(num_splits), n_tiles, 65535))
    per = triton.cdiv(n_tiles, num_splits)
    return triton.cdiv(n_tiles, per), per


def dtype_flags(dtype: torch.dtype) -> dict:
    """The compute dtype of the attention kernels, and how the interpreter must work around bfloat16:
    RNE_BF16 rounds on the bits (round_to_storage), UPCAST hands tl.dot float32 (the interpreter's
    bfloat16 tl.dot is wrong), IEEE asks for float32 products without TF32."""
    interp = interpreting()
    bf16 = dtype == torch.bfloat16
    upcast = bf16 and interp
    return dict(COMPUTE=TL_DTYPES[dtype], RNE_BF16=bf16 and interp, UPCAST=upcast,
                IEEE=dtype == torch.float32 or upcast)
