"""AST -> ir.Program: resolve names, check arities and types, unroll losses into term trees.

Every problem becomes a `SpecError` at the offending position; independent problems are
collected and reported together. Nothing here builds a model: that is the next stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from xdsl.errors import Pos, SpecError, SpecErrors, SpecWarning
from xdsl.eval.items import EVALUATIONS
from xdsl.lang import ast, ir
from xdsl.lang.flow import dead_terms
from xdsl.lang.format import format_expr
from xdsl.lang.macros import expand_macros
from xdsl.lang.settings import DEFAULT_OPTIMIZER, OPTIMIZERS, ORDERS, REQUIRED, SCHEDULES, SETTINGS
from xdsl.registry import did_you_mean

__all__ = ["check", "path_of", "ORDERS", "SETTINGS", "OPTIMIZERS", "SCHEDULES"]

WHOLE = "all"  # the single part of a network that is not cut
BUILTIN_FUNCS = ("sum", "mean", "len", "peers", "ensemble")
ENSEMBLE_BY = ("probs", "logits")  # ensemble(..., by=...): average the softmaxes (default) or the logits

# ---- values the checker computes with ----

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
class TermV:
    term: ir.Term


@dataclass(frozen=True)
class ClockV:
    """A number computed from `epoch`, `epochs`, `step` while training (a schedule): a term without losses."""

    term: ir.Term


def _number_term(v: Any) -> ir.Term | None:
    """A number, schedule or loss as a term (the one place a number becomes a term), else None."""
    if isinstance(v, NumV):
        return ir.Const(float(v.value))
    if isinstance(v, ClockV | TermV):
        return v.term
    return None


def _combine(term: ir.Term, *operands: Any) -> Any:
    """`term` computed from `operands` is a loss if one of them is, else a schedule."""
    return TermV(term) if any(isinstance(o, TermV) for o in operands) else ClockV(term)


def _kind(v: Any) -> str:
    return {NetV: "a network", PathV: "a path", ListV: "a list", NumV: "a number", StrV: "a string",
            BoolV: "a boolean", LabelsV: "the labels y", TermV: "a loss",
            ClockV: "a number that changes while training (epoch, epochs, step)",
            EnsembleV: "an ensemble"}.get(type(v), "a value")


def _literal(v: Any) -> Any:
    """A checked constant value as plain Python (for kwargs of data, models, adapters...)."""
    if isinstance(v, NumV | StrV | BoolV):
        return v.value
    if isinstance(v, ListV):
        return [_literal(i) for i in v.items]
    if isinstance(v, NetV):
        return v.name
    raise TypeError


class _Checker:
    def __init__(self, spec: ast.Spec):
        self.spec = spec
        self.errors: list[SpecError] = []
        self.warnings: list[SpecWarning] = []
        self.networks: dict[str, ir.NetworkDecl] = {}
        self.parts: dict[str, tuple[str, ...]] = {}
        self.cuts: dict[str, ir.CutDecl] = {}
        self.adapters: dict[str, ir.AdapterDecl] = {}
        self.losses: dict[str, ast.LossDef] = {}
        self.data: ir.DataDecl | None = None
        self.stages: list[ir.Stage] = []
        self.evaluate: list[ir.EvalItem] = []
        self._call_depth = 0

    def error(self, message: str, pos: Pos | None, hint: str | None = None) -> None:
        self.errors.append(SpecError(message, pos, hint))

    # ---- declarations ----
    def run(self) -> ir.Program:
        from xdsl.losses import LOSSES

        self.primitives = LOSSES
        for s in self.spec.statements:
            try:
                getattr(self, "stmt_" + type(s).__name__.lower())(s)
            except SpecError as e:
                self.errors.append(e)
        self._check_task()
        if self.errors:
            errors = _unique(self.errors)
            raise errors[0] if len(errors) == 1 else SpecErrors(errors)
        return ir.Program(self.spec.file, self.spec, self.data, self.networks, self.parts, self.cuts,
                          self.adapters, self.stages, self.evaluate, _unique(self.warnings))

    def _taken(self, name: str) -> str | None:
        if name in self.networks:
            return "network"
        if name in self.adapters:
            return "adapter"
        if name in self.losses:
            return "loss"
        if name in ("x", "y", "pi") or name in BUILTIN_FUNCS or name in ir.CLOCKS or name in ir.FUNCS \
                or name in self.primitives:
            return "built-in name"
        return None

    def _declare(self, name: str, pos: Pos) -> bool:
        kind = self._taken(name)
        if kind:
            self.error(f"'{name}' is already defined as a {kind}", pos)
            return False
        return True

    def _const_kwargs(self, kwargs: tuple[ast.Keyword, ...], allowed: dict[str, Any] | None,
                      what: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in kwargs:
            if k.name in out:
                self.error(f"keyword '{k.name}' given twice", k.pos)
                continue
            if allowed is not None and k.name not in allowed:
                self.error(f"{what} has no parameter '{k.name}'", k.pos,
                           _hint(k.name, allowed, f"its parameters are: {', '.join(allowed) or 'none'}"))
                continue
            if allowed is not None and isinstance(allowed.get(k.name), str) and isinstance(k.value, ast.Name):
                out[k.name] = k.value.id  # a symbolic option such as measure=bmm_std
                continue
            try:
                out[k.name] = _literal(self.const(k.value))
            except SpecError as e:
                self.errors.append(e)
            except TypeError:
                self.error(f"'{k.name}' must be a constant (number, string, boolean or list)", k.value.pos)
        return out

    def const(self, e: ast.Expr) -> Any:
        """Evaluate a constant expression (numbers, strings, lists, arithmetic on numbers)."""
        v = self.expr(e, {}, allow_names=False)
        return v

    def stmt_data(self, s: ast.Data) -> None:
        from xdsl.data import DATASETS, dataset_params

        if self.data is not None:
            self.error("only one 'data' statement is allowed", s.pos)
            return
        if s.name not in DATASETS:
            raise SpecError(f"unknown dataset '{s.name}'", s.pos, _hint(s.name, DATASETS, None))
        kwargs = self._const_kwargs(s.kwargs, dataset_params(s.name), f"dataset '{s.name}'")
        if "batch_size" in kwargs and not (isinstance(kwargs["batch_size"], int) and kwargs["batch_size"] >= 1):
            self.error("batch_size must be an integer >= 1", _kwpos(s.kwargs, "batch_size"))
        self.data = ir.DataDecl(s.name, kwargs, s.pos)

    def stmt_network(self, s: ast.Network) -> None:
        kwargs = self._const_kwargs(s.kwargs, None, f"network '{s.ref}'")
        for name in s.names:
            if self._declare(name, s.pos):
                self.networks[name] = ir.NetworkDecl(name, s.ref, kwargs, s.weights, s.pos)
                self.parts[name] = (WHOLE,)

    def stmt_cut(self, s: ast.Cut) -> None:
        if len(s.parts) != len(s.points) + 1:
            self.error(f"{len(s.points)} cut point(s) make {len(s.points) + 1} parts, but {len(s.parts)} "
                       f"part name(s) are given", s.pos)
            return
        if len(set(s.parts)) != len(s.parts):
            self.error("part names must be distinct", s.pos)
            return
        if len(set(s.points)) != len(s.points):
            self.error("cut points must be distinct", s.pos)
            return
        for net in s.networks:
            if net not in self.networks:
                self.error(f"cut of undefined network '{net}'", s.pos, _hint(net, self.networks, None))
            elif net in self.cuts:
                self.error(f"network '{net}' is already cut (at {self.cuts[net].pos})", s.pos)
            else:
                self.cuts[net] = ir.CutDecl(tuple(s.points), tuple(s.parts), s.pos)
                self.parts[net] = tuple(s.parts)

    def stmt_adapter(self, s: ast.Adapter) -> None:
        from xdsl.adapters import ADAPTERS, adapter_params

        if s.kind not in ADAPTERS:
            self.error(f"unknown adapter kind '{s.kind}'", s.pos, _hint(s.kind, ADAPTERS.names(), None))
            return
        kwargs = self._const_kwargs(s.kwargs, adapter_params(s.kind), f"adapter '{s.kind}'")
        unknown = [o for o in s.owners if o not in self.networks]
        if unknown:
            self.error(f"adapter owner '{unknown[0]}' is not a network", s.pos,
                       _hint(unknown[0], self.networks, None))
            return
        if len(set(s.owners)) != len(s.owners):
            self.error(f"adapter '{s.name}' lists an owner twice", s.pos)
            return
        if self._declare(s.name, s.pos):
            self.adapters[s.name] = ir.AdapterDecl(s.name, s.kind, kwargs, tuple(s.owners), s.pos)

    def stmt_lossdef(self, s: ast.LossDef) -> None:
        if len(set(s.params)) != len(s.params):
            self.error(f"loss '{s.name}' has a repeated parameter name", s.pos)
        if self._declare(s.name, s.pos):
            self.losses[s.name] = s

    def stmt_macrocall(self, s: ast.MacroCall) -> None:  # expand_macros removes these before checking
        raise SpecError(f"unknown macro '{s.name}'", s.pos)

    def stmt_evaluate(self, s: ast.Evaluate) -> None:
        for item in s.items:
            try:
                self.evaluate.append(self._eval_item(item))
            except SpecError as e:
                self.errors.append(e)

    def _eval_item(self, item: ast.Expr) -> ir.EvalItem:
        if isinstance(item, ast.Name):
            item = ast.Call(item.id, (), (), item.pos)
        if not isinstance(item, ast.Call):
            raise SpecError("an evaluate item is a name or a call such as xross(net1, net2)", item.pos)
        if item.func not in EVALUATIONS:
            raise SpecError(f"unknown evaluation '{item.func}'", item.pos,
                            _hint(item.func, EVALUATIONS, f"known: {', '.join(EVALUATIONS)}"))
        kind = EVALUATIONS.get(item.func)
        takes, allowed = kind.takes, kind.keywords
        kwargs = {**allowed, **self._const_kwargs(item.kwargs, allowed, f"evaluation '{item.func}'")}
        args = []
        for a in item.args:
            v = self.expr(a, {})
            if takes == "networks":
                if not isinstance(v, NetV):
                    raise SpecError(f"{item.func}() takes networks, got {_kind(v)}", a.pos)
                args.append(v.name if v.epoch is None else f"{v.name}@{v.epoch}")
            else:
                args.append(self._as_path(v, a.pos, f"{item.func}()").path)
        wrong = kind.check_keywords(kwargs)
        if wrong is not None:
            keyword, message, hint = wrong
            raise SpecError(message, _kwpos(item.kwargs, keyword) or item.pos, hint)
        if takes == "networks" and len(args) < kind.min_networks:
            raise SpecError(f"{item.func}() needs at least {kind.min_networks} networks", item.pos)
        return ir.EvalItem(item.func, tuple(args), kwargs, item.pos)

    def _check_task(self) -> None:
        """Re-id data has no labelled test split of its training classes; classification data no
        query/gallery split. Each evaluate item says which it needs (`EvaluateItem.split`)."""
        from xdsl.data import RETRIEVAL_DATASETS

        if self.data is None:
            return
        reid = self.data.name in RETRIEVAL_DATASETS
        for item in self.evaluate:
            split = EVALUATIONS.get(item.kind).split(item.kwargs)
            if reid and split == "test":
                self.error(f"{item.kind}() scores a labelled test split, which re-id dataset '{self.data.name}' "
                           "does not have (its test identities are not its training classes)", item.pos,
                           "evaluate re-id networks with retrieval(...)")
            elif not reid and split == "query/gallery":
                self.error(f"{item.kind}() needs a re-id dataset with a query/gallery split; "
                           f"'{self.data.name}' is a classification dataset", item.pos,
                           "re-id datasets: market1501, synthetic_reid")

    # ---- train blocks ----
    def stmt_train(self, s: ast.Train) -> None:
        name = s.name or f"train{len(self.stages) + 1}"
        if any(st.name == name for st in self.stages):
            self.error(f"train block '{name}' is defined twice", s.pos)
        if s.after is not None and not any(st.name == s.after for st in self.stages):
            self.error(f"'after {s.after}': no earlier train block is called '{s.after}'", s.pos,
                       _hint(s.after, [st.name for st in self.stages], None))
        settings = self._settings(s)
        objectives: dict[str, ir.Term] = {}
        for m in s.minimizes:
            try:
                self._minimize(m, objectives)
            except SpecError as e:
                self.errors.append(e)
        if not s.minimizes:
            self.error("a train block needs at least one 'minimize ... wrt ...'", s.pos)
        if settings.get("map_channels") and len([n for n in objectives if n in self.cuts]) < 2:
            pos = next(st.pos for st in s.settings if st.key == "map_channels")
            self.error("map_channels needs two or more cut networks minimised in this train block", pos)
        default = ir.OptimizerDecl(DEFAULT_OPTIMIZER, dict(OPTIMIZERS[DEFAULT_OPTIMIZER]), s.pos)
        optimizer = settings.pop("optimizer") or default
        self.stages.append(ir.Stage(
            name, s.after, objectives, optimizer, settings.pop("epochs"), settings.pop("order"),
            settings.pop("schedule"), settings, s.pos))

    def _settings(self, s: ast.Train) -> dict[str, Any]:
        out = {k: default for k, (_, default) in SETTINGS.items()}
        seen: set[str] = set()
        for st in s.settings:
            if st.key not in SETTINGS:
                self.error(f"unknown train setting '{st.key}'", st.pos,
                           _hint(st.key, SETTINGS, f"settings: {', '.join(SETTINGS)}"))
                continue
            if st.key in seen:
                self.error(f"setting '{st.key}' given twice", st.pos)
            seen.add(st.key)
            try:
                out[st.key] = self._setting(st)
            except SpecError as e:
                self.errors.append(e)
        if {"epochs", "steps"} <= seen:
            pos = next(st.pos for st in s.settings if st.key == "steps")
            self.error("a train block gives either 'epochs' or 'steps', not both", pos,
                       "steps N trains N optimisation steps (the last epoch is cut short); epochs N, N full passes")
        return out

    def _setting(self, st: ast.Setting) -> Any:
        kind = SETTINGS[st.key][0]
        if kind in ("optimizer", "schedule"):
            table = OPTIMIZERS if kind == "optimizer" else SCHEDULES
            call = st.value
            if isinstance(call, ast.Name):
                call = ast.Call(call.id, (), (), call.pos)
            if not isinstance(call, ast.Call) or call.args:
                raise SpecError(f"{st.key} is a name with keyword arguments, e.g. "
                                f"{'adam(lr=1e-4)' if kind == 'optimizer' else 'step(every=60, gamma=0.1)'}",
                                st.value.pos)
            if call.func not in table:
                raise SpecError(f"unknown {kind} '{call.func}'", call.pos,
                                _hint(call.func, table, f"known: {', '.join(table)}"))
            kwargs = {**table[call.func], **self._const_kwargs(call.kwargs, table[call.func], f"{kind} '{call.func}'")}
            missing = [k for k, v in kwargs.items() if v is REQUIRED]
            if missing:
                raise SpecError(f"{kind} {call.func}() needs {' and '.join(f'{k}=' for k in missing)}", call.pos,
                                "e.g. step(every=60, gamma=0.1) or multistep(milestones=[60, 120, 160])")
            _check_hyperparameters(call, kwargs)
            return ir.OptimizerDecl(call.func, kwargs, call.pos)
        if kind == "measure":
            from xdsl.mapping import MEASURES

            if not isinstance(st.value, ast.Name) or st.value.id not in MEASURES:
                got = st.value.id if isinstance(st.value, ast.Name) else "a value"
                raise SpecError(f"map_channels takes a measure, got '{got}'", st.value.pos,
                                _hint(got, MEASURES, f"measures: {', '.join(MEASURES)}"))
            return st.value.id
        if kind == "order":
            if not isinstance(st.value, ast.Name):
                raise SpecError(f"order is one of {', '.join(ORDERS)}", st.value.pos)
            if st.value.id not in ORDERS:
                raise SpecError(f"unknown order '{st.value.id}'", st.value.pos,
                                _hint(st.value.id, ORDERS, f"orders: {', '.join(ORDERS)}"))
            return st.value.id
        v = self.const(st.value)
        if not isinstance(v, NumV):
            raise SpecError(f"{st.key} must be a number, got {_kind(v)}", st.value.pos)
        if kind == "int>=1":
            if not (isinstance(v.value, int) and v.value >= 1):
                raise SpecError(f"{st.key} must be an integer >= 1, got {v.value}", st.value.pos)
        elif kind == "number>0" and not v.value > 0:
            raise SpecError(f"{st.key} must be > 0, got {v.value}", st.value.pos)
        return v.value

    def _minimize(self, m: ast.Minimize, objectives: dict[str, ir.Term]) -> None:
        if m.var is None:
            bindings = [{}]
            peers: tuple[NetV, ...] = ()
        else:
            it = self.expr(m.iter, {})
            if not isinstance(it, ListV) or not all(isinstance(i, NetV) for i in it.items):
                raise SpecError(f"'for {m.var} in ...' needs a list of networks, got {_kind(it)}", m.iter.pos)
            peers = it.items
            bindings = [{m.var: item} for item in it.items]
        for env in bindings:
            env = dict(env)
            env["__peers__"] = ListV(peers)
            wrt = self.expr(m.wrt, env)
            if not isinstance(wrt, NetV) or wrt.epoch is not None:
                raise SpecError(f"'wrt' takes a network, got {_kind(wrt)}", m.wrt.pos)
            if wrt.name in objectives:
                raise SpecError(f"network '{wrt.name}' is minimised twice in this train block", m.pos)
            v = self.expr(m.objective, env)
            if isinstance(v, NumV):
                raise SpecError("the objective is a constant: it has no gradient", m.objective.pos)
            if not isinstance(v, TermV):
                raise SpecError(f"minimize needs a loss, got {_kind(v)}", m.objective.pos,
                                "wrap paths in a loss such as ce(path, y)")
            _no_snapshots(v.term, m.objective.pos)
            self._gradient_flow(v.term, wrt.name, m.objective.pos)
            objectives[wrt.name] = v.term

    def _gradient_flow(self, term: ir.Term, net: str, pos: Pos) -> None:
        """No term can train `net`: an error; some terms cannot: a warning each (see xdsl.lang.flow)."""
        dead, live = dead_terms(term, net, self.adapters, self.parts)
        if not live:
            first = dead[0]
            raise SpecError(f"this objective sends no gradient into '{net}' (its parts or the adapters it owns), "
                            f"so 'minimize ... wrt {net}' would not train it: {first.reason}", pos, first.hint)
        for d in dead:
            self.warnings.append(SpecWarning(f"dead loss term: {d.reason}",
                                             d.prim.pos if d.prim.pos.line else pos, d.hint))

    # ---- expressions ----
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
                        _hint(e.id, candidates + ["x", "y", "pi", *ir.CLOCKS], None))

    def e_attribute(self, e: ast.Attribute, env):
        base = self.expr(e.value, env)
        if not isinstance(base, NetV):
            raise SpecError(f"only networks have parts; '.{e.attr}' is applied to {_kind(base)}", e.pos)
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
            raise SpecError(f"'@{e.epoch}' applies to a network, got {_kind(base)}", e.pos)
        return NetV(base.name, e.epoch)

    def e_neg(self, e: ast.Neg, env):
        v = self.expr(e.operand, env)
        if isinstance(v, NumV):
            return NumV(-v.value)
        if isinstance(v, TermV | ClockV):
            return _combine(ir.Arith("*", ir.Const(-1.0), v.term), v)
        raise SpecError(f"cannot negate {_kind(v)}", e.pos)

    def e_binop(self, e: ast.BinOp, env):
        left, right = self.expr(e.left, env), self.expr(e.right, env)
        if e.op == ">>":
            lp = self._as_path(left, e.left.pos, "'>>'")
            rp = self._as_path(right, e.right.pos, "'>>'")
            return self._join(lp, rp, e.pos)
        for side, v in (("left", left), ("right", right)):
            if _number_term(v) is None:
                raise SpecError(f"'{e.op}' needs losses or numbers, but its {side} side is {_kind(v)}",
                                (e.left if side == "left" else e.right).pos,
                                "wrap a path in a loss, e.g. ce(path, y)" if isinstance(v, PathV | NetV) else None)
        if isinstance(left, NumV) and isinstance(right, NumV):
            if e.op == "/" and right.value == 0:
                raise SpecError("division by zero", e.right.pos)
            a, b = left.value, right.value
            return NumV({"+": a + b, "-": a - b, "*": a * b, "/": a / b if e.op == "/" else 0}[e.op])
        if e.op == "/" and isinstance(right, NumV) and right.value == 0:
            raise SpecError("division by zero", e.right.pos)
        return _combine(ir.Arith(e.op, _number_term(left), _number_term(right)), left, right)

    def _as_path(self, v: Any, pos: Pos, what: str) -> PathV:
        if isinstance(v, PathV):
            return v
        if isinstance(v, NetV):
            parts = self.parts[v.name]
            steps = tuple(ir.PartStep(v.name, p, i, v.epoch) for i, p in enumerate(parts))
            return PathV(ir.Path(steps), len(steps) - 1)
        raise SpecError(f"{what} needs a path (e.g. net1.up >> net2.down), got {_kind(v)}", pos)

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
                raise SpecError(f"len() takes a list, got {_kind(v)}", e.args[0].pos)
            return NumV(len(v.items))
        if e.func == "peers":
            self._arity(e, 1, 1)
            v = self.expr(e.args[0], env)
            if not isinstance(v, NetV):
                raise SpecError(f"peers() takes a network, got {_kind(v)}", e.args[0].pos)
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
                raise SpecError(f"{e.func}() takes numbers or epoch/epochs/step, got {_kind(v)}", a.pos,
                                "weight a loss by a schedule instead, e.g. min(epoch / 20, 1) * kl(t, s)"
                                if isinstance(v, TermV) else None)
            values.append(v)
        if all(isinstance(v, NumV) for v in values):
            nums = [float(v.value) for v in values]
            if e.func == "exp" and nums[0] > 700:
                raise SpecError(f"exp({nums[0]:g}) overflows", e.pos)
            return NumV({"min": min, "max": max, "exp": lambda x: math.exp(x), "cos": lambda x: math.cos(x)}
                        [e.func](*nums))
        return ClockV(ir.Func(e.func, tuple(_number_term(v) for v in values)))

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
                raise SpecError(f"'for {arg.var} in ...' needs a list, got {_kind(it)}", arg.iter.pos)
            values = [self.expr(arg.body, {**env, arg.var: item}) for item in it.items]
            body_pos = arg.body.pos
        else:
            it = self.expr(arg, env)
            if not isinstance(it, ListV):
                raise SpecError(f"{e.func}() takes a list or 'expr for v in list', got {_kind(it)}", arg.pos)
            values, body_pos = list(it.items), arg.pos
        if not values:
            if e.func == "mean":
                raise SpecError("mean() over an empty list", e.pos, "does the cohort have a single network?")
            return NumV(0)
        terms = []
        for v in values:
            if _number_term(v) is None:
                raise SpecError(f"{e.func}() adds losses or numbers, got {_kind(v)}", body_pos)
            terms.append(_number_term(v))
        if all(isinstance(v, NumV) for v in values):
            total = sum(v.value for v in values)
            return NumV(total / len(values) if e.func == "mean" else total)
        total = terms[0]
        for t in terms[1:]:
            total = ir.Arith("+", total, t)
        if e.func == "mean" and len(terms) > 1:
            total = ir.Arith("/", total, ir.Const(float(len(terms))))
        return _combine(total, *values)

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
        return TermV(ir.Prim(e.func, tuple(args), e.pos))

    def _prim_arg(self, func: str, name: str, kind: str, v: Any, pos: Pos) -> Any:
        if kind == "logits" and isinstance(v, EnsembleV):
            return v.ensemble
        if kind in ("logits", "features"):
            if isinstance(v, LabelsV):
                raise SpecError(f"{func}(): '{name}' takes a path, got the labels y", pos)
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
                raise SpecError(f"{func}(): '{name}' takes the labels y, got {_kind(v)}", pos)
            return ir.Labels()
        if kind == "number":
            from xdsl.losses import CONSTANT_ONLY

            if isinstance(v, ClockV) and (func, name) not in CONSTANT_ONLY:
                return v.term  # a schedule: the primitive gets a tensor (its value constraints are not checked)
            if not isinstance(v, NumV):
                raise SpecError(f"{func}(): '{name}' takes a number, got {_kind(v)}", pos,
                                f"{func}()'s '{name}' must be a constant" if isinstance(v, ClockV) else None)
            return float(v.value)
        if kind == "bool":
            if not isinstance(v, BoolV):
                raise SpecError(f"{func}(): '{name}' takes true or false, got {_kind(v)}", pos)
            return v.value
        raise SpecError(f"{func}(): unsupported parameter kind {kind}", pos)


def _no_snapshots(term: ir.Term, pos: Pos) -> None:
    if isinstance(term, ir.Arith):
        _no_snapshots(term.left, pos)
        _no_snapshots(term.right, pos)
    elif isinstance(term, ir.Prim):
        for a in term.args:
            if isinstance(a, ir.Path) and any(isinstance(s, ir.PartStep) and s.epoch is not None for s in a.steps):
                raise SpecError("snapshots (net@epoch) can be evaluated but not trained", term.pos)


def _check_hyperparameters(call: ast.Call, kwargs: dict[str, Any]) -> None:
    """Values torch.optim would reject (or silently misread), as located errors."""
    def where(key: str) -> Pos:
        return _kwpos(call.kwargs, key) or call.pos

    for key, value in kwargs.items():
        if key in ("nesterov", "amsgrad"):
            if not isinstance(value, bool):
                raise SpecError(f"{key} must be true or false, got {value!r}", where(key))
        elif key == "milestones":
            if not (isinstance(value, list) and value and all(isinstance(v, int) and v >= 1 for v in value)
                    and value == sorted(set(value))):
                raise SpecError(f"milestones must be a list of increasing epochs >= 1, got {value!r}", where(key))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{key} must be a number, got {value!r}", where(key))
        elif key in ("lr", "gamma", "eps", "every") and not value > 0:
            raise SpecError(f"{key} must be a number > 0, got {value!r}", where(key))
        elif key in ("beta1", "beta2") and not 0 <= value < 1:
            raise SpecError(f"{key} must be in [0, 1), got {value!r}", where(key))
        elif not value >= 0:
            raise SpecError(f"{key} must be >= 0, got {value!r}", where(key))
    if kwargs.get("nesterov") and not (kwargs.get("momentum", 0) > 0 and kwargs.get("dampening", 0) == 0):
        raise SpecError("nesterov=true needs momentum > 0 and dampening=0 (as torch.optim.SGD)", where("nesterov"),
                        "e.g. sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)")
    if "every" in kwargs and not isinstance(kwargs["every"], int):
        raise SpecError(f"every must be a whole number of epochs, got {kwargs['every']!r}", where("every"))


def _unique(problems: list) -> list:
    """Sorted by position, each (position, message) once: a loss used by three objectives errs once."""
    seen: dict[tuple, SpecError] = {}
    for p in problems:
        seen.setdefault((p.pos, p.message), p)
    return sorted(seen.values(), key=lambda e: (e.pos.line, e.pos.col) if e.pos else (0, 0))


def _hint(name: str, candidates, fallback: str | None) -> str | None:
    close = did_you_mean(name, list(candidates))
    return f"did you mean '{close}'?" if close else fallback


def _kwpos(kwargs: tuple[ast.Keyword, ...], name: str) -> Pos | None:
    return next((k.value.pos for k in kwargs if k.name == name), None)


def check(spec: ast.Spec, *, strict: bool = False) -> ir.Program:
    """Expand macros, then check the spec; raise SpecError / SpecErrors listing every problem found.

    Warnings (loss terms that cannot train their network, ...) are kept in `Program.warnings`;
    with `strict` they are errors.
    """
    program = _Checker(expand_macros(spec)).run()
    if strict and program.warnings:
        errors = [w.as_error() for w in program.warnings]
        raise errors[0] if len(errors) == 1 else SpecErrors(errors)
    return program


def path_of(program: ir.Program, expr: ast.Expr) -> ir.Path:
    """Resolve a path expression (`net1.up >> a12 >> net2.down`) against a checked program."""
    checker = _Checker(program.spec)
    checker.run()
    return checker._as_path(checker.expr(expr, {}), getattr(expr, "pos", None), "a path").path
