"""Compile every Triton kernel variant of kvcompile for an H100 (sm_90) without a GPU.

The interpreter (TRITON_INTERPRET=1), which the tests run the kernels under on a CPU, accepts code
that the real compiler rejects. This script sends each kernel, with the constexpr combinations the
launchers use (every storage format and bit width, fp16 and bf16, several head_dims), through
Triton's whole pipeline down to ptxas, Triton's bundled assembler, and fails on the first error.
tests/test_kernels.py runs it in a subprocess.

    python scripts/compile_sm90.py        # needs triton, not a GPU; run without TRITON_INTERPRET
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvcompile.kernels import triton_attention as ta  # noqa: E402
from kvcompile.kernels import triton_quantize as tq  # noqa: E402
from kvcompile.layout import CHANNEL_AXIS, TOKEN_AXIS  # noqa: E402
from kvcompile.methods import FORMATS as _FORMATS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TL = {"fp16": tl.float16, "bf16": tl.bfloat16}


def signature(fn, consts: dict, dtype: str) -> dict:
    """Argument types by name: uint8 codes and bool masks, fp32 levels / midpoints / partials, the cache
    dtype for x, q, p, scales, minimums, residuals and outputs, i64 strides, i32 sizes, fp32 scale."""
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("C", "KC", "VC", "MASK"):
            sig[n] = "*u8"
        elif n in ("BOUNDS", "KLV", "VLV", "PART_M", "PART_L", "PART_ACC"):
            sig[n] = "*fp32"
        elif n in ("X", "S", "MN", "Q", "P", "KS", "KM", "KR", "VS", "VM", "VR", "OUT"):
            sig[n] = f"*{dtype}"
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i64" if n.startswith("stride") else "i32"
    return sig


def build(fn, consts: dict, dtype: str, num_warps: int = 4) -> None:
    triton.compile(ASTSource(fn, signature(fn, consts, dtype), consts), target=TARGET,
                   options=dict(num_warps=num_warps))


def cache_consts(prefix: str, fmt: int, bits: int, group: int, axis: int) -> dict:
    return {f"{prefix}BITS": bits, f"{prefix}GROUP": group, f"{prefix}AXIS": axis, f"{prefix}FMT": fmt}


# (format, bits, group, axis) per cache tensor, for head_dim D (group None: D)
FORMATS = [("kivi", 2, 32, TOKEN_AXIS), ("kivi", 4, 32, CHANNEL_AXIS), ("nf", 4, 64, CHANNEL_AXIS),
           ("nf", 3, 32, CHANNEL_AXIS), ("nf", 2, None, CHANNEL_AXIS), ("int8", 8, None, CHANNEL_AXIS),
           ("fp8", 8, None, CHANNEL_AXIS)]


# (head_dim, cache dtype): powers of 2 and a padded tile (80 -> 128)
SHAPES = [(64, "bf16"), (128, "fp16"), (80, "bf16")]


def main() -> int:
    built = 0
    for D, dtype in SHAPES:
        for name, bits, group, axis in FORMATS:
            fmt = _FORMATS[name].kernel
            g = D if group is None else min(group, D)
            if D % g or (bits == 3 and D % 8):
                continue
            # -- the per-token quantizer --
            if axis == CHANNEL_AXIS:
                perw = 8 if bits == 3 else 8 // bits
                build(tq._quantize_per_token_kernel, dict(
                    D=D, GROUP=g, BITS=bits, FMT=fmt, IS_BF16=dtype == "bf16", PERW=perw, BLOCK_T=4,
                    BLOCK_A=triton.next_power_of_2(D // g), BLOCK_G=triton.next_power_of_2(g),
                    BLOCK_W=triton.next_power_of_2(D // perw)), dtype)
            else:  # kivi's keys: groups along the tokens
                per = 8 // bits
                build(tq._quantize_tokens_kernel, dict(GROUP=g, BITS=bits, PER=per, IS_BF16=dtype == "bf16",
                                                        BLOCK_T=16, BLOCK_BY=min(D // per, 64 // per)), dtype)
            built += 1
            # -- attention (keys and values in this format; kivi keys on the token axis), qk, pv --
            bm, bn, bd, bdv, warps = ta._blocks(D, D, 3, _torch(dtype), None, None)
            flags = dict(COMPUTE=TL[dtype], RNE_BF16=False, UPCAST=False, IEEE=False)
            k = cache_consts("K_", fmt, bits, g, axis)
            v = cache_consts("V_", fmt, bits, g, CHANNEL_AXIS)
            build(ta._attn_fwd_kernel, dict(**k, **v, D=D, DV=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                                            BLOCK_DV=bdv, MASK_KIND=ta.MASK_BOOL, IS_CAUSAL=False, WRITE_PARTIAL=True,
                                            **flags), dtype, warps)
            build(ta._qk_kernel, dict(**k, D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **flags),
                  dtype, warps)
            build(ta._pv_kernel, dict(**v, DV=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=bdv,
                                      WRITE_PARTIAL=False, **flags), dtype, warps)
            built += 3
    print(f"compiled {built} kernel variants for sm_90 (triton {triton.__version__})")
    return 0


def _torch(dtype: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


if __name__ == "__main__":
    sys.exit(main())
