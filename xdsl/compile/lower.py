"""Graph -> torch.fx GraphModules that compute objectives: generated once, run every step.

For a set of networks `owners` (one network under `order alternating`, all of them under
`simultaneous`), the generated module computes every node the objectives need exactly once,
in the order the objectives first use them. Nodes that depend on no module owned by `owners` cannot
receive gradient from these objectives, so they are computed with autograd off (the
teacher's forward in KD, a peer's forward in DML). `print(lowered.module.code)` shows it.

`separable=True` generates each objective so that it is differentiable only in its own network's
parameters: a part of another network that must pass gradient through (`net1.up >> net2.down` in
net1's objective) runs with its weights detached, and a sub-result that two objectives need with
different gradients is computed once per objective (extra calls keep BatchNorm's running
statistics on throw-away copies, so the buffers are as in one shared forward). One backward of the
sum of the objectives then gives every network its own objective's gradient. Why: AOTAutograd
(torch.compile) compiles one backward that computes the gradient of every differentiable input,
so without this a compiled step also pays for the peers' weight gradients that
`backward(inputs=...)` would discard, and each per-objective backward through a shared compiled
forward recomputes the whole joint backward.

Schedules (`min(epoch / 20, 1) * dkd(...)`, `kl(t, s, T=1 + 3 * (1 - epoch / epochs))`) read the
module's third input `clock`, a float tensor [epoch, epochs, step]: their values change every step
while the compiled graph stays the same (a Python number would be specialised and recompiled).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from xdsl.compile.graph import module_target, objective_node, term_leaves, term_node
from xdsl.lang import ir
from xdsl.losses import primitive_spec

__all__ = ["Lowered", "lower", "ensemble_logits", "mean_logits", "emit_path", "path_module", "paths_module",
           "call_detached"]

_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _min2(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.minimum(a, b)
    if isinstance(a, torch.Tensor):
        return a.clamp(max=b)
    return b.clamp(max=a) if isinstance(b, torch.Tensor) else min(a, b)


def _max2(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.maximum(a, b)
    if isinstance(a, torch.Tensor):
        return a.clamp(min=b)
    return b.clamp(min=a) if isinstance(b, torch.Tensor) else max(a, b)


def schedule_min(*xs):
    """`min(...)` of a schedule: numbers and 0-dim tensors (at least one tensor), a 0-dim tensor."""
    out = xs[0]
    for x in xs[1:]:
        out = _min2(out, x)
    return out


def schedule_max(*xs):
    """`max(...)` of a schedule (see `schedule_min`)."""
    out = xs[0]
    for x in xs[1:]:
        out = _max2(out, x)
    return out


_FUNCS = {"min": schedule_min, "max": schedule_max, "exp": torch.exp, "cos": torch.cos}


def ensemble_logits(*logits: torch.Tensor) -> torch.Tensor:
    """log(mean_i softmax(z_i)): logits whose softmax is the members' averaged prediction."""
    stacked = torch.stack([F.log_softmax(z, dim=-1) for z in logits])  # (M, B, K)
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


def mean_logits(*logits: torch.Tensor) -> torch.Tensor:
    """mean_i z_i: the logit-averaged ensemble (`ensemble(..., by=logits)`), sharper than the softmax average."""
    return torch.stack(logits).mean(dim=0)


_ENSEMBLE_FNS = {"probs": ensemble_logits, "logits": mean_logits}


def call_detached(module: nn.Module, x: torch.Tensor, keep_buffers: bool) -> torch.Tensor:
    """module(x) with its parameters detached: gradient reaches x but not the module's weights.

    keep_buffers=False runs on copies of the buffers, so a second call on an input that another
    call already saw leaves BatchNorm's running statistics as one call does.
    """
    tensors: dict[str, torch.Tensor] = {name: p.detach() for name, p in module.named_parameters()}
    if not keep_buffers:
        tensors.update({name: b.clone() for name, b in module.named_buffers()})
    return torch.func.functional_call(module, tensors, (x,))


def _call_copy(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) on copies of its buffers (a repeated call: running statistics already updated)."""
    return torch.func.functional_call(module, {name: b.clone() for name, b in module.named_buffers()}, (x,))


@dataclass
class Lowered:
    """A generated module `module(x, y, clock=None[, i]) -> (objectives, terms)` and what its outputs are."""

    module: fx.GraphModule
    networks: tuple[str, ...]   # objectives[i] belongs to networks[i]
    terms: tuple[str, ...]      # terms[j] is the text of the j-th primitive term
    separable: bool = False     # objectives[i] is differentiable only in networks[i]'s parameters
    uses_clock: bool = False    # the objectives read `clock` ([epoch, epochs, step]); else it may be None
    uses_index: bool = False    # a stateful term reads the sample indices: module(x, y, clock, i)

    def __repr__(self) -> str:
        return f"Lowered(networks={self.networks}, terms={len(self.terms)})\n{self.module.code}"


def _needs_grad(g: nx.DiGraph, node: str, owners: set[str]) -> bool:
    path: ir.Path = g.nodes[node]["path"]
    return any(owner in owners for i in range(len(path.steps))
               for owner in g.nodes[str(path.prefix(i + 1))]["owners"])


def _first_use_order(g: nx.DiGraph, stage: str, networks: tuple[str, ...]) -> list[str]:
    """Part/adapter nodes in the order the objectives' terms first use them, prefixes first.

    This is the order a person writes the step in (s.up, s.down(s.up), t.down(s.up), ...), and it
    is fixed by the spec text rather than by the graph's insertion order. It matters beyond
    readability: BatchNorm running statistics are updated once per forward call, so two calls of one
    part on different inputs leave different buffers depending on which comes first.
    """
    seen: dict[str, None] = {}

    def visit(path: ir.Path) -> None:
        for i in range(len(path.steps)):
            seen.setdefault(str(path.prefix(i + 1)))

    for net in networks:
        for prim in term_leaves(g.nodes[objective_node(stage, net)]["term"]):
            for arg in prim.args:
                if isinstance(arg, ir.Path):
                    visit(arg)
                elif isinstance(arg, ir.Ensemble):
                    for member in arg.members:
                        visit(member)
    return [n for n in seen if n in g and g.nodes[n]["kind"] in ("part", "adapter")]


def lower(g: nx.DiGraph, root: nn.Module, stage: ir.Stage, networks: tuple[str, ...],
          trainable: set[str], *, separable: bool = False) -> Lowered:
    """Generate the module computing `networks`' objectives of `stage` (gradients only into `trainable`)."""
    objectives = [objective_node(stage.name, n) for n in networks]
    needed: set[str] = set()
    for obj in objectives:
        needed |= nx.ancestors(g, obj)
    owners = set(networks) & trainable
    path_nodes = [n for n in _first_use_order(g, stage.name, networks) if n in needed]
    no_grad = [n for n in path_nodes if not _needs_grad(g, n, owners)]
    with_grad = [n for n in path_nodes if n not in set(no_grad)]

    graph = fx.Graph()
    env = _inputs(graph, g, stage, networks)
    if no_grad:
        graph.call_function(torch._C._set_grad_enabled, (False,))
        for n in no_grad:
            emit_path(graph, env, g.nodes[n]["path"])
        graph.call_function(torch._C._set_grad_enabled, (True,))
    if separable:
        value = _variants(g, graph, env, networks, trainable)
    else:
        for n in with_grad:
            emit_path(graph, env, g.nodes[n]["path"])

        def value(node: str, net: str) -> fx.Node:
            return env[node]

    ensembles: dict[tuple, fx.Node] = {}

    def emit_arg(arg, net: str):
        if isinstance(arg, ir.Path):
            return value(str(arg), net)
        if isinstance(arg, ir.Ensemble):
            members = tuple(value(str(m), net) for m in arg.members)
            key = (arg.by, *members)
            if key not in ensembles:
                ensembles[key] = graph.call_function(_ENSEMBLE_FNS[arg.by], members)
            return ensembles[key]
        if isinstance(arg, ir.Clock | ir.Func | ir.Arith):  # a schedule as a keyword: a 0-dim tensor
            return emit_term(arg, net)
        if isinstance(arg, ir.Indices):
            return env["i"]
        return env["y"] if isinstance(arg, ir.Labels) else arg

    term_names: list[str] = []     # each primitive term's text once, for logging
    term_reported: dict[str, fx.Node] = {}
    term_values: dict[tuple, fx.Node] = {}
    clocks: dict[str, fx.Node] = {}

    def emit_term(term: ir.Term, net: str):
        if isinstance(term, ir.Const):
            return term.value
        if isinstance(term, ir.Clock):
            if term.name not in clocks:
                clocks[term.name] = graph.call_function(operator.getitem, (env["clock"], ir.CLOCKS.index(term.name)))
            return clocks[term.name]
        if isinstance(term, ir.Func):
            return graph.call_function(_FUNCS[term.name], tuple(emit_term(a, net) for a in term.args))
        if isinstance(term, ir.Arith):
            return graph.call_function(_ARITH[term.op], (emit_term(term.left, net), emit_term(term.right, net)))
        args = tuple(emit_arg(a, net) for a in term.args)
        key = (term_node(term), tuple(a for a in args if isinstance(a, fx.Node)))  # constants are in the text
        if key not in term_values:
            term_values[key] = _emit_primitive(graph, g, term, args)
            if key[0] not in term_reported:
                term_reported[key[0]] = term_values[key]
                term_names.append(key[0])
        return term_values[key]

    outputs = []
    for net in networks:
        out = emit_term(g.nodes[objective_node(stage.name, net)]["term"], net)
        if not isinstance(out, fx.Node):  # a constant objective cannot be trained
            raise ValueError(f"objective of {net} is constant")
        outputs.append(out)
    graph.output((tuple(outputs), tuple(term_reported[k] for k in term_names)))
    graph.lint()
    return Lowered(fx.GraphModule(root, graph, class_name=f"Objective_{stage.name}"), tuple(networks),
                   tuple(term_names), separable, bool(clocks), "i" in env)


def _inputs(graph: fx.Graph, g: nx.DiGraph, stage: ir.Stage, networks: tuple[str, ...]) -> dict[str, fx.Node]:
    """The placeholders `x, y, clock=None`, and `i=None` when a term reads the sample indices."""
    env = {"x": graph.placeholder("x"), "y": graph.placeholder("y"),
           "clock": graph.placeholder("clock", default_value=None)}
    if any(isinstance(a, ir.Indices) for net in networks
           for prim in term_leaves(g.nodes[objective_node(stage.name, net)]["term"]) for a in prim.args):
        env["i"] = graph.placeholder("i", default_value=None)
    return env


def _emit_primitive(graph: fx.Graph, g: nx.DiGraph, term: ir.Prim, args: tuple) -> fx.Node:
    """A primitive's call: a function of its arguments, or a stateful term's module (`root.terms`)
    called on its tensor arguments (paths, labels, indices; its constants built the module)."""
    spec = primitive_spec(term)
    if not spec.stateful:
        return graph.call_function(spec.fn, *spec.split_args(args))
    tensors = tuple(a for p, a in zip(spec.params, args) if p.kind not in ("number", "bool"))
    return graph.call_module(f"terms.{g.nodes[term_node(term)]['module']}", tensors)


def _variants(g: nx.DiGraph, graph: fx.Graph, env: dict[str, fx.Node], networks: tuple[str, ...],
              trainable: set[str]):
    """`value(node, net)`: the node as net's objective must see it (see the module docstring).

    A variant is keyed by which steps of the path net owns. The first call of a node's module
    updates its buffers; later variants of the same node run on buffer copies.
    """
    variants: dict[tuple[str, tuple[bool, ...]], fx.Node] = {}
    detached: dict[fx.Node, fx.Node] = {}
    called: set[str] = set()

    def owned_steps(node: str, net: str) -> tuple[bool, ...]:
        mine = {net} & trainable
        path: ir.Path = g.nodes[node]["path"]
        return tuple(any(o in mine for o in g.nodes[str(path.prefix(i + 1))]["owners"])
                     for i in range(len(path.steps)))

    def value(node: str, net: str) -> fx.Node:
        if node in env:  # x, y, and sub-results no objective differentiates
            return env[node]
        sig = owned_steps(node, net)
        if not any(sig):  # another objective differentiates it; this one only reads it
            other = next(m for m in networks if any(owned_steps(node, m)))
            shared = value(node, other)
            if shared not in detached:
                detached[shared] = graph.call_method("detach", (shared,))
            return detached[shared]
        key = (node, sig)
        if key not in variants:
            data = g.nodes[node]
            (parent,) = g.predecessors(node)
            x = value(parent, net)
            first = node not in called
            called.add(node)
            if sig[-1] and first:
                variants[key] = graph.call_module(data["target"], (x,))
            elif sig[-1]:
                variants[key] = graph.call_function(_call_copy, (graph.get_attr(data["target"]), x))
            else:
                variants[key] = graph.call_function(call_detached, (graph.get_attr(data["target"]), x, first))
        return variants[key]

    return value


def emit_path(graph: fx.Graph, env: dict[str, fx.Node], path: ir.Path,
              target: Callable[[ir.Step], str] = module_target) -> fx.Node:
    """Emit the module calls of `path` into `graph`, each prefix once: `env` maps a prefix's text
    (`"x"` for the empty one) to its node, so paths that share a prefix share its computation.

    This is the one way xdsl runs a path: objectives (`lower`), `Experiment.forward` and evaluation.
    """
    node = env["x"]
    for i, step in enumerate(path.steps):
        key = str(path.prefix(i + 1))
        if key not in env:
            env[key] = graph.call_module(target(step), (node,))
        node = env[key]
    return node


def paths_module(root: nn.Module, paths: Sequence[ir.Path],
                 target: Callable[[ir.Step], str] = module_target) -> fx.GraphModule:
    """A module computing the outputs of several paths from x (a tuple), each shared prefix once.

    `target(step)` names a step's module inside `root` (evaluation maps epoch snapshots elsewhere).
    """
    graph = fx.Graph()
    env = {"x": graph.placeholder("x")}
    graph.output(tuple(emit_path(graph, env, p, target) for p in paths))
    return fx.GraphModule(root, graph, class_name="Paths")


def path_module(root: nn.Module, path: ir.Path) -> fx.GraphModule:
    """A module computing one path's output from x (`Experiment.forward`)."""
    graph = fx.Graph()
    graph.output(emit_path(graph, {"x": graph.placeholder("x")}, path))
    return fx.GraphModule(root, graph, class_name="Path")
