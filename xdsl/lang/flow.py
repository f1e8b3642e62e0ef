"""Gradient flow of `minimize L wrt s`: which loss terms can change what `s` owns.

`minimize L wrt s` updates s's parts and the adapters s owns with the gradient of L. A term whose
gradient-carrying arguments (the predictions, as each primitive declares in `xdsl.losses`) pass
through none of those modules adds nothing to that gradient: `kl(a, b)` minimised for `a` trains
nothing, because `kl`'s first argument is the detached target. Such a term is almost always a
swapped argument or a wrong `wrt`, and it trains silently to a different number; an objective
made only of such terms cannot train at all. The checker reports the first as a warning and the
second as an error, before anything is built.

The analysis works on the unrolled term trees of `ir`, so a term written once in a `loss`
definition is judged for every network it is minimised for.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.lang import ir
from xdsl.losses import LossSpec, primitive_spec

__all__ = ["DeadTerm", "dead_terms", "reaches"]


@dataclass(frozen=True)
class DeadTerm:
    """A primitive term that cannot send gradient into the minimised network, and why."""

    prim: ir.Prim
    reason: str
    hint: str | None


def _owns(step: ir.Step, net: str, adapters: dict[str, ir.AdapterDecl]) -> bool:
    if isinstance(step, ir.PartStep):
        return step.net == net and step.epoch is None
    decl = adapters.get(step.name)
    return decl is not None and net in decl.owners


def reaches(arg: object, net: str, adapters: dict[str, ir.AdapterDecl]) -> bool:
    """Whether a term argument is computed by a module `net` owns (so gradient can reach it)."""
    if isinstance(arg, ir.Path):
        return any(_owns(step, net, adapters) for step in arg.steps)
    if isinstance(arg, ir.Ensemble):
        return any(reaches(m, net, adapters) for m in arg.members)
    return False


def _named(spec: LossSpec, prim: ir.Prim) -> dict[str, object]:
    return {p.name: a for p, a in zip(spec.params, prim.args)}


def _tensor_params(spec: LossSpec) -> list[str]:
    return [p.name for p in spec.params if p.kind in ("logits", "features")]


def _arg_text(value: object, parts: dict[str, tuple[str, ...]]) -> str:
    """A path through every part of one network is written as the network's name."""
    if isinstance(value, ir.Path) and value.steps:
        first = value.steps[0]
        if (isinstance(first, ir.PartStep) and len(value.steps) == len(parts.get(first.net, ()))
                and all(isinstance(s, ir.PartStep) and s.net == first.net and s.epoch == first.epoch
                        for s in value.steps)):
            return first.net if first.epoch is None else f"{first.net}@{first.epoch}"
    if isinstance(value, ir.Ensemble):
        return f"ensemble({', '.join(_arg_text(m, parts) for m in value.members)})"
    return str(value)


def call_text(spec: LossSpec, args: dict[str, object], parts: dict[str, tuple[str, ...]]) -> str:
    """The call as a person writes it: tensor arguments positionally, non-default constants by keyword."""
    out = []
    for p in spec.params:
        value = args[p.name]
        if value is None:  # an optional argument left out (`crd(t, s, i)` without y)
            continue
        if p.kind in ("logits", "features", "labels", "indices"):
            out.append(_arg_text(value, parts))
        elif value != p.default:
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = f"{value:g}"
            else:  # a schedule (`T=1 + epoch / epochs`): the expression's own text
                text = str(value)
            out.append(f"{p.name}={text}")
    return f"{spec.name}({', '.join(out)})"


_ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _diagnose(prim: ir.Prim, net: str, adapters: dict[str, ir.AdapterDecl],
              parts: dict[str, tuple[str, ...]]) -> DeadTerm | None:
    spec = primitive_spec(prim)
    if spec is None:
        return None
    args = _named(spec, prim)
    tensors = _tensor_params(spec)
    carrying = [n for n in tensors if spec.carries_gradient(n, args)]
    if any(reaches(args[n], net, adapters) for n in carrying):
        return None
    text = call_text(spec, args, parts)
    detached = [n for n in tensors if n not in carrying and reaches(args[n], net, adapters)]
    if not detached:
        return DeadTerm(prim, f"{text} does not depend on '{net}' (none of its parts, nor an adapter it owns), "
                              f"so it is a constant in {net}'s objective", None)
    target = detached[0]
    position = _ORDINALS[[p.name for p in spec.params].index(target)]
    reason = (f"{text} sends no gradient into '{net}': {spec.name}'s {position} argument ('{target}') "
              f"is the detached target")
    swappable = [n for n in carrying if not reaches(args[n], net, adapters)
                 and _kind(spec, n) == _kind(spec, target)]
    hints = []
    if swappable:
        swapped = dict(args)
        swapped[target], swapped[swappable[0]] = args[swappable[0]], args[target]
        hints.append(f"did you mean {call_text(spec, swapped, parts)}?")
    grad_kw = dict(spec.grads).get(target)
    if isinstance(grad_kw, str):
        hints.append(f"{'Or write' if hints else 'Write'} {grad_kw}=true if the target should learn too.")
    return DeadTerm(prim, reason, " ".join(hints) or None)


def _kind(spec: LossSpec, name: str) -> str:
    return next(p.kind for p in spec.params if p.name == name)


def _weights(term: ir.Term, factor: float | None = 1.0) -> list[tuple[ir.Prim, float | None]]:
    """Each primitive term with the constant it is multiplied by in `term` (None: not a constant, e.g. a
    schedule such as `min(epoch / 20, 1)`, or a term that divides)."""
    if isinstance(term, ir.Prim):
        return [(term, factor)]
    if not isinstance(term, ir.Arith):
        return []
    left, right, op = term.left, term.right, term.op
    if op in ("+", "-"):
        negated = None if factor is None else -factor
        return _weights(left, factor) + _weights(right, negated if op == "-" else factor)
    if op == "*":
        if isinstance(left, ir.Const):
            return _weights(right, None if factor is None else factor * left.value)
        if isinstance(right, ir.Const):
            return _weights(left, None if factor is None else factor * right.value)
    if op == "/" and isinstance(right, ir.Const) and right.value != 0:
        return _weights(left, None if factor is None else factor / right.value)
    return _weights(left, None) + _weights(right, None)


def dead_terms(term: ir.Term, net: str, adapters: dict[str, ir.AdapterDecl],
               parts: dict[str, tuple[str, ...]]) -> tuple[list[DeadTerm], bool]:
    """The terms of `net`'s objective that cannot train it, and whether any term can.

    A term is dead when its predictions pass through nothing `net` owns, or when it is multiplied by
    the constant 0 (`0 * kl(t, s)`, `ce(s, y) * 0`): either way it adds nothing to the gradient.
    `parts` (network -> its part names) only makes the messages read as the spec is written.
    """
    dead, live = [], False
    for prim, weight in _weights(term):
        diagnosis = _diagnose(prim, net, adapters, parts)
        if diagnosis is None and weight == 0:
            spec = primitive_spec(prim)
            text = call_text(spec, _named(spec, prim), parts) if spec is not None else str(prim)
            diagnosis = DeadTerm(prim, f"{text} is multiplied by 0 in {net}'s objective, so it adds nothing to "
                                       f"its gradient", "remove the term, or give it a weight other than 0")
        if diagnosis is None:
            live = True
        else:
            dead.append(diagnosis)
    return dead, live
