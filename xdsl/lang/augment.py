"""Checking `data ...(augment=[...])`: transform names, keywords and values, located in the spec.

The list holds calls (`random_crop(32, padding=4)`), which are not constants, so it is checked here rather than
by the checker's `const`; the checked value is plain data, `[[name, {keyword: value}], ...]` with positional
arguments named, which `build_data` takes as it is (`xdsl.data.transforms` is the vocabulary). Also here: the
rule that mixup/cutmix, which make `y` soft, only meet loss primitives that accept class probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xdsl.data.transforms import TRANSFORMS, check_item, name_args
from xdsl.errors import Pos, SpecError
from xdsl.lang import ast, ir
from xdsl.lang.values import literal

__all__ = ["split_augment", "soft_label_errors"]

_ITEM_HINT = "an augment item is a transform name or call, e.g. augment=[random_crop(32, padding=4), hflip]"


def split_augment(s: ast.Data, params: dict[str, Any] | None, const: Callable[[ast.Expr], Any],
                  errors: list[SpecError]) -> tuple[tuple[ast.Keyword, ...], dict[str, Any]]:
    """(the data statement's other keywords, {"augment": checked list} or {}); problems go to `errors`.

    A boolean `augment=true/false` stays with the other keywords (the dataset's own recipe, or none).
    `params` None (a dataset whose keywords are only known when it is built) takes a list too."""
    takes = params is None or "augment" in params
    rest, out = [], {}
    for k in s.kwargs:
        if k.name != "augment" or (isinstance(k.value, ast.Bool) and takes):
            rest.append(k)
        elif not takes:
            errors.append(SpecError(f"dataset '{s.name}' has no image augmentation, so it takes no 'augment'", k.pos,
                                    f"augment applies to image datasets ({', '.join(_image_datasets())})"))
        elif "augment" in out:
            errors.append(SpecError("keyword 'augment' given twice", k.pos))
        elif not isinstance(k.value, ast.ListExpr):
            errors.append(SpecError("augment is true, false or a list of transforms", k.value.pos, _ITEM_HINT))
        else:
            items = [_item(e, const, errors) for e in k.value.items]
            _once(k.value.items, items, errors)
            if all(i is not None for i in items):
                out["augment"] = items
    return tuple(rest), out


def _once(exprs: tuple[ast.Expr, ...], items: list, errors: list[SpecError]) -> None:
    """`normalize` marks where images become normalised floats: twice would normalise them twice."""
    seen = [e for e, i in zip(exprs, items) if i is not None and i[0] == "normalize"]
    if len(seen) > 1:
        errors.append(SpecError("augment lists normalize twice; images would be normalised twice", seen[1].pos,
                                "keep one normalize"))


def _image_datasets() -> list[str]:
    from xdsl.data import DATASETS, dataset_params

    return [n for n in DATASETS if "augment" in dataset_params(n)]


def _value(e: ast.Expr, const: Callable[[ast.Expr], Any]) -> Any:
    """A keyword value as plain data; a bare name is a symbolic option (interpolation=bicubic)."""
    if isinstance(e, ast.Name):
        return e.id
    try:
        return literal(const(e))
    except TypeError:
        raise SpecError("a transform argument is a number, string, boolean or list", e.pos) from None


def _item(e: ast.Expr, const: Callable[[ast.Expr], Any], errors: list[SpecError]) -> list | None:
    """One item checked into [name, {keyword: value}], or None after recording its error."""
    if isinstance(e, ast.Name):
        e = ast.Call(e.id, (), (), e.pos)
    if not isinstance(e, ast.Call):
        errors.append(SpecError("not a transform", e.pos, _ITEM_HINT))
        return None
    where: dict[str, Pos] = {}
    try:
        if e.func not in TRANSFORMS:
            _, problem = check_item(e.func, {})
            raise SpecError(problem.message, e.pos, problem.hint)  # type: ignore[union-attr]
        named, problem = name_args(e.func, [_value(a, const) for a in e.args])
        if problem is None:
            where = {k: a.pos for k, a in zip(named, e.args)}
            for k in e.kwargs:
                if k.name in named or k.name in where:
                    raise SpecError(f"{e.func}() gets '{k.name}' twice", k.pos)
                named[k.name], where[k.name] = _value(k.value, const), k.pos
            kwargs, problem = check_item(e.func, named)
        if problem is not None:
            raise SpecError(problem.message, where.get(problem.keyword or "", e.pos), problem.hint)
    except SpecError as err:
        errors.append(err)
        return None
    return [e.func, kwargs]


def soft_label_errors(data: ir.DataDecl | None, stages: list[ir.Stage]) -> list[SpecError]:
    """With mixup/cutmix in `augment`, `y` holds class probabilities: a primitive that needs class indices
    (one not in `losses.SOFT_LABELS`) would silently compute something else, so it is an error."""
    from xdsl.losses import SOFT_LABELS

    items = (data.kwargs.get("augment") if data is not None else None) or []
    mixes = [i[0] for i in items if isinstance(i, list) and TRANSFORMS[i[0]].batch]
    if not mixes:
        return []
    errors = []
    for stage in stages:
        for term in stage.objectives.values():
            for prim in ir.term_leaves(term):
                if prim.name not in SOFT_LABELS and any(isinstance(a, ir.Labels) for a in prim.args):
                    errors.append(SpecError(
                        f"{mixes[0]} makes y soft (class probabilities); {prim.name}() needs hard labels", prim.pos,
                        f"primitives that take soft labels: {', '.join(sorted(SOFT_LABELS))}; or drop "
                        f"{' and '.join(sorted(set(mixes)))} from augment"))
    return errors
