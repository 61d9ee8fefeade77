"""What the passes did: counters, per-graph reports, and `explain()` for the user.

The backend never prints. Each compiled graph adds a `GraphReport` here, bumps
`torch._dynamo.utils.counters["kvquant"]`, logs a one-line summary at INFO on the "kvcompile"
logger, and warns once about whatever it had to leave alone.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Deque, List, Optional, Tuple

from .errors import KVQuantWarning  # noqa: F401  (re-exported)

log = logging.getLogger("kvcompile")


@dataclass
class Entry:
    node: str  # the cache update's node in the Dynamo graph
    role: Optional[str]  # "keys" / "values" / None if unknown
    status: str  # "quantized (prefill: stored)", "quantized (decode: fused attention)", "left alone"
    attention: List[str] = field(default_factory=list)  # attention ops rewritten
    reason: Optional[str] = None


@dataclass
class GraphReport:
    index: int
    method: str
    entries: List[Entry] = field(default_factory=list)
    sdpa_ops: int = 0
    matmul_ops: int = 0
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)  # what runs another way than asked (warned once)
    swaps: List[Tuple[int, Any]] = field(default_factory=list)  # (graph input index, Layout): buffers.py

    @property
    def quantized(self) -> List[Entry]:
        return [e for e in self.entries if e.status != "left alone"]

    @property
    def rewrote(self) -> bool:
        """Whether the graph now runs kvquant ops."""
        return bool(self.quantized)

    @property
    def left_alone(self) -> List[Entry]:
        return [e for e in self.entries if e.status == "left alone"]

    def summary(self) -> str:
        return (
            f"graph {self.index} (method={self.method}): {len(self.quantized)} cache update(s) quantized, "
            f"{len(self.left_alone)} left alone; attention in graph: {self.sdpa_ops} sdpa, "
            f"{self.matmul_ops} 4-D matmul"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        for e in self.entries:
            role = f" {e.role}" if e.role else ""
            line = f"  {e.node}{role}: {e.status}"
            if e.attention:
                line += f"; attention rewritten: {', '.join(e.attention)}"
            if e.reason:
                line += f"; why: {e.reason}"
            lines.append(line)
        lines += [f"  note: {n}" for n in self.notes] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


_REPORTS: Deque[GraphReport] = collections.deque(maxlen=256)


def new_report(method: str) -> GraphReport:
    index = _REPORTS[-1].index + 1 if _REPORTS else 0
    rep = GraphReport(index, method)
    _REPORTS.append(rep)
    return rep


def reports() -> List[GraphReport]:
    """Reports of the graphs compiled so far (the newest 256), oldest first."""
    return list(_REPORTS)


def explain() -> str:
    """A readable account of every graph the kvquant backend compiled: what it rewrote, and what it
    left alone and why."""
    if not _REPORTS:
        return "kvquant has compiled no graph yet"
    return "\n".join(str(r) for r in _REPORTS)


def reset() -> None:
    """Forget the reports (counters live in torch._dynamo.utils.counters['kvquant'])."""
    _REPORTS.clear()
