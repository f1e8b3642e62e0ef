"""Macros: `dml(...)`, `xml(...)`, `kd(...)`, ... replaced by the core statements they stand for.

A macro is a function from its call to spec text; the text is parsed like any spec, so
`xdsl expand` output is itself a valid spec. Adding a method is one function plus `@macro`.

    xml(net1, net2, epochs=200, optimizer=adam(lr=1e-4))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from xdsl.errors import Pos, SpecError
from xdsl.lang import ast
from xdsl.lang.format import format_expr
from xdsl.registry import Registry, did_you_mean

__all__ = ["MACROS", "macro", "expand_macros"]

MACROS: Registry[Callable[[ast.MacroCall, dict[str, str]], str]] = Registry("macro")

# the train-block settings every training macro passes through unchanged
_TRAIN_KEYS = ("optimizer", "epochs", "order", "schedule", "grad_clip", "max_steps", "eval_every", "map_channels")


def macro(*params: str):
    """Register a macro taking networks positionally and the given keyword parameters."""

    def register(fn):
        fn.params = params + _TRAIN_KEYS + ("name",)
        MACROS.register(fn.__name__.rstrip("_"), fn)
        return fn

    return register


def _train_settings(kw: dict[str, str]) -> str:
    return "\n".join(f"    {k} {kw[k]}" for k in _TRAIN_KEYS if k in kw)


def _networks(call: ast.MacroCall, at_least: int) -> list[str]:
    nets = []
    for a in call.args:
        if not isinstance(a, ast.Name):
            raise SpecError(f"{call.name}(): positional arguments are network names", a.pos)
        nets.append(a.id)
    if len(nets) < at_least:
        raise SpecError(f"{call.name}() needs at least {at_least} network(s), got {len(nets)}", call.pos)
    return nets


@macro()
def independent(call: ast.MacroCall, kw: dict[str, str]) -> str:
    """Each network trained alone with cross-entropy: the baseline of every seed table."""
    nets = _networks(call, 1)
    name = kw.get("name", "independent")
    return f"""train {name} {{
    minimize ce(s, y) wrt s for s in [{', '.join(nets)}]
{_train_settings(kw)}
}}"""


@macro("teacher")
def dml(call: ast.MacroCall, kw: dict[str, str]) -> str:
    """Deep Mutual Learning (seed 002; seed 000 code): 0.5 CE + 0.5 mean KL to each peer.

    teacher="ensemble" gives DML_e: the peers' averaged prediction is the single teacher.
    """
    nets = _networks(call, 2)
    name = kw.get("name", "dml")
    teacher = kw.get("teacher", '"peers"').strip('"')
    if teacher == "ensemble":
        body = "0.5 * ce(s, y) + 0.5 * kl(ensemble(T), s)"
    elif teacher == "peers":
        body = "0.5 * ce(s, y) + 0.5 * mean(kl(t, s) for t in T)"
    else:
        raise SpecError(f"dml(): teacher is \"peers\" or \"ensemble\", got {teacher!r}", call.pos)
    return f"""loss {name}(s, T) = {body}
train {name} {{
    minimize {name}(s, peers(s)) wrt s for s in [{', '.join(nets)}]
{_train_settings(kw)}
}}"""


@macro()
def xml(call: ast.MacroCall, kw: dict[str, str]) -> str:
    """Xross Mutual Learning (seed 000): (DML terms + up-mimic + down-mimic) / (2 K), K = len(peers).

    The networks must already be cut into the same number of parts, named `up` and `down`.
    """
    nets = _networks(call, 2)
    name = kw.get("name", "xml")
    return f"""loss {name}(s, T) =
    ( ce(s, y)
    + mean(kl(t, s) for t in T)
    + sum(kl(t, s.up >> t.down) for t in T)
    + sum(kl(t, t.up >> s.down) for t in T)
    + sum(ce(s.up >> t.down, y) for t in T)
    + sum(ce(t.up >> s.down, y) for t in T)
    ) / (2 * len(T))
train {name} {{
    minimize {name}(s, peers(s)) wrt s for s in [{', '.join(nets)}]
{_train_settings(kw)}
}}"""


@macro("T", "alpha", "after")
def kd(call: ast.MacroCall, kw: dict[str, str]) -> str:
    """Hinton KD (seed 001): kd(teacher, student): alpha T^2 KL(teacher || student) + (1 - alpha) CE."""
    nets = _networks(call, 2)
    if len(nets) != 2:
        raise SpecError("kd() takes exactly two networks: teacher, student", call.pos)
    teacher, student = nets
    name = kw.get("name", "kd")
    after = f" after {kw['after']}" if "after" in kw else ""
    return f"""train {name}{after} {{
    minimize kd({teacher}, {student}, y, T={kw.get('T', '4.0')}, alpha={kw.get('alpha', '0.9')}) wrt {student}
{_train_settings(kw)}
}}"""


def _relocate(node, pos: Pos):
    """Give every node of generated statements the macro call's position (errors point at the call)."""
    if isinstance(node, tuple):
        return tuple(_relocate(n, pos) for n in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, Pos):
        changes = {f.name: _relocate(getattr(node, f.name), pos) for f in dataclasses.fields(node)
                   if f.name != "pos"}
        if any(f.name == "pos" for f in dataclasses.fields(node)):
            changes["pos"] = pos
        return dataclasses.replace(node, **changes)
    return node


def _did_you_mean(name: str) -> str | None:
    close = did_you_mean(name, MACROS.names())
    return f"did you mean '{close}'?" if close else None


def expand_macros(spec: ast.Spec) -> ast.Spec:
    """Replace every macro call by the statements it generates (macros may not generate macros)."""
    from xdsl.lang.parser import parse

    out: list[ast.Statement] = []
    for s in spec.statements:
        if not isinstance(s, ast.MacroCall):
            out.append(s)
            continue
        if s.name not in MACROS:
            raise SpecError(f"unknown statement or macro '{s.name}'", s.pos,
                            _did_you_mean(s.name) or f"macros: {', '.join(MACROS.names())}")
        fn = MACROS.get(s.name)
        kw: dict[str, str] = {}
        for k in s.kwargs:
            if k.name not in fn.params:
                raise SpecError(f"macro {s.name}() has no parameter '{k.name}'", k.pos,
                                f"its parameters are: {', '.join(fn.params)}")
            kw[k.name] = k.value.id if k.name in ("name", "after") and isinstance(k.value, ast.Name) \
                else format_expr(k.value)
        if "name" in kw:
            kw["name"] = kw["name"].strip('"')
        generated = parse(fn(s, kw), f"<macro {s.name} at {s.pos}>")
        for g in generated.statements:
            if isinstance(g, ast.MacroCall):
                raise SpecError(f"macro {s.name}() generated another macro call", s.pos)
            out.append(_relocate(g, s.pos))
    return ast.Spec(tuple(out), spec.file)
