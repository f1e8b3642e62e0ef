"""Cut stage: split a network into consecutive parts at named cut points, sharing its parameters.

torch.fx traces the network; every graph node is given to a part by its POSITION in the graph
(names would misplace residual `add` nodes, which have no module prefix), and each part is rebuilt
as its own GraphModule. (`torch.fx.passes.split_module` is not used: it turns direct parameter reads,
as in ConvNeXt's layer scales or ViT's class token, into extra part inputs.) The parts hold the network's own
submodules, so training a part trains the network, and composing the parts is the network exactly.
A valid cut is crossed by exactly one live tensor, so every part maps one tensor to one tensor.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from xdsl.errors import XdslError
from xdsl.registry import did_you_mean

__all__ = ["trace_model", "cut_model", "cut_points_available", "cut_point_nodes", "compose"]


@functools.cache
def _reads_training(cls: type) -> bool:
    """Whether a module class's forward branches on `self.training` (fx would bake one mode in)."""
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


class _Proxy(fx.Proxy):
    """Records `a += b` as in-place `operator.iadd`, as the model runs it (fx's default records `a + b`,
    which allocates a new tensor for every residual add of a ResNet). Node names stay `add_N`."""

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {}, name="add")


class _Tracer(fx.Tracer):
    """fx tracer that keeps mode-dependent modules (stochastic depth, drop path) and given types whole.

    A module whose forward reads `self.training` stays one call, so the parts follow the
    network's train/eval mode at run time instead of the mode it was traced in.
    """

    def __init__(self, leaf_types: tuple[type, ...] = (), autowrap_functions: tuple = ()):
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if _reads_training(type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _tracer_for(model: nn.Module) -> fx.Tracer:
    """timm models trace with timm's own leaf modules / functions (best effort across timm versions)."""
    if not type(model).__module__.startswith("timm."):
        return _Tracer()
    leaves: set = set()
    functions: set = set()
    try:
        from timm.layers import _fx as timm_fx

        leaves, functions = set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())
    except Exception:
        try:
            from timm.models import _features_fx as timm_fx_old

            leaves = set(getattr(timm_fx_old, "_leaf_modules", ()))
            functions = set(getattr(timm_fx_old, "_autowrap_functions", ()))
        except Exception:
            pass
    return _Tracer(tuple(leaves), tuple(functions))


def _defaults_after_first(model: nn.Module) -> dict[str, object]:
    """forward's optional arguments after the input, fixed to their defaults (e.g. timm's attn_mask=None)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params[1:]
        if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _trace_once(model: nn.Module) -> fx.GraphModule:
    tracer = _tracer_for(model)
    try:
        graph = tracer.trace(model, concrete_args=_defaults_after_first(model) or None)
    except Exception as e:
        raise XdslError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {e}",
            hint="cutting needs a forward without Python control flow on tensor values "
            "(see torch.fx's limitations); wrap such code in a leaf module",
        ) from e
    _drop_specialized_inputs(graph)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _drop_specialized_inputs(graph: fx.Graph) -> None:
    """Remove inputs after the first whose only uses are fx's checks that they keep their default."""
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        closure: list[fx.Node] = []
        todo = [ph]
        while todo:
            n = todo.pop()
            if n not in closure:
                closure.append(n)
                todo.extend(n.users)
        if any(n.op == "output" for n in closure):
            continue
        members = set(closure)
        for n in reversed(list(graph.nodes)):
            if n in members:
                graph.erase_node(n)


def trace_model(model: nn.Module) -> fx.GraphModule:
    """The network as an fx GraphModule holding the network's own submodules and parameters.

    It is traced in train and in eval mode (each module's own mode is restored afterwards); a
    network whose top-level code differs between the two (auxiliary outputs in training) is refused,
    since one traced graph could not serve both.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        gm = _trace_once(model.train())
        other = _trace_once(model.eval())
    finally:
        for m, training in modes.items():
            m.training = training
    constant = re.compile(r"_tensor_constant\d+")  # each trace numbers its lifted constants anew
    if constant.sub("_c", gm.code) != constant.sub("_c", other.code):
        raise XdslError(
            f"{type(model).__name__} runs different code in train and eval mode "
            "(e.g. auxiliary classifier outputs while training), so it cannot be cut into parts",
            hint="switch training-only outputs off (torchvision googlenet / inception_v3: aux_logits=false)",
        )
    return gm


def _scopes(n: fx.Node) -> set[str]:
    """Module paths a node runs inside: fx's recorded module stack, plus its own target's prefixes.

    The stack matters for trailing function nodes (a block's final `x + y` or `cat`), which carry
    no module target but end the block.
    """
    scopes: set[str] = set()
    for key, value in (n.meta.get("nn_module_stack") or {}).items():
        scopes.add(value[0] if isinstance(value, tuple) else str(key))
    if n.op in ("call_module", "get_attr"):
        atoms = str(n.target).split(".")
        last = len(atoms) + 1 if n.op == "call_module" else len(atoms)  # a parameter is not a module path
        scopes.update(".".join(atoms[:k]) for k in range(1, last))
    return scopes


@dataclass
class _Graph:
    """Traced graph with positions and liveness, the facts every cut decision needs."""

    gm: fx.GraphModule
    nodes: list[fx.Node] = field(init=False)
    index: dict[fx.Node, int] = field(init=False)
    last_use: dict[fx.Node, int] = field(init=False)
    module_end: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=-1) for n in self.nodes}
        self.module_end = {}
        for i, n in enumerate(self.nodes):
            for path in _scopes(n):
                self.module_end[path] = i

    @property
    def inputs(self) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "placeholder"]

    @property
    def last_step(self) -> int:
        """Index of the last node before `output`."""
        return len(self.nodes) - 2

    def live_after(self, i: int) -> list[fx.Node]:
        """Values made at or before node i and used after it (parameters are re-read, not carried)."""
        return [n for n in self.nodes[: i + 1] if n.op != "get_attr" and self.last_use[n] > i]

    def module_paths(self) -> list[str]:
        """Module paths (and every prefix) the graph runs, in graph order of their last node."""
        return sorted(self.module_end, key=lambda p: (self.module_end[p], -p.count(".")))

    def position(self, point: str) -> int | None:
        """Index of the node a cut point names: the last node run inside a module path, else a node name."""
        if point in self.module_end:
            return self.module_end[point]
        for i, n in enumerate(self.nodes):
            if n.name == point and n.op != "output":
                return i
        return None

    def valid_at(self, i: int) -> bool:
        if i < len(self.inputs) or i >= self.last_step:
            return False
        live = self.live_after(i)
        return len(live) == 1 and live[0].op != "placeholder"


def cut_points_available(model: nn.Module | fx.GraphModule, max_depth: int = 2) -> list[str]:
    """Module paths up to `max_depth` dots deep (`layer2`, `layer2.0`) where a cut is valid, in order."""
    g = _Graph(model if isinstance(model, fx.GraphModule) else trace_model(model))
    return _available(g, max_depth)


def cut_point_nodes(gm: fx.GraphModule, max_depth: int = 2) -> dict[str, str]:
    """Each valid cut point of a traced network -> the name of the fx node whose output crosses it."""
    g = _Graph(gm)
    return {p: g.nodes[g.position(p)].name for p in _available(g, max_depth)}  # type: ignore[index]


def _available(g: _Graph, max_depth: int = 2) -> list[str]:
    out = []
    for path in g.module_paths():
        if path.count(".") < max_depth:
            i = g.position(path)
            if i is not None and g.valid_at(i):
                out.append(path)
    return out


def _quote_or(names: list[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _suggest_near(g: _Graph, point: str, i: int) -> str:
    """Valid cut points near an invalid one: the enclosing blocks, else the neighbours in the graph."""
    atoms = point.split(".")
    enclosing = [".".join(atoms[:k]) for k in range(len(atoms) - 1, 0, -1)]
    good = [p for p in enclosing if (j := g.position(p)) is not None and g.valid_at(j)]
    if not good:
        available = _available(g, max_depth=3)
        before = [p for p in available if g.position(p) <= i]  # type: ignore[operator]
        after = [p for p in available if g.position(p) > i]  # type: ignore[operator]
        good = before[-1:] + after[:1]
    if not good:
        return "this network has no valid cut point near there"
    return f"cut at a block boundary such as {_quote_or(good)}"


def _check_cut(g: _Graph, point: str, i: int, prev: int, before: str, after: str) -> None:
    if i < len(g.inputs) or i <= prev:
        raise XdslError(f"cut at '{point}' leaves part '{before}' empty")
    if i >= g.last_step:
        raise XdslError(
            f"cut at '{point}' is at the end of the network: part '{after}' would be empty",
            hint=f"cut points available: {', '.join(_available(g)) or 'none'}",
        )
    live = g.live_after(i)
    used_input = [n for n in live if n.op == "placeholder"]
    if used_input:
        raise XdslError(
            f"the network input '{used_input[0].name}' is still used after the cut at '{point}', "
            f"so part '{after}' would need two inputs: {_suggest_near(g, point, i)}",
        )
    if len(live) != 1:
        names = ", ".join(n.name for n in live)
        raise XdslError(
            f"cut at '{point}' leaves {len(live)} live tensors crossing the boundary ({names}): "
            f"{_suggest_near(g, point, i)}",
            hint="a part takes one tensor; a cut inside a residual block also cuts its skip connection",
        )
    if g.index[live[0]] <= prev:
        raise XdslError(
            f"part '{before}' before the cut at '{point}' computes nothing the rest of the network uses",
        )


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_function":
        return node.target is operator.iadd or bool(node.kwargs.get("inplace", False))
    return False


def _extract(g: _Graph, start: int, stop: int, name: str) -> fx.GraphModule:
    """Nodes start..stop (inclusive) as a GraphModule over the traced network's own submodules.

    Parameter reads (`get_attr`) are repeated in every part that uses them, so a part's only input
    is the one tensor crossing the cut before it. A part whose input feeds an in-place op clones it
    first, so a sub-result shared by several paths is never overwritten.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env and n.op == "get_attr":
            env[n] = graph.get_attr(str(n.target))
        return env[n]

    if start == 0:
        for n in g.inputs:
            env[n] = graph.node_copy(n)
        start = len(g.inputs)
    else:
        (inp,) = g.live_after(start - 1)
        env[inp] = graph.placeholder(inp.name)
        mine = range(start, stop + 1)
        first_args = [u for u in inp.users if g.index[u] in mine and u.args and u.args[0] is inp]
        if any(_is_inplace(u, g.gm) for u in first_args):
            env[inp] = graph.call_method("clone", (env[inp],))
    for n in g.nodes[start : stop + 1]:
        if n.op == "get_attr":
            continue  # created where first used
        env[n] = graph.node_copy(n, arg)
    if stop == g.last_step:
        graph.output(fx.graph.map_arg(g.nodes[-1].args[0], arg))
    else:
        (out,) = g.live_after(stop)
        graph.output(env[out])
    graph.lint()
    return fx.GraphModule(g.gm, graph, name)


def cut_model(model: nn.Module, points: Sequence[str], part_names: Sequence[str]) -> dict[str, nn.Module]:
    """Split `model` after each cut point into len(points)+1 parts named `part_names`, in network order.

    A cut point is an fx module path (`layer2`: after the last node inside `layer2`) or an fx node
    name (`add_3`). Each part is a GraphModule over the model's own submodules (the same Parameter
    objects) taking and returning one tensor; composing the parts is the model. With no cut
    points the one part is `model` itself.
    """
    points, part_names = list(points), list(part_names)
    if len(part_names) != len(points) + 1:
        raise XdslError(
            f"{len(points)} cut point(s) make {len(points) + 1} parts, but {len(part_names)} part names are given"
        )
    if len(set(part_names)) != len(part_names):
        dup = next(n for n in part_names if part_names.count(n) > 1)
        raise XdslError(f"part name '{dup}' is used twice")
    if not points:
        return {part_names[0]: model}
    g = _Graph(trace_model(model))
    used_inputs = [n for n in g.inputs if n.users]
    if len(used_inputs) != 1:
        raise XdslError(f"cannot cut {type(model).__name__}: its forward takes {len(used_inputs)} inputs, not one")

    cuts: list[int] = []
    for k, point in enumerate(points):
        if point in points[:k]:
            raise XdslError(f"cut point '{point}' is given twice")
        i = g.position(point)
        if i is None:
            if point in dict(model.named_modules()):
                raise XdslError(
                    f"module '{point}' is not a step of the traced network "
                    "(forward never calls it, or it sits inside a module traced as one leaf)",
                    hint=f"cut points available: {', '.join(_available(g))}",
                )
            guess = did_you_mean(point, g.module_paths()) or \
                did_you_mean(point, [n.name for n in g.nodes if n.op != "output"])  # modules first: what people write
            available = ", ".join(_available(g))
            hint = f"did you mean '{guess}'?" if guess else f"cut points available: {available}"
            raise XdslError(f"unknown cut point '{point}' in {type(model).__name__}", hint=hint)
        if cuts and i <= cuts[-1]:
            earlier = points[k - 1]
            if i == cuts[-1]:
                raise XdslError(f"cut points '{earlier}' and '{point}' are the same place in the network")
            raise XdslError(
                f"cut points out of order: '{point}' comes before '{earlier}' in the network",
                hint="list cut points in the order the network computes them",
            )
        _check_cut(g, point, i, cuts[-1] if cuts else len(g.inputs) - 1, part_names[k], part_names[k + 1])
        cuts.append(i)

    bounds = [0] + [c + 1 for c in cuts] + [g.last_step + 1]
    cls = type(model).__name__
    return {name: _extract(g, bounds[k], bounds[k + 1] - 1, f"{cls}_{name}") for k, name in enumerate(part_names)}


def compose(parts: Sequence[nn.Module]) -> nn.Module:
    """The parts run one after another (a path `a >> b >> c`), as one module."""
    return nn.Sequential(*parts)
