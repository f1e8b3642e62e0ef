"""AST -> ir.Program: resolve names, check arities and types, unroll losses into term trees.

Every problem becomes a `SpecError` at the offending position; independent problems are
collected and reported together. Nothing here builds a model: that is the next stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdsl.errors import Pos, SpecError, SpecErrors, SpecWarning
from xdsl.eval.items import EVALUATIONS
from xdsl.lang import ast, ir
from xdsl.lang.augment import soft_label_errors, split_augment
from xdsl.lang.data_keywords import data_keyword_errors
from xdsl.lang.flow import dead_terms
from xdsl.lang.macros import expand_macros
from xdsl.lang.primitives import declare_primitive, declared_only, earlier_clash
from xdsl.lang.settings import DEFAULT_OPTIMIZER, OPTIMIZERS, ORDERS, REQUIRED, SCHEDULES, SETTINGS
from xdsl.lang.terms import BUILTIN_FUNCS, WHOLE, TermChecker, _hint
from xdsl.lang.values import (
    BoolV,
    ListV,
    NetV,
    NumV,
    TermV,
    kind_of,
    literal,
)

__all__ = ["check", "path_of", "ORDERS", "SETTINGS", "OPTIMIZERS", "SCHEDULES"]


class _Checker(TermChecker):
    def __init__(self, spec: ast.Spec, allow_imports: bool = False):
        self.spec = spec
        self.allow_imports = allow_imports
        self.user_primitives: dict[str, Any] = {}
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
        self._eval_keywords: dict[int, tuple[ast.Keyword, ...]] = {}  # id(item) -> its keywords (positions)
        self._call_depth = 0

    def error(self, message: str, pos: Pos | None, hint: str | None = None) -> None:
        self.errors.append(SpecError(message, pos, hint))

    # ---- declarations ----
    def run(self) -> ir.Program:
        from xdsl.losses import LOSSES

        self.primitives = {name: LOSSES[name] for name in LOSSES}
        for s in self.spec.statements:  # user primitives first: a loss may use one declared below it
            if isinstance(s, ast.PrimitiveDecl):
                self._declare_primitive(s)
        self.primitives.update(self.user_primitives)
        for s in self.spec.statements:
            try:
                getattr(self, "stmt_" + type(s).__name__.lower())(s)
            except SpecError as e:
                self.errors.append(e)
        self._check_task()
        self._check_items_in_program()
        self.errors += soft_label_errors(self.data, self.stages)  # mixup/cutmix make y soft
        if self.errors:
            errors = _unique(self.errors)
            raise errors[0] if len(errors) == 1 else SpecErrors(errors)
        return self._program(_unique(self.warnings))

    def _program(self, warnings: list | None = None) -> ir.Program:
        return ir.Program(self.spec.file, self.spec, self.data, self.networks, self.parts, self.cuts,
                          self.adapters, self.stages, self.evaluate, warnings or [])

    @property
    def _spec_dir(self) -> Path | None:
        """The folder of the spec file, where user modules are imported from (None for a spec from a string)."""
        return Path(self.spec.file).resolve().parent if Path(self.spec.file).is_file() else None

    def _taken(self, name: str) -> str | None:
        if name in self.networks:
            return "network"
        if name in self.adapters:
            return "adapter"
        if name in self.losses:
            return "loss"
        if name in self.user_primitives:
            return "primitive"
        if name in ("x", "y", "i", "pi") or name in BUILTIN_FUNCS or name in ir.CLOCKS or name in ir.FUNCS \
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
                out[k.name] = literal(self.const(k.value))
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
        from xdsl.data import DataParamError, spec_params

        if self.data is not None:
            self.error("only one 'data' statement is allowed", s.pos)
            return
        try:  # a "module:fn" is imported for its signature; None: it takes **kwargs
            allowed = spec_params(s.name, self._spec_dir, self.allow_imports)
        except DataParamError as e:
            raise SpecError(e.message, s.pos, e.hint) from None
        plain, augment = split_augment(s, allowed, self.const, self.errors)  # augment=[...]
        kwargs = {**self._const_kwargs(plain, allowed, f"dataset '{s.name}'"), **augment}
        self.errors += data_keyword_errors(s, kwargs, allowed)  # batch_size, val_fraction, required keywords
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

    def _declare_primitive(self, s: ast.PrimitiveDecl) -> None:
        if clash := earlier_clash(s, self.spec):  # the name is taken above: this statement is the duplicate
            return self.errors.append(clash)
        try:
            spec = declare_primitive(s, self._spec_dir, self.allow_imports)
        except SpecError as e:
            self.errors.append(e)
            spec = declared_only(s)  # its calls are still checked, not each reported as an unknown name
        if spec is not None and self._declare(s.name, s.pos):
            self.user_primitives[s.name] = spec

    def stmt_primitivedecl(self, s: ast.PrimitiveDecl) -> None:  # declared before the other statements
        pass

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
                    raise SpecError(f"{item.func}() takes networks, got {kind_of(v)}", a.pos)
                args.append(v.name if v.epoch is None else f"{v.name}@{v.epoch}")
            else:
                args.append(self._as_path(v, a.pos, f"{item.func}()").path)
        wrong = kind.check_keywords(kwargs)
        if wrong is not None:
            keyword, message, hint = wrong
            raise SpecError(message, _kwpos(item.kwargs, keyword) or item.pos, hint)
        if takes == "networks" and len(args) < kind.min_networks:
            raise SpecError(f"{item.func}() needs at least {kind.min_networks} networks", item.pos)
        checked = ir.EvalItem(item.func, tuple(args), kwargs, item.pos)
        self._eval_keywords[id(checked)] = item.kwargs
        return checked

    def _check_items_in_program(self) -> None:
        """Items that name train blocks or other items (`error_table`), once every statement is checked
        (after the other errors are fixed: a block that did not check would read as a missing one)."""
        if self.errors:
            return
        program = self._program()
        for item in self.evaluate:
            wrong = EVALUATIONS.get(item.kind).check_program(item, program)
            if wrong is None:
                continue
            keyword, index, message, hint = wrong
            keywords = self._eval_keywords.get(id(item), ())
            value = next((k.value for k in keywords if k.name == keyword), None)
            if index is not None and isinstance(value, ast.ListExpr) and index < len(value.items):
                pos = value.items[index].pos
            else:
                pos = value.pos if value is not None else item.pos
            self.error(message, pos, hint)

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
        if kind == "bool":
            if not isinstance(v, BoolV):
                raise SpecError(f"{st.key} is true or false, got {kind_of(v)}", st.value.pos)
            return v.value
        if not isinstance(v, NumV):
            raise SpecError(f"{st.key} must be a number, got {kind_of(v)}", st.value.pos)
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
                raise SpecError(f"'for {m.var} in ...' needs a list of networks, got {kind_of(it)}", m.iter.pos)
            peers = it.items
            bindings = [{m.var: item} for item in it.items]
        for env in bindings:
            env = dict(env)
            env["__peers__"] = ListV(peers)
            wrt = self.expr(m.wrt, env)
            if not isinstance(wrt, NetV) or wrt.epoch is not None:
                raise SpecError(f"'wrt' takes a network, got {kind_of(wrt)}", m.wrt.pos)
            if wrt.name in objectives:
                raise SpecError(f"network '{wrt.name}' is minimised twice in this train block", m.pos)
            v = self.expr(m.objective, env)
            if isinstance(v, NumV):
                raise SpecError("the objective is a constant: it has no gradient", m.objective.pos)
            if not isinstance(v, TermV):
                raise SpecError(f"minimize needs a loss, got {kind_of(v)}", m.objective.pos,
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


def _kwpos(kwargs: tuple[ast.Keyword, ...], name: str) -> Pos | None:
    return next((k.value.pos for k in kwargs if k.name == name), None)


def check(spec: ast.Spec, *, strict: bool = False, allow_imports: bool = False) -> ir.Program:
    """Expand macros, then check the spec; raise SpecError / SpecErrors listing every problem found.

    Warnings (loss terms that cannot train their network, ...) are kept in `Program.warnings`;
    with `strict` they are errors. User loss primitives (`primitive` statements) are imported here:
    from beside the spec, or from anywhere with `allow_imports`.
    """
    program = _Checker(expand_macros(spec), allow_imports).run()
    if strict and program.warnings:
        errors = [w.as_error() for w in program.warnings]
        raise errors[0] if len(errors) == 1 else SpecErrors(errors)
    return program


def path_of(program: ir.Program, expr: ast.Expr) -> ir.Path:
    """Resolve a path expression (`net1.up >> a12 >> net2.down`) against a checked program."""
    checker = _Checker(program.spec, allow_imports=True)  # its imports passed the rule when it was checked
    checker.run()
    return checker._as_path(checker.expr(expr, {}), getattr(expr, "pos", None), "a path").path
