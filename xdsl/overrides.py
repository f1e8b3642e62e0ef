"""`xdsl run --set key=value`: edit the spec before it is checked, as if the text said so.

    --set data.batch_size=32     a `data` keyword
    --set epochs=3               a train setting (any name of `xdsl.lang.settings.SETTINGS`) in every block
    --set xml.epochs=3           one train block's setting
    --set lr=1e-3                every train block's learning rate (a keyword of its optimizer)

The value is parsed as spec text (`order=simultaneous`, `optimizer=sgd(lr=0.1)`, `epochs=3`), so the
checker sees the edited spec and a bad key or value is the same located error a spec gets, located in
the `--set` argument; nothing trains first. Because the edit is to the spec, the run directory's
`spec.xspec` records it.
"""

from __future__ import annotations

import dataclasses

from xdsl.errors import Pos, SpecError, register_source
from xdsl.lang import ast
from xdsl.lang.macros import expand_macros
from xdsl.lang.parser import parse_expr
from xdsl.lang.settings import DEFAULT_OPTIMIZER, SETTINGS
from xdsl.registry import did_you_mean

__all__ = ["apply_overrides"]


class _Arg:
    """One `--set key=value` argument: its text is the 'file' errors are located in."""

    def __init__(self, key: str, text: str):
        self.key, self.text = key, text
        self.file = f"--set {key}={text}"
        register_source(self.file, f"{key}={text}")

    def pos(self, col: int = 1) -> Pos:
        return Pos(self.file, 1, col)

    def value(self, as_string: bool = False) -> ast.Expr:
        """The value as a spec expression (columns as in `key=value`); a bare word may be a string."""
        from xdsl.errors import XdslError

        padded = " " * (len(self.key) + 1) + self.text
        try:
            expr = parse_expr(padded, self.file)
        except XdslError:
            if as_string:
                return ast.String(self.text, self.pos(len(self.key) + 2))
            raise
        finally:
            register_source(self.file, f"{self.key}={self.text}")  # errors quote the argument as typed
        if as_string and isinstance(expr, ast.Name):
            return ast.String(expr.id, expr.pos)
        return expr


def _block_names(spec: ast.Spec) -> list[str]:
    names, n = [], 0
    for s in spec.statements:
        if isinstance(s, ast.Train):
            n += 1
            names.append(s.name or f"train{n}")
    return names


def _set_keyword(kwargs: tuple[ast.Keyword, ...], name: str, value: ast.Expr, pos: Pos) -> tuple[ast.Keyword, ...]:
    kept = tuple(k for k in kwargs if k.name != name)
    return kept + (ast.Keyword(name, value, pos),)


def _with_lr(train: ast.Train, value: ast.Expr, pos: Pos) -> ast.Train:
    settings = list(train.settings)
    i = next((i for i, s in enumerate(settings) if s.key == "optimizer"), None)
    call = settings[i].value if i is not None else ast.Call(DEFAULT_OPTIMIZER, (), (), pos)
    if isinstance(call, ast.Name):
        call = ast.Call(call.id, (), (), call.pos)
    if not isinstance(call, ast.Call):
        return train  # the checker reports the malformed optimizer at its own position
    setting = ast.Setting("optimizer", dataclasses.replace(call, kwargs=_set_keyword(call.kwargs, "lr", value, pos)),
                          pos)
    if i is None:
        settings.append(setting)
    else:
        settings[i] = setting
    return dataclasses.replace(train, settings=tuple(settings))


def _with_setting(train: ast.Train, key: str, value: ast.Expr, pos: Pos) -> ast.Train:
    if key == "lr":
        return _with_lr(train, value, pos)
    budget = {"epochs", "steps"} if key in ("epochs", "steps") else {key}  # one replaces the other
    settings = tuple(s for s in train.settings if s.key not in budget) + (ast.Setting(key, value, pos),)
    return dataclasses.replace(train, settings=settings)


def _setting_key(arg: _Arg, key: str, col: int) -> str:
    if key in SETTINGS or key == "lr":
        return key
    close = did_you_mean(key, [*SETTINGS, "lr"])
    raise SpecError(f"unknown train setting '{key}'", arg.pos(col),
                    f"did you mean '{close}'?" if close else f"settings: lr, {', '.join(SETTINGS)}")


def _apply(spec: ast.Spec, arg: _Arg) -> ast.Spec:
    head, dot, rest = arg.key.partition(".")
    statements = list(spec.statements)
    if head == "data" and dot:
        i = next((i for i, s in enumerate(statements) if isinstance(s, ast.Data)), None)
        if i is None:
            raise SpecError("the spec has no 'data' statement to change", arg.pos())
        data = statements[i]
        statements[i] = dataclasses.replace(data, kwargs=_set_keyword(data.kwargs, rest, arg.value(True),
                                                                      arg.pos(len("data.") + 1)))
        return dataclasses.replace(spec, statements=tuple(statements))
    blocks = _block_names(spec)
    if dot:
        if head not in blocks:
            close = did_you_mean(head, blocks)
            raise SpecError(f"no train block called '{head}'", arg.pos(),
                            f"did you mean '{close}'?" if close else
                            f"train blocks: {', '.join(blocks) or 'none'}; or data.<keyword>")
        key, only = _setting_key(arg, rest, len(head) + 2), head
    else:
        key, only = _setting_key(arg, head, 1), None
    value = arg.value()
    n = 0
    for i, s in enumerate(statements):
        if isinstance(s, ast.Train):
            if only is None or blocks[n] == only:
                statements[i] = _with_setting(s, key, value, arg.pos(len(arg.key) + 2))
            n += 1
    return dataclasses.replace(spec, statements=tuple(statements))


def apply_overrides(spec: ast.Spec, overrides: dict[str, str]) -> ast.Spec:
    """The spec (macros expanded) with each `--set key=value` written into it, ready to be checked."""
    spec = expand_macros(spec)
    for key, text in overrides.items():
        spec = _apply(spec, _Arg(key, text))
    return spec
