"""AST -> spec text. `xdsl expand` prints with this; `parse(format_spec(s)) == s` (tested)."""

from __future__ import annotations

from xdsl.lang import ast

__all__ = ["format_spec", "format_expr"]

_PRECEDENCE = {">>": 1, "+": 2, "-": 2, "*": 3, "/": 3}


def _number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text if "inf" not in text and "nan" not in text else "0"


def format_expr(e, parent: int = 0, right: bool = False) -> str:
    """Print an expression with the parentheses its precedence needs."""
    if isinstance(e, ast.Number):
        return _number(e.value)
    if isinstance(e, ast.String):
        return _quote(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Attribute):
        return f"{format_expr(e.value, 9)}.{e.attr}"
    if isinstance(e, ast.Snapshot):
        return f"{format_expr(e.value, 9)}@{e.epoch}"
    if isinstance(e, ast.Call):
        return f"{e.func}({_arguments(e.args, e.kwargs)})"
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(format_expr(i) for i in e.items) + "]"
    if isinstance(e, ast.Neg):
        return "-" + format_expr(e.operand, 4)
    if isinstance(e, ast.BinOp):
        p = _PRECEDENCE[e.op]
        text = f"{format_expr(e.left, p)} {e.op} {format_expr(e.right, p, right=True)}"
        return f"({text})" if p < parent or (p == parent and right) else text
    if isinstance(e, ast.Comprehension):
        return f"{format_expr(e.body)} for {e.var} in {format_expr(e.iter)}"
    raise TypeError(f"not an expression: {e!r}")


def _arguments(args, kwargs) -> str:
    parts = [format_expr(a) for a in args] + [f"{k.name}={format_expr(k.value)}" for k in kwargs]
    return ", ".join(parts)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _statement(s) -> str:
    if isinstance(s, ast.Data):
        name = s.name if ":" not in s.name and "/" not in s.name else _quote(s.name)
        return f"data {name}({_arguments((), s.kwargs)})"
    if isinstance(s, ast.Network):
        ref = s.ref if ":" not in s.ref and "/" not in s.ref else _quote(s.ref)
        text = f"network {', '.join(s.names)} = {ref}({_arguments((), s.kwargs)})"
        return text + (f" weights {_quote(s.weights)}" if s.weights else "")
    if isinstance(s, ast.Cut):
        points = ", ".join(_quote(p) for p in s.points)
        return f"cut {', '.join(s.networks)} at {points} into {', '.join(s.parts)}"
    if isinstance(s, ast.Adapter):
        return f"adapter {s.name} = {s.kind}({_arguments((), s.kwargs)}) owner {', '.join(s.owners)}"
    if isinstance(s, ast.LossDef):
        return f"loss {s.name}({', '.join(s.params)}) =\n    {format_expr(s.body)}"
    if isinstance(s, ast.PrimitiveDecl):
        learns = ", ".join(p + (f" if {gate}" if gate else "") for p, gate in s.learns)
        text = f"primitive {s.name} = {_quote(s.ref)}({_arguments((), s.kinds)})"
        return text + (f" learns {learns}" if learns else "")
    if isinstance(s, ast.Train):
        head = "train" + (f" {s.name}" if s.name else "") + (f" after {s.after}" if s.after else "")
        lines = [head + " {"]
        for m in s.minimizes:
            text = f"    minimize {format_expr(m.objective)} wrt {format_expr(m.wrt)}"
            if m.var:
                text += f" for {m.var} in {format_expr(m.iter)}"
            lines.append(text)
        lines += [f"    {st.key} {format_expr(st.value)}" for st in s.settings]
        return "\n".join(lines + ["}"])
    if isinstance(s, ast.Evaluate):
        return "evaluate " + ", ".join(format_expr(i) for i in s.items)
    if isinstance(s, ast.MacroCall):
        return f"{s.name}({_arguments(s.args, s.kwargs)})"
    raise TypeError(f"not a statement: {s!r}")


def format_spec(spec: ast.Spec) -> str:
    """Print a whole spec, one statement per paragraph."""
    return "\n\n".join(_statement(s) for s in spec.statements) + "\n"
