"""Options of the `kvquant` backend, validated into one frozen dataclass.

Every error is a `KVQuantOptionError` (a ValueError) that names the bad value and the valid ones, and
is raised before anything runs.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import KVQuantOptionError
from .methods import METHODS

COMPILERS = ("inductor", "aot_eager", "eager")
_INT_OPTIONS = ("bits", "k_bits", "v_bits", "group_size", "residual_length", "block_size")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Config:
    """What the user asked for. `bits` and `residual_length` default per method (None): bits 2 for
    kivi, 4 for nqkv, 8 for int8 and fp8; residual_length 128 for kivi, 0 for the others.
    `k_bits`/`v_bits` default to `bits`. `group_size` is kivi's; `block_size` and `hadamard` (quantize
    each block in its Hadamard basis, methods/nqkv.py) nqkv's."""

    method: str = "kivi"
    bits: Optional[int] = None
    k_bits: Optional[int] = None
    v_bits: Optional[int] = None
    group_size: int = 32
    residual_length: Optional[int] = None
    block_size: int = 64
    hadamard: bool = False
    compiler: str = "inductor"

    def __post_init__(self) -> None:
        for name in _INT_OPTIONS:  # numpy and other integral types become plain ints
            value = getattr(self, name)
            if _is_int(value) and type(value) is not int:
                object.__setattr__(self, name, int(value))
        if self.method not in METHODS:
            raise KVQuantOptionError(f"method must be one of {', '.join(map(repr, METHODS))}; got {self.method!r}")
        method = METHODS[self.method]
        if self.compiler not in COMPILERS:
            raise KVQuantOptionError(f"compiler must be one of {', '.join(map(repr, COMPILERS))}; got {self.compiler!r}")
        if self.bits is None:
            object.__setattr__(self, "bits", method.default_bits)
        if self.residual_length is None:
            object.__setattr__(self, "residual_length", method.default_residual)
        if not isinstance(self.hadamard, bool):
            raise KVQuantOptionError(f"hadamard must be True or False; got {self.hadamard!r}")
        if self.hadamard and self.method != "nqkv":
            raise KVQuantOptionError(f"hadamard=True applies to method 'nqkv' only; got method {self.method!r}")
        if self.method == "none":
            return  # bits, group and residual are not used
        valid = method.formats[0].bits
        for name in ("bits", "k_bits", "v_bits"):
            value = getattr(self, name)
            if value is None and name != "bits":
                continue
            if not _is_int(value) or value not in valid:
                raise KVQuantOptionError(
                    f"{name} must be one of {', '.join(map(str, valid))} for method {self.method!r}; got {value!r}"
                )
        for name in ("group_size", "block_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise KVQuantOptionError(f"{name} must be a positive int; got {value!r}")
        r = self.residual_length
        if self.method != "kivi":
            if not _is_int(r) or r < 0:
                raise KVQuantOptionError(f"residual_length must be an int >= 0 for method {self.method!r}; got {r!r}")
            return
        if not _is_int(r) or r < 1:
            raise KVQuantOptionError(f"residual_length must be a positive int; got {r!r}")
        if r % self.group_size:
            raise KVQuantOptionError(
                f"residual_length must be a multiple of group_size ({self.group_size}); got {r}"
            )

    @property
    def key_bits(self) -> int:
        return self.k_bits if self.k_bits is not None else self.bits

    @property
    def value_bits(self) -> int:
        return self.v_bits if self.v_bits is not None else self.bits

    def bits_options(self) -> dict:
        """{option name: bits} for the keys' and the values' bits, named as the user set them (`bits`
        when neither k_bits nor v_bits was given), for error messages."""
        return {"k_bits" if self.k_bits is not None else "bits": self.key_bits,
                "v_bits" if self.v_bits is not None else "bits": self.value_bits}

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]]) -> "Config":
        """Build from `torch.compile(..., options=...)`; unknown keys are an error."""
        if options is None:
            return cls()
        if isinstance(options, Config):
            return options
        if not isinstance(options, Mapping):
            raise KVQuantOptionError(f"options must be a dict; got {type(options).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise KVQuantOptionError(f"unknown option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(names)}")
        return cls(**options)
