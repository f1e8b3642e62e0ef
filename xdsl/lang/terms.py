"""Expressions of a spec -> checked values and `ir` term trees (the checker's expression half).

`TermChecker` evaluates names, attributes (`net.part`), paths (`a >> b`), arithmetic, schedules,
`sum`/`mean` comprehensions, ensembles and calls of user losses and loss primitives; statements
live in `lang/check.py`, whose `_Checker` derives from it.
"""

from __future__ import annotations

import math
from typing import Any

from xdsl.errors import Pos, SpecError
from xdsl.lang import ast, ir
from xdsl.lang.format import format_expr
from xdsl.lang.values import (
    BoolV,
    ClockV,
    EnsembleV,
    IndicesV,
    LabelsV,
    ListV,
    NetV,
    NumV,
    PathV,
    StrV,
    TermV,
    combine,
    kind_of,
    number_term,
)
from xdsl.registry import did_you_mean

__all__ = ["BUILTIN_FUNCS", "ENSEMBLE_BY", "WHOLE", "TermChecker"]

WHOLE = "all"  # the single part of a network that is not cut
BUILTIN_FUNCS = ("sum", "mean", "len", "peers", "ensemble")
ENSEMBLE_BY = ("probs", "logits")  # ensemble(..., by=...): average the softmaxes (default) or the logits


class TermChecker:
    """Expression evaluation over the declarations a `_Checker` has collected so far."""

    networks: dict[str, ir.NetworkDecl]
    parts: dict[str, tuple[str, ...]]
    cuts: dict[str, ir.CutDecl]
    adapters: dict[str, ir.AdapterDecl]
    losses: dict[str, ast.LossDef]
    primitives: Any
    _call_depth: int

    def expr(self, e: ast.Expr, env: dict[str, Any], allow_names: bool = True) -> Any:
        method = getattr(self, "e_" + type(e).__name__.lower(), None)
        if method is None:
            raise SpecError("a comprehension ('... for v in ...') is only allowed inside sum() or mean()",
                            getattr(e, "pos", None))
        if not allow_names and isinstance(e, ast.Name | ast.Attribute | ast.Snapshot | ast.Call):
            python = {"True": "true", "False": "false"}.get(getattr(e, "id", ""))
            raise SpecError("expected a constant here (number, string, boolean or list)", e.pos,
                            f"booleans are written {python}" if python else None)
        return method(e, env)

    def e_number(self, e, env):
        return NumV(e.value)

    def e_string(self, e, env):
        return StrV(e.value)

    def e_bool(self, e, env):
        return BoolV(e.value)

    def e_listexpr(self, e, env):
        return ListV(tuple(self.expr(i, env) for i in e.items))

    def e_name(self, e: ast.Name, env):
        if e.id in env:
            return env[e.id]
        if e.id in self.networks:
            return NetV(e.id)
        if e.id in self.adapters:
            return PathV(ir.Path((ir.AdapterStep(e.id),)), 0)
        if e.id == "x":
            return PathV(ir.Path(()), 0)
        if e.id == "y":
            return LabelsV()
        if e.id == "i":
            return IndicesV()
        if e.id in ir.CLOCKS:
            return ClockV(ir.Clock(e.id))
        if e.id == "pi":
            return NumV(math.pi)
        if e.id in self.losses or e.id in self.primitives:
            raise SpecError(f"'{e.id}' is a loss: call it, e.g. {e.id}(...)", e.pos)
        if e.id in ("True", "False"):
            raise SpecError(f"undefined name '{e.id}'", e.pos, f"booleans are written {e.id.lower()}")
        candidates = [k for k in env if not k.startswith("__")] + list(self.networks) + list(self.adapters)
        raise SpecError(f"undefined name '{e.id}'", e.pos,
                        _hint(e.id, candidates + ["x", "y", "i", "pi", *ir.CLOCKS], None))

    def e_attribute(self, e: ast.Attribute, env):
        base = self.expr(e.value, env)
        if not isinstance(base, NetV):
            raise SpecError(f"only networks have parts; '.{e.attr}' is applied to {kind_of(base)}", e.pos)
        parts = self.parts[base.name]
        if base.name not in self.cuts:
            raise SpecError(f"network '{base.name}' is not cut, so it has no part '{e.attr}'", e.pos,
                            f"add: cut {base.name} at \"layer2\" into up, down")
        if e.attr not in parts:
            raise SpecError(f"network '{base.name}' has no part '{e.attr}'", e.pos,
                            _hint(e.attr, parts, f"its parts are: {', '.join(parts)}"))
        index = parts.index(e.attr)
        steps = tuple(ir.PartStep(base.name, parts[i], i, base.epoch) for i in range(index + 1))
        return PathV(ir.Path(steps), index)

    def e_snapshot(self, e: ast.Snapshot, env):
        base = self.expr(e.value, env)
        if not isinstance(base, NetV) or base.epoch is not None:
            raise SpecError(f"'@{e.epoch}' applies to a network, got {kind_of(base)}", e.pos)
        return NetV(base.name, e.epoch)

    def e_neg(self, e: ast.Neg, env):
        v = self.expr(e.operand, env)
        if isinstance(v, NumV):
            return NumV(-v.value)
        if isinstance(v, TermV | ClockV):
            return combine(ir.Arith("*", ir.Const(-1.0), v.term), v)
        raise SpecError(f"cannot negate {kind_of(v)}", e.pos)

    def e_binop(self, e: ast.BinOp, env):
        left, right = self.expr(e.left, env), self.expr(e.right, env)
        if e.op == ">>":
            lp = self._as_path(left, e.left.pos, "'>>'")
            rp = self._as_path(right, e.right.pos, "'>>'")
            return self._join(lp, rp, e.pos)
        for side, v in (("left", left), ("right", right)):
            if number_term(v) is None:
                raise SpecError(f"'{e.op}' needs losses or numbers, but its {side} side is {kind_of(v)}",
                                (e.left if side == "left" else e.right).pos,
                                "wrap a path in a loss, e.g. ce(path, y)" if isinstance(v, PathV | NetV) else None)
        if isinstance(left, NumV) and isinstance(right, NumV):
            if e.op == "/" and right.value == 0:
                raise SpecError("division by zero", e.right.pos)
            a, b = left.value, right.value
            return NumV({"+": a + b, "-": a - b, "*": a * b, "/": a / b if e.op == "/" else 0}[e.op])
        if e.op == "/" and isinstance(right, NumV) and right.value == 0:
            raise SpecError("division by zero", e.right.pos)
        return combine(ir.Arith(e.op, number_term(left), number_term(right)), left, right)

    def _as_path(self, v: Any, pos: Pos, what: str) -> PathV:
        if isinstance(v, PathV):
            return v
        if isinstance(v, NetV):
            parts = self.parts[v.name]
            steps = tuple(ir.PartStep(v.name, p, i, v.epoch) for i, p in enumerate(parts))
            return PathV(ir.Path(steps), len(steps) - 1)
        raise SpecError(f"{what} needs a path (e.g. net1.up >> net2.down), got {kind_of(v)}", pos)

    def _join(self, left: PathV, right: PathV, pos: Pos) -> PathV:
        steps = left.path.steps + right.path.steps[right.explicit_from:]
        last_part = None
        for step in steps:
            if isinstance(step, ir.PartStep):
                expected = 0 if last_part is None else last_part.index + 1
                if step.index != expected:
                    where = "first" if last_part is None else f"after {last_part}"
                    raise SpecError(f"path {ir.Path(steps)} is not consecutive: {step} is part {step.index + 1} "
                                    f"of {step.net}, but part {expected + 1} must come {where}", pos)
                last_part = step
        return PathV(ir.Path(steps), left.explicit_from)

    def e_call(self, e: ast.Call, env):
        if e.func in ("sum", "mean"):
            return self._reduce(e, env)
        if e.func == "len":
            self._arity(e, 1, 1)
            v = self.expr(e.args[0], env)
            if not isinstance(v, ListV):
                raise SpecError(f"len() takes a list, got {kind_of(v)}", e.args[0].pos)
            return NumV(len(v.items))
        if e.func == "peers":
            self._arity(e, 1, 1)
            v = self.expr(e.args[0], env)
            if not isinstance(v, NetV):
                raise SpecError(f"peers() takes a network, got {kind_of(v)}", e.args[0].pos)
            cohort = env.get("__peers__")
            if cohort is None or not cohort.items:
                raise SpecError("peers(s) is only defined inside 'minimize ... for s in [...]'", e.pos)
            return ListV(tuple(n for n in cohort.items if n != v))
        if e.func == "ensemble":
            return self._ensemble(e, env)
        if e.func in ir.FUNCS:
            return self._schedule_func(e, env)
        if e.func in self.losses:
            return self._call_loss(e, env)
        if e.func in self.primitives:
            return self._call_primitive(e, env)
        known = list(self.losses) + list(self.primitives) + list(BUILTIN_FUNCS) + list(ir.FUNCS)
        raise SpecError(f"unknown loss or function '{e.func}'", e.pos, _hint(e.func, known, None))

    def _schedule_func(self, e: ast.Call, env) -> NumV | ClockV:
        """min/max/exp/cos of numbers (folded) or of schedules (`min(epoch / 20, 1)`); never of losses."""
        lo, hi = ir.FUNCS[e.func]
        if hi is None and len(e.args) < lo:
            raise SpecError(f"{e.func}() takes {lo} or more arguments, got {len(e.args)}", e.pos)
        self._arity(e, lo, hi if hi is not None else len(e.args))
        values = []
        for a in e.args:
            v = self.expr(a, env)
            if not isinstance(v, NumV | ClockV):
                raise SpecError(f"{e.func}() takes numbers or epoch/epochs/step, got {kind_of(v)}", a.pos,
                                "weight a loss by a schedule instead, e.g. min(epoch / 20, 1) * kl(t, s)"
                                if isinstance(v, TermV) else None)
            values.append(v)
        if all(isinstance(v, NumV) for v in values):
            nums = [float(v.value) for v in values]
            if e.func == "exp" and nums[0] > 700:
                raise SpecError(f"exp({nums[0]:g}) overflows", e.pos)
            return NumV({"min": min, "max": max, "exp": lambda x: math.exp(x), "cos": lambda x: math.cos(x)}
                        [e.func](*nums))
        return ClockV(ir.Func(e.func, tuple(number_term(v) for v in values)))

    def _ensemble(self, e: ast.Call, env) -> EnsembleV:
        by = "probs"
        for k in e.kwargs:
            value = k.value.id if isinstance(k.value, ast.Name) else getattr(k.value, "value", None)
            if k.name != "by":
                raise SpecError(f"ensemble() has no keyword '{k.name}'", k.pos, "ensemble(..., by=probs|logits)")
            if value not in ENSEMBLE_BY:
                raise SpecError(f"ensemble(): by is {' or '.join(ENSEMBLE_BY)}, got {format_expr(k.value)}",
                                k.value.pos)
            by = value
        members: list[ir.Path] = []
        for a in e.args:
            v = self.expr(a, env)
            items = v.items if isinstance(v, ListV) else (v,)
            for item in items:
                members.append(self._as_path(item, a.pos, "ensemble()").path)
        if not members:
            raise SpecError("ensemble() of nothing", e.pos)
        return EnsembleV(ir.Ensemble(tuple(members), by))

    def _arity(self, e: ast.Call, lo: int, hi: int) -> None:
        if e.kwargs:
            raise SpecError(f"{e.func}() takes no keyword arguments", e.kwargs[0].pos)
        if not lo <= len(e.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise SpecError(f"{e.func}() takes {want} argument(s), got {len(e.args)}", e.pos)

    def _reduce(self, e: ast.Call, env) -> Any:
        self._arity(e, 1, 1)
        arg = e.args[0]
        if isinstance(arg, ast.Comprehension):
            it = self.expr(arg.iter, env)
            if not isinstance(it, ListV):
                raise SpecError(f"'for {arg.var} in ...' needs a list, got {kind_of(it)}", arg.iter.pos)
            values = [self.expr(arg.body, {**env, arg.var: item}) for item in it.items]
            body_pos = arg.body.pos
        else:
            it = self.expr(arg, env)
            if not isinstance(it, ListV):
                raise SpecError(f"{e.func}() takes a list or 'expr for v in list', got {kind_of(it)}", arg.pos)
            values, body_pos = list(it.items), arg.pos
        if not values:
            if e.func == "mean":
                raise SpecError("mean() over an empty list", e.pos, "does the cohort have a single network?")
            return NumV(0)
        terms = []
        for v in values:
            if number_term(v) is None:
                raise SpecError(f"{e.func}() adds losses or numbers, got {kind_of(v)}", body_pos)
            terms.append(number_term(v))
        if all(isinstance(v, NumV) for v in values):
            total = sum(v.value for v in values)
            return NumV(total / len(values) if e.func == "mean" else total)
        total = terms[0]
        for t in terms[1:]:
            total = ir.Arith("+", total, t)
        if e.func == "mean" and len(terms) > 1:
            total = ir.Arith("/", total, ir.Const(float(len(terms))))
        return combine(total, *values)

    def _bind(self, e: ast.Call, params: list[str], defaults: dict[str, Any], env) -> dict[str, tuple[Any, Pos]]:
        if len(e.args) > len(params):
            raise SpecError(f"{e.func}() takes {len(params)} argument(s), got {len(e.args)}", e.pos)
        bound: dict[str, tuple[Any, Pos]] = {}
        for p, a in zip(params, e.args):
            if isinstance(a, ast.Comprehension):
                raise SpecError("a comprehension is only allowed inside sum() or mean()", a.pos)
            bound[p] = (self.expr(a, env), a.pos)
        for k in e.kwargs:
            if k.name not in params:
                raise SpecError(f"{e.func}() has no parameter '{k.name}'", k.pos,
                                _hint(k.name, params, f"its parameters are: {', '.join(params)}"))
            if k.name in bound:
                raise SpecError(f"{e.func}() got two values for '{k.name}'", k.pos)
            bound[k.name] = (self.expr(k.value, env), k.value.pos)
        missing = [p for p in params if p not in bound and p not in defaults]
        if missing:
            raise SpecError(f"{e.func}() is missing argument(s): {', '.join(missing)}", e.pos)
        return bound

    def _call_loss(self, e: ast.Call, env) -> Any:
        d = self.losses[e.func]
        bound = self._bind(e, list(d.params), {}, env)
        if self._call_depth > 50:
            raise SpecError(f"loss '{e.func}' calls itself (recursion is not allowed)", e.pos)
        self._call_depth += 1
        try:
            local = {p: v for p, (v, _) in bound.items()}
            if "__peers__" in env:
                local["__peers__"] = env["__peers__"]
            return self.expr(d.body, local)
        finally:
            self._call_depth -= 1

    def _call_primitive(self, e: ast.Call, env) -> Any:
        from xdsl.losses import REQUIRED

        spec = self.primitives[e.func]
        params = [p[0] for p in spec.params]
        defaults = {name: default for name, _, default in spec.params if default is not REQUIRED}
        bound = self._bind(e, params, defaults, env)
        args = []
        for name, kind, default in spec.params:
            if name not in bound:
                args.append(default)
                continue
            v, pos = bound[name]
            value = self._prim_arg(e.func, name, kind, v, pos)
            problem = spec.check_value(name, value) if kind == "number" and isinstance(value, float) else None
            if problem:
                raise SpecError(problem, pos)
            args.append(value)
        return TermV(ir.Prim(e.func, tuple(args), e.pos, spec))

    def _prim_arg(self, func: str, name: str, kind: str, v: Any, pos: Pos) -> Any:
        if kind == "logits" and isinstance(v, EnsembleV):
            return v.ensemble
        if kind in ("logits", "features"):
            if isinstance(v, LabelsV | IndicesV):
                raise SpecError(f"{func}(): '{name}' takes a path, got {kind_of(v)}", pos)
            path = self._as_path(v, pos, f"{func}(): '{name}'").path
            if kind == "logits" and path.steps and isinstance(path.steps[-1], ir.PartStep):
                last = path.steps[-1]
                if last.index != len(self.parts[last.net]) - 1:
                    raise SpecError(f"{func}(): '{name}' needs logits, but {path} ends inside "
                                    f"{last.net} (features, not logits)", pos,
                                    f"continue the path to the last part, e.g. ... >> {last.net}."
                                    f"{self.parts[last.net][-1]}")
            if not path.steps:
                raise SpecError(f"{func}(): '{name}' needs a network output, got the input x", pos)
            return path
        if kind == "labels":
            if not isinstance(v, LabelsV):
                raise SpecError(f"{func}(): '{name}' takes the labels y, got {kind_of(v)}", pos)
            return ir.Labels()
        if kind == "indices":
            if not isinstance(v, IndicesV):
                raise SpecError(f"{func}(): '{name}' takes the sample indices i, got {kind_of(v)}", pos)
            return ir.Indices()
        if kind == "number":
            from xdsl.losses import CONSTANT_ONLY

            # a stateful primitive's numbers build its module: constants
            stateful = getattr(self.primitives[func], "stateful", False)
            if isinstance(v, ClockV) and (func, name) not in CONSTANT_ONLY and not stateful:
                return v.term  # a schedule: the primitive gets a tensor (its value constraints are not checked)
            if not isinstance(v, NumV):
                raise SpecError(f"{func}(): '{name}' takes a number, got {kind_of(v)}", pos,
                                f"{func}()'s '{name}' must be a constant" if isinstance(v, ClockV) else None)
            return float(v.value)
        if kind == "bool":
            if not isinstance(v, BoolV):
                raise SpecError(f"{func}(): '{name}' takes true or false, got {kind_of(v)}", pos)
            return v.value
        raise SpecError(f"{func}(): unsupported parameter kind {kind}", pos)


def _hint(name: str, candidates, fallback: str | None) -> str | None:
    close = did_you_mean(name, list(candidates))
    return f"did you mean '{close}'?" if close else fallback
