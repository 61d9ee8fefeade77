"""What one cache tensor is: its `Layout` (fixed when the graph is compiled) and its `Packed` tensors.

A `Layout` is built once, by a method from the user's `Config` (methods/<method>.py: `layouts`), and
then travels as it is: the FX pass puts it in the graph, the state keeps it as its flatten context, the
ops receive it and the kernel launchers read their constants from it. Nothing downstream re-derives a
field from another. Across the torch.library op boundary, which takes schema types only, it travels as
its `key` string and comes back as the same record (`Layout.from_key`).

A `Packed` is one cache tensor at run time: the padded inner tensors of a state (see state.py) with
their Layout and the two counts that change every step:

  codes  uint8 [B, H, PAD + C, D*bits/8]   packed codes of the nq oldest tokens, then spare rows
                                           (3-bit codes: 8 in 3 bytes)
  scale  [B, H, PAD + C/G, D] (axis TOKEN_AXIS) or [B, H, PAD + C, D/G] (axis CHANNEL_AXIS)
  mn     same shape as scale where the format stores a minimum, else last dim 0
  res    [B, H, PAD + Nr, D]   the newest Nr tokens in full precision
  nq     rows of packed storage in use (the skip dropped ones included)
  skip   the oldest packed rows a sliding window has dropped (0 for other layers)

The cache it stands for is tokens [skip, nq) of the packed storage, then the residual:
T = nq - skip + Nr. PAD unused leading rows keep every dynamic size >= 2 (state.py says why).
"""

from __future__ import annotations

import functools
import typing
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .methods import Format

SymInt = Union[int, torch.SymInt]

TOKEN_AXIS = 2  # groups of consecutive tokens of one channel (kivi's keys)
CHANNEL_AXIS = 3  # groups of consecutive channels of one token
PAD = 2  # unused leading rows of every inner tensor along dim 2 (state.py)


class Layout(NamedTuple):
    """How one cache tensor (the keys or the values of one layer) is stored. Hashable, literals only
    (it is an FX graph constant and the state's flatten context)."""

    method: str  # whose policy moves tokens out of the residual (methods/<method>.py)
    role: str  # "k" or "v"
    format: str  # the storage format of the codes (methods.FORMATS)
    bits: int  # bits per code (16 for format "none": nothing quantized)
    group: int  # group size along `axis` (a block of channels for the per-token formats)
    axis: int  # TOKEN_AXIS or CHANNEL_AXIS
    residual: int  # R: the full-precision window
    window: bool = False  # a sliding-window layer: the state drops its oldest tokens (state.kv_window)
    static: bool = False  # a fixed-size buffer written in place at given positions (state.kv_static_write)
    logical: str = "bhtd"  # the model's layout of the cache tensor (`logical_dims`); stored [B, H, T, D]
    heads: int = 0  # H, where a dim of the model's layout merges the heads with another (else 0)

    @property
    def fmt(self) -> "Format":
        """The storage format's record (methods.FORMATS)."""
        from .methods import FORMATS

        return FORMATS[self.format]

    @property
    def quantized(self) -> bool:
        return self.format != "none"

    @property
    def overlay(self) -> bool:
        """A fixed-size buffer that keeps a full-precision window (kivi, or residual_length > 0): its `res`
        rows are labelled with their token positions (the state's `wpos`) and serve those positions in place
        of the packed rows (state.py: static states with a window)."""
        return self.static and self.quantized and self.residual > 0

    def n_quantize(self, n_res: SymInt) -> SymInt:
        """How many of the oldest residual tokens to quantize now (after attention has read them)."""
        if not self.quantized:
            return 0
        from .methods import METHODS

        return METHODS[self.method].n_quantize(self, n_res)

    def scale_rows(self, n: SymInt) -> SymInt:
        """Rows of scale (and mn) that n tokens of packed codes take."""
        return n // self.group if self.axis == TOKEN_AXIS else n

    @property
    def drop_quantum(self) -> int:
        """Packed rows are freed in multiples of this (keys grouped along tokens: whole scale rows)."""
        return self.group if self.axis == TOKEN_AXIS else 1

    def capacity(self, need: SymInt) -> SymInt:
        """Tokens of packed storage to allocate when `need` do not fit: need plus 1/64 (so the bytes
        held stay within a few percent of the packed size), rounded up to whole groups (keys: scale
        rows cover G tokens) or to 32 tokens (values). Growing copies the storage once per
        ~need/64 tokens, or at most once per key flush (R tokens) while need/64 < R."""
        quantum = self.group if self.axis == TOKEN_AXIS else 32
        want = need + need // 64
        return ((want + quantum - 1) // quantum) * quantum

    def widths(self, head_dim: int) -> Tuple[int, int, int]:
        """Last-dim sizes of (codes, scale, mn) rows: codes rows are tokens; scale and mn rows are groups
        of tokens (token axis) or tokens (channel axis). A format with no minimum stores mn of width 0."""
        if not self.quantized:
            return 0, 0, 0
        codes = head_dim * self.bits // 8
        scale = head_dim if self.axis == TOKEN_AXIS else head_dim // self.group
        return codes, scale, scale if self.fmt.has_min else 0

    # -- the model's layout: the state looks like the tensor the model keeps, stores [B, H, T, D] --

    @property
    def groups(self) -> Tuple[str, ...]:
        """One string of canonical letters (b, h, t, d; major first) per dim of the model's layout:
        "bthd" -> ("b", "t", "h", "d"); "bt(hd)" -> ("b", "t", "hd"). A letter absent has size 1."""
        return logical_dims(self.logical)

    @property
    def dynamic_dims(self) -> Tuple[int, ...]:
        """The dims of the model's layout whose sizes vary between calls: those holding tokens (which grow every
        step) and the batch alone (which varies between generations)."""
        return tuple(d for d, group in enumerate(self.groups) if "t" in group or group == "b")

    @property
    def token_dim(self) -> int:
        """The dim of the model's layout that holds the tokens."""
        return self.groups.index("t")

    def to_canonical(self, x: Tensor) -> Tensor:
        """x in the model's layout -> [B, H, T, D] (a view where the layout allows)."""
        letters, sizes = [], []
        for group, size in zip(self.groups, x.shape):
            for letter in group:
                letters.append(letter)
                sizes.append(self.heads if letter == "h" and len(group) > 1 else
                             size // self.heads if len(group) > 1 else size)
        x = x.reshape(sizes) if len(sizes) != x.dim() else x
        for letter in "bhtd":
            if letter not in letters:  # a size-1 canonical dim the model's layout does not have
                letters.append(letter)
                x = x.unsqueeze(-1)
        return x.permute([letters.index(c) for c in "bhtd"])

    def from_canonical(self, x: Tensor) -> Tensor:
        """[B, H, T, D] -> the model's layout (the inverse of to_canonical)."""
        letters = "".join(self.groups)
        dims = {c: i for i, c in enumerate("bhtd")}
        x = x.permute([dims[c] for c in letters] + [dims[c] for c in "bhtd" if c not in letters])
        for _ in range(4 - len(letters)):
            x = x.squeeze(-1)
        return x.reshape(self.logical_shape(*(x.shape[letters.index(c)] if c in letters else 1 for c in "bhtd")))

    def logical_shape(self, B: SymInt, H: SymInt, T: SymInt, D: SymInt) -> Tuple[SymInt, ...]:
        """The shape of the model's cache tensor holding B x H x T x D."""
        size = {"b": B, "h": H, "t": T, "d": D}
        out = []
        for group in self.groups:
            n = 1
            for letter in group:
                n = n * size[letter]
            out.append(n)
        return tuple(out)

    @property
    def key(self) -> str:
        """The record as a string, for the torch.library ops (`from_key` gives it back)."""
        return _key(self)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def from_key(key: str) -> "Layout":
        fields = dict(item.split("=", 1) for item in key.split(","))
        parse = {str: str, int: int, bool: lambda s: s == "True"}
        kinds = typing.get_type_hints(Layout)
        return Layout(**{name: parse[kinds[name]](fields[name]) for name in Layout._fields})


@functools.lru_cache(maxsize=None)
def _key(layout: Layout) -> str:  # made once: every op call of a decode step passes it
    return ",".join(f"{name}={value}" for name, value in zip(layout._fields, layout))


FULL = slice(None, None, None)  # a whole dim, as an index


def index_dims(idx, ndim: int) -> Optional[tuple]:
    """A basic index of a tensor of `ndim` dims as one entry per dim (Ellipsis expanded, missing trailing
    dims whole), or None if it adds (None) or drops dims."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if sum(i is Ellipsis for i in idx) > 1 or any(i is None for i in idx):
        return None
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (FULL,) * (ndim - len(idx) + 1) + idx[at + 1:]
    idx = idx + (FULL,) * (ndim - len(idx))
    return idx if len(idx) == ndim else None


@functools.lru_cache(maxsize=None)
def logical_dims(logical: str) -> Tuple[str, ...]:
    """"bt(hd)" -> ("b", "t", "hd"): the canonical letters of each dim, a parenthesised group merged."""
    out, group = [], None
    for c in logical:
        if c == "(":
            group = ""
        elif c == ")":
            out.append(group)
            group = None
        elif group is not None:
            group += c
        else:
            out.append(c)
    return tuple(out)


class Packed(NamedTuple):
    """One cache tensor as the ops and kernels read it (module docstring)."""

    codes: Tensor
    scale: Tensor
    mn: Tensor
    res: Tensor
    layout: Layout
    nq: SymInt
    skip: SymInt = 0

    @property
    def tensors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.codes, self.scale, self.mn, self.res

    @property
    def ntok(self) -> SymInt:
        """T, the tokens of the cache: nq - skip packed ones, then the residual."""
        return self.nq - self.skip + self.res.shape[2] - PAD

    def op_args(self) -> tuple:
        """The arguments a torch.library op takes for this tensor (`from_op` is the inverse)."""
        return (*self.tensors, self.layout.key, self.nq, self.skip)

    @staticmethod
    def from_op(codes: Tensor, scale: Tensor, mn: Tensor, res: Tensor, key: str, nq: SymInt, skip: SymInt
                ) -> "Packed":
        return Packed(codes, scale, mn, res, Layout.from_key(key), nq, skip)
