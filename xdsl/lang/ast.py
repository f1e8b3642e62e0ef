"""The xspec syntax tree: frozen dataclasses, each carrying its source position.

Positions do not take part in equality (`field(compare=False)`), so a spec parsed from
`xdsl expand` output compares equal to the spec it was printed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from xdsl.errors import Pos

__all__ = [
    "Pos", "Number", "String", "Bool", "Name", "Attribute", "Snapshot", "Call", "Keyword",
    "Comprehension", "ListExpr", "BinOp", "Neg", "Expr",
    "Data", "Network", "Cut", "Adapter", "LossDef", "PrimitiveDecl", "Minimize", "Setting", "Train", "Evaluate",
    "MacroCall", "Statement", "Spec",
]

NOPOS = Pos("<generated>", 0, 0)


def _pos() -> Pos:
    return field(default=NOPOS, compare=False, repr=False)  # type: ignore[return-value]


# ---- expressions ----

@dataclass(frozen=True)
class Number:
    value: int | float
    pos: Pos = _pos()


@dataclass(frozen=True)
class String:
    value: str
    pos: Pos = _pos()


@dataclass(frozen=True)
class Bool:
    value: bool
    pos: Pos = _pos()


@dataclass(frozen=True)
class Name:
    id: str
    pos: Pos = _pos()


@dataclass(frozen=True)
class Attribute:
    """`net1.up`: a part of a network."""

    value: Expr
    attr: str
    pos: Pos = _pos()


@dataclass(frozen=True)
class Snapshot:
    """`net1@10`: a network as it was after epoch 10 of the current stage."""

    value: Expr
    epoch: int
    pos: Pos = _pos()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    pos: Pos = _pos()


@dataclass(frozen=True)
class Comprehension:
    """`kl(t, s) for t in T`: only as the single argument of `sum`/`mean`."""

    body: Expr
    var: str
    iter: Expr
    pos: Pos = _pos()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr | Comprehension, ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    pos: Pos = _pos()


@dataclass(frozen=True)
class ListExpr:
    items: tuple[Expr, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class BinOp:
    """Arithmetic `+ - * /` on losses and numbers; `>>` joins parts into a path."""

    op: str
    left: Expr
    right: Expr
    pos: Pos = _pos()


@dataclass(frozen=True)
class Neg:
    operand: Expr
    pos: Pos = _pos()


Expr = Union[Number, String, Bool, Name, Attribute, Snapshot, Call, ListExpr, BinOp, Neg]


# ---- statements ----

@dataclass(frozen=True)
class Data:
    """`data digits(batch_size=64)`, `data torchvision.SVHN(root="svhn")`, `data "mydata:load"()`"""

    name: str
    kwargs: tuple[Keyword, ...] = ()
    pos: Pos = _pos()


@dataclass(frozen=True)
class Network:
    """`network a, b = torchvision.resnet18(num_classes=10) weights "ckpt.pt"`"""

    names: tuple[str, ...]
    ref: str
    kwargs: tuple[Keyword, ...] = ()
    weights: str | None = None
    pos: Pos = _pos()


@dataclass(frozen=True)
class Cut:
    """`cut net1, net2 at "layer2" into up, down`"""

    networks: tuple[str, ...]
    points: tuple[str, ...]
    parts: tuple[str, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class Adapter:
    """`adapter a12 = conv1x1(relu=true) owner net1` (several owners: each one's optimiser updates it)"""

    name: str
    kind: str
    kwargs: tuple[Keyword, ...]
    owners: tuple[str, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class LossDef:
    """`loss dml(s, T) = 0.5 * ce(s, y) + 0.5 * mean(kl(t, s) for t in T)`"""

    name: str
    params: tuple[str, ...]
    body: Expr
    pos: Pos = _pos()


@dataclass(frozen=True)
class PrimitiveDecl:
    """`primitive focal = "mylosses:focal"(p=logits, y=labels, gamma=number) learns p`

    `kinds` gives each parameter's kind (a keyword whose value names it); `learns` lists the tensor
    parameters gradient flows into, each with the bool parameter that gates it (None: always)."""

    name: str
    ref: str
    kinds: tuple[Keyword, ...]
    learns: tuple[tuple[str, str | None], ...] = ()
    pos: Pos = _pos()


@dataclass(frozen=True)
class Minimize:
    """`minimize L(s) wrt s for s in [net1, net2]` (the `for` part is optional)."""

    objective: Expr
    wrt: Expr
    var: str | None = None
    iter: Expr | None = None
    pos: Pos = _pos()


@dataclass(frozen=True)
class Setting:
    """`epochs 200`, `optimizer adam(lr=1e-4)`, `order alternating`, ..."""

    key: str
    value: Expr
    pos: Pos = _pos()


@dataclass(frozen=True)
class Train:
    name: str | None
    after: str | None
    minimizes: tuple[Minimize, ...]
    settings: tuple[Setting, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class Evaluate:
    items: tuple[Expr, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class MacroCall:
    """`xml(net1, net2, epochs=200)`: replaced by core statements before checking."""

    name: str
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]
    pos: Pos = _pos()


Statement = Union[Data, Network, Cut, Adapter, LossDef, PrimitiveDecl, Train, Evaluate, MacroCall]


@dataclass(frozen=True)
class Spec:
    statements: tuple[Statement, ...]
    file: str = field(default="<string>", compare=False)
