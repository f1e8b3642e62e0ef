"""The checked program: names resolved, macros expanded, every loss unrolled into a term tree.

This is what the compiler stages consume. Terms are hashable, so identical sub-results
(the same path on the same input) are recognised by equality when the graph is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Union

from xdsl.errors import Pos
from xdsl.lang import ast

__all__ = [
    "PartStep", "AdapterStep", "Step", "Path", "Ensemble", "Labels", "Indices", "Const", "Prim", "Arith", "Clock",
    "Func", "Term", "CLOCKS", "FUNCS", "term_leaves",
    "NetworkDecl", "CutDecl", "AdapterDecl", "DataDecl", "OptimizerDecl", "Stage", "EvalItem", "Program",
]

NOPOS = Pos("<generated>", 0, 0)
CLOCKS = ("epoch", "epochs", "step")  # the names a loss may use for schedules, in the objective's clock tensor
FUNCS = {"min": (2, None), "max": (2, None), "exp": (1, 1), "cos": (1, 1)}  # schedule functions: arity


@dataclass(frozen=True)
class PartStep:
    """Part number `index` of network `net` (optionally as saved after epoch `epoch`)."""

    net: str
    part: str
    index: int
    epoch: int | None = None

    def __str__(self) -> str:
        name = f"{self.net}{'' if self.epoch is None else f'@{self.epoch}'}"
        return name if self.part == "all" else f"{name}.{self.part}"  # "all": the part of an uncut network


@dataclass(frozen=True)
class AdapterStep:
    name: str

    def __str__(self) -> str:
        return self.name


Step = Union[PartStep, AdapterStep]


@dataclass(frozen=True)
class Path:
    """Modules applied one after another to the input batch `x`; `()` is `x` itself."""

    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return " >> ".join(str(s) for s in self.steps) if self.steps else "x"

    def prefix(self, n: int) -> Path:
        return Path(self.steps[:n])


@dataclass(frozen=True)
class Ensemble:
    """`ensemble(a, b)` as a teacher: log of the averaged softmax of the member paths (valid logits).

    `by="logits"` averages the members' logits instead (a sharper teacher: the DML paper's DML_e
    observation can only appear with it, since the probability average has exactly DML's gradient).
    """

    members: tuple[Path, ...]
    by: str = "probs"

    def __str__(self) -> str:
        by = "" if self.by == "probs" else f", by={self.by}"
        return f"ensemble({', '.join(str(m) for m in self.members)}{by})"


@dataclass(frozen=True)
class Labels:
    def __str__(self) -> str:
        return "y"


@dataclass(frozen=True)
class Indices:
    """`i`: each sample's position in the training set (stateful terms keep per-sample memory by it)."""

    def __str__(self) -> str:
        return "i"


@dataclass(frozen=True)
class Const:
    value: float

    def __str__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True)
class Prim:
    """A loss primitive applied to paths/labels; `args` follow the primitive's signature, defaults filled."""

    name: str
    args: tuple[Any, ...]
    pos: Pos = field(default=NOPOS, compare=False, repr=False)
    spec: Any = field(default=None, compare=False, repr=False)  # its losses.LossSpec (user primitives too)

    def __str__(self) -> str:
        return f"{self.name}({', '.join(str(a) for a in self.args)})"


@dataclass(frozen=True)
class Arith:
    op: str  # + - * /
    left: Term
    right: Term

    def __str__(self) -> str:
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True)
class Clock:
    """`epoch` (0-based in the train block), `epochs` (the block's total) or `step` (optimisation steps done in
    the block): a number known only while training, handed to the generated objective as a tensor."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Func:
    """`min`, `max`, `exp` or `cos` of terms, at least one of them a Clock (constant calls are folded)."""

    name: str
    args: tuple[Term, ...]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(str(a) for a in self.args)})"


Term = Union[Prim, Arith, Const, Clock, Func]


@dataclass(frozen=True)
class DataDecl:
    name: str
    kwargs: dict[str, Any]
    pos: Pos


@dataclass(frozen=True)
class NetworkDecl:
    name: str
    ref: str
    kwargs: dict[str, Any]
    weights: str | None
    pos: Pos


@dataclass(frozen=True)
class CutDecl:
    points: tuple[str, ...]
    parts: tuple[str, ...]
    pos: Pos


@dataclass(frozen=True)
class AdapterDecl:
    name: str
    kind: str
    kwargs: dict[str, Any]
    owners: tuple[str, ...]   # whose `minimize ... wrt` updates it
    pos: Pos

    @property
    def owner(self) -> str:
        return self.owners[0]


@dataclass(frozen=True)
class OptimizerDecl:
    name: str
    kwargs: dict[str, Any]
    pos: Pos


@dataclass(frozen=True)
class Stage:
    """One `train` block: which network minimises which term, and how."""

    name: str
    after: str | None
    objectives: dict[str, Term]          # network -> its objective (order = update order)
    optimizer: OptimizerDecl
    epochs: int
    order: str                           # alternating | simultaneous | round_robin | random
    schedule: OptimizerDecl | None
    settings: dict[str, Any]             # every other setting, validated
    pos: Pos

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(self.objectives)


@dataclass(frozen=True)
class EvalItem:
    """`xross(net1, net2)`: kind plus resolved network names / paths and keyword values."""

    kind: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    pos: Pos


@dataclass
class Program:
    """A spec after checking: everything the compiler needs, nothing it must re-derive from text."""

    file: str
    spec: ast.Spec                        # the expanded spec (macros replaced)
    data: DataDecl | None
    networks: dict[str, NetworkDecl]
    parts: dict[str, tuple[str, ...]]     # network -> its part names ("all" when not cut)
    cuts: dict[str, CutDecl]
    adapters: dict[str, AdapterDecl]
    stages: list[Stage]
    evaluate: list[EvalItem]
    warnings: list = field(default_factory=list)  # SpecWarning: located problems that do not stop the spec

    def natural_path(self, net: str, upto: int | None = None, epoch: int | None = None) -> Path:
        """The network's own chain of parts: its first `upto` parts (all of them by default)."""
        names = self.parts[net]
        last = len(names) if upto is None else upto
        return Path(tuple(PartStep(net, names[i], i, epoch) for i in range(last)))


def term_leaves(term: Term) -> Iterator[Prim]:
    """The primitive loss terms of an arithmetic term tree, left to right."""
    if isinstance(term, Prim):
        yield term
    elif isinstance(term, Arith):
        yield from term_leaves(term.left)
        yield from term_leaves(term.right)
