"""Options of the `kvquant` backend, validated into one frozen dataclass.

Every error names the bad value and the valid ones, and is raised before anything runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

METHODS = ("kivi", "none", "nqkv", "int8", "fp8")
IMPLEMENTED_METHODS = ("kivi", "none")
COMPILERS = ("inductor", "aot_eager", "eager")
BITS = {"kivi": (2, 4), "none": (16,), "nqkv": (2, 3, 4), "int8": (8,), "fp8": (8,)}


@dataclass(frozen=True)
class Config:
    """What the user asked for. `k_bits`/`v_bits` default to `bits`."""

    method: str = "kivi"
    bits: int = 2
    k_bits: Optional[int] = None
    v_bits: Optional[int] = None
    group_size: int = 32
    residual_length: int = 128
    compiler: str = "inductor"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {self.method!r}")
        if self.method not in IMPLEMENTED_METHODS:
            raise ValueError(
                f"method {self.method!r} is reserved but not implemented yet; "
                f"implemented methods: {', '.join(map(repr, IMPLEMENTED_METHODS))}"
            )
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {', '.join(map(repr, COMPILERS))}; got {self.compiler!r}")
        if self.method == "none":
            return  # bits, group and residual are not used
        valid = BITS[self.method]
        for name in ("bits", "k_bits", "v_bits"):
            value = getattr(self, name)
            if value is None and name != "bits":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
                raise ValueError(
                    f"{name} must be one of {', '.join(map(str, valid))} for method {self.method!r}; got {value!r}"
                )
        for name in ("group_size", "residual_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length must be a multiple of group_size ({self.group_size}); "
                f"got {self.residual_length}"
            )

    @property
    def key_bits(self) -> int:
        return self.k_bits if self.k_bits is not None else self.bits

    @property
    def value_bits(self) -> int:
        return self.v_bits if self.v_bits is not None else self.bits

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]]) -> "Config":
        """Build from `torch.compile(..., options=...)`; unknown keys are an error."""
        if options is None:
            return cls()
        if isinstance(options, Config):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict; got {type(options).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(names)}")
        return cls(**options)
