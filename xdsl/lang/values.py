"""The values the checker computes with while it evaluates spec expressions (`lang/check.py`, `lang/terms.py`).

A name evaluates to a network (`NetV`), a path (`PathV`), a list, a number, a string, the labels `y`,
a loss term (`TermV`) or a schedule (`ClockV`, a number that changes while training); the checker
turns them into `ir` terms and plain constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xdsl.lang import ir

__all__ = ["BoolV", "ClockV", "EnsembleV", "IndicesV", "LabelsV", "ListV", "NetV", "NumV", "PathV", "StrV", "TermV",
           "combine", "kind_of", "literal", "number_term"]


@dataclass(frozen=True)
class NetV:
    name: str
    epoch: int | None = None


@dataclass(frozen=True)
class PathV:
    path: ir.Path
    explicit_from: int  # steps before this index were implied by `net.part` (prefix completion)


@dataclass(frozen=True)
class EnsembleV:
    ensemble: ir.Ensemble


@dataclass(frozen=True)
class ListV:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class NumV:
    value: float


@dataclass(frozen=True)
class StrV:
    value: str


@dataclass(frozen=True)
class BoolV:
    value: bool


@dataclass(frozen=True)
class LabelsV:
    pass


@dataclass(frozen=True)
class IndicesV:
    pass


@dataclass(frozen=True)
class TermV:
    term: ir.Term


@dataclass(frozen=True)
class ClockV:
    """A number computed from `epoch`, `epochs`, `step` while training (a schedule): a term without losses."""

    term: ir.Term


def number_term(v: Any) -> ir.Term | None:
    """A number, schedule or loss as a term (the one place a number becomes a term), else None."""
    if isinstance(v, NumV):
        return ir.Const(float(v.value))
    if isinstance(v, ClockV | TermV):
        return v.term
    return None


def combine(term: ir.Term, *operands: Any) -> Any:
    """`term` computed from `operands` is a loss if one of them is, else a schedule."""
    return TermV(term) if any(isinstance(o, TermV) for o in operands) else ClockV(term)


def kind_of(v: Any) -> str:
    return {NetV: "a network", PathV: "a path", ListV: "a list", NumV: "a number", StrV: "a string",
            BoolV: "a boolean", LabelsV: "the labels y", IndicesV: "the sample indices i", TermV: "a loss",
            ClockV: "a number that changes while training (epoch, epochs, step)",
            EnsembleV: "an ensemble"}.get(type(v), "a value")


def literal(v: Any) -> Any:
    """A checked constant value as plain Python (for kwargs of data, models, adapters...)."""
    if isinstance(v, NumV | StrV | BoolV):
        return v.value
    if isinstance(v, ListV):
        return [literal(i) for i in v.items]
    if isinstance(v, NetV):
        return v.name
    raise TypeError
