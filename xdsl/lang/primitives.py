"""`primitive name = "module:function"(p=logits, y=labels, T=number) learns p`: user loss primitives.

A declaration turns a Python function beside the spec into a `LossSpec` like the built-in ones, so
calls of it are checked the same way (arity, keywords, argument kinds, number constants, gradient
flow). What the declaration says and what the function's signature says must agree: the parameter
names and their order come from both, the defaults from the signature, the kinds and which tensor
arguments learn from the declaration.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from xdsl.errors import SpecError, XdslError
from xdsl.lang import ast
from xdsl.losses import ALWAYS, KINDS, LOSSES, REQUIRED, LossParam, LossSpec
from xdsl.registry import did_you_mean
from xdsl.user_code import user_callable

__all__ = ["declare_primitive", "declared_only", "earlier_clash"]

_TENSOR_KINDS = ("logits", "features")


def declare_primitive(decl: ast.PrimitiveDecl, spec_dir: Path | None, allow_imports: bool) -> LossSpec:
    """Import the function under the import rule and check the declaration against its signature."""
    if decl.name in LOSSES:
        raise SpecError(f"primitive '{decl.name}' has the name of a built-in loss primitive", decl.pos,
                        "choose another name")
    kinds = _kinds(decl)
    try:
        fn = user_callable(decl.ref, spec_dir, allow_imports, what="loss", returns="a scalar tensor")
    except XdslError as e:
        raise SpecError(f"primitive '{decl.name}': {e.message}", decl.pos, e.hint) from None
    if isinstance(fn, type):  # calling it would construct an object per step, not compute a loss
        raise SpecError(f"primitive '{decl.name}': '{decl.ref}' is a class; a primitive is a function of tensors",
                        decl.pos, "name a function returning the loss (wrap an nn.Module loss in a function)")
    params = _params(decl, fn, kinds)
    grads = _grads(decl, kinds)
    doc = inspect.getdoc(fn) or f"user loss {decl.ref}"
    keyword_only = frozenset(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)
    return LossSpec(decl.name, fn, params, doc, (), grads, keyword_only)


def earlier_clash(decl: ast.PrimitiveDecl, spec: ast.Spec) -> SpecError | None:
    """Primitives are declared before the other statements (a loss may use one declared below it), so a name
    clash would be blamed on whichever of the two comes later in the file only if we look here: a network,
    adapter or loss of the same name above the primitive makes the primitive the duplicate."""
    for s in spec.statements:
        if (s.pos.line, s.pos.col) >= (decl.pos.line, decl.pos.col):
            break
        names = {ast.Network: lambda n: n.names, ast.Adapter: lambda n: (n.name,), ast.LossDef: lambda n: (n.name,)}
        kind = {ast.Network: "network", ast.Adapter: "adapter", ast.LossDef: "loss"}.get(type(s))
        if kind and decl.name in names[type(s)](s):
            return SpecError(f"'{decl.name}' is already defined as a {kind}", decl.pos)
    return None


def declared_only(decl: ast.PrimitiveDecl) -> LossSpec | None:
    """What a declaration alone says, for a primitive whose function could not be checked: its calls are
    still checked against the declared kinds instead of each being reported as an unknown name."""
    if decl.name in LOSSES:
        return None
    try:
        kinds = _kinds(decl)
        grads = _grads(decl, kinds)
    except SpecError:
        return None
    placeholder = {"number": 1.0, "bool": False}
    params = tuple(LossParam(n, k, placeholder.get(k, REQUIRED)) for n, k in kinds.items())
    return LossSpec(decl.name, _unavailable, params, f"user loss {decl.ref} (not importable)", (), grads)


def _unavailable(*args, **kwargs):
    raise XdslError("this user loss primitive's declaration has errors")


def _kinds(decl: ast.PrimitiveDecl) -> dict[str, str]:
    """Parameter -> kind, from `p=logits, y=labels, ...` (each value names a kind)."""
    kinds: dict[str, str] = {}
    for k in decl.kinds:
        kind = k.value.id if isinstance(k.value, ast.Name) else None
        if kind not in KINDS:
            close = did_you_mean(str(kind), sorted(KINDS)) if kind else None
            raise SpecError(f"primitive '{decl.name}': parameter '{k.name}' needs a kind, one of "
                            f"{', '.join(sorted(KINDS))}", getattr(k.value, "pos", k.pos),
                            f"did you mean '{close}'?" if close else f"e.g. {k.name}=logits")
        if k.name in kinds:
            raise SpecError(f"primitive '{decl.name}': parameter '{k.name}' declared twice", k.pos)
        kinds[k.name] = kind
    if not any(kind in _TENSOR_KINDS for kind in kinds.values()):
        raise SpecError(f"primitive '{decl.name}' has no logits or features parameter, so it cannot train anything",
                        decl.pos, "declare the prediction's kind, e.g. p=logits")
    return kinds


def _params(decl: ast.PrimitiveDecl, fn, kinds: dict[str, str]) -> tuple[LossParam, ...]:
    """The declared parameters in the function's order, with the function's defaults."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise SpecError(f"primitive '{decl.name}': cannot read the signature of '{decl.ref}'", decl.pos) from None
    names = [p.name for p in sig.parameters.values()]
    variadic = [p.name for p in sig.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic or names != list(kinds):
        raise SpecError(f"primitive '{decl.name}' declares ({', '.join(kinds)}) but '{decl.ref}' takes "
                        f"({', '.join(str(p) for p in sig.parameters.values())})", decl.pos,
                        "declare every parameter of the function, in its order, with its kind")
    params = []
    for p in sig.parameters.values():
        kind = kinds[p.name]
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        if default is not REQUIRED and not _default_fits(kind, default):
            raise SpecError(f"primitive '{decl.name}': default {p.name}={default!r} of '{decl.ref}' is not "
                            f"a {kind}", decl.pos,
                            "only number and bool parameters may have defaults" if kind not in ("number", "bool")
                            else None)
        params.append(LossParam(p.name, kind, default))
    return tuple(params)


def _default_fits(kind: str, default: object) -> bool:
    if kind == "number":
        return isinstance(default, int | float) and not isinstance(default, bool)
    if kind == "bool":
        return isinstance(default, bool)
    return False


def _grads(decl: ast.PrimitiveDecl, kinds: dict[str, str]) -> tuple[tuple[str, bool | str], ...]:
    """`learns p, t if grad` -> ((p, ALWAYS), (t, 'grad')); with one tensor parameter it learns by default."""
    tensors = [name for name, kind in kinds.items() if kind in _TENSOR_KINDS]
    if not decl.learns:
        if len(tensors) != 1:
            raise SpecError(f"primitive '{decl.name}' has tensor parameters {', '.join(tensors)}: say which "
                            "carry gradient", decl.pos, f"end the declaration with `learns {tensors[-1]}` "
                            f"(or `learns {tensors[-1]}, {tensors[0]} if grad` with a bool parameter grad)")
        return ((tensors[0], ALWAYS),)
    grads: dict[str, bool | str] = {}
    for name, gate in decl.learns:
        if name not in tensors:
            raise SpecError(f"primitive '{decl.name}': 'learns {name}' names no logits or features parameter",
                            decl.pos, _hint(name, tensors))
        if gate is not None and kinds.get(gate) != "bool":
            bools = [n for n, k in kinds.items() if k == "bool"]
            raise SpecError(f"primitive '{decl.name}': 'if {gate}' names no bool parameter", decl.pos,
                            _hint(gate, bools))
        grads[name] = ALWAYS if gate is None else gate
    return tuple(grads.items())


def _hint(name: str, candidates: list[str]) -> str | None:
    close = did_you_mean(name, candidates)
    return f"did you mean '{close}'?" if close else (f"one of: {', '.join(candidates)}" if candidates else None)
