"""Graph -> torch.fx GraphModules that compute objectives: generated once, run every step.

For a set of networks `owners` (one network under `order alternating`, all of them under
`simultaneous`), the generated module computes, in topological order, every node the
objectives need, exactly once. Nodes that depend on no module owned by `owners` cannot
receive gradient from these objectives, so they are computed with autograd off (the
teacher's forward in KD, a peer's forward in DML). `print(lowered.module.code)` shows it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from xdsl.compile.graph import module_target, objective_node, term_leaves, term_node
from xdsl.lang import ir
from xdsl.losses import LOSSES

__all__ = ["Lowered", "lower", "ensemble_logits", "path_module"]

_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def ensemble_logits(*logits: torch.Tensor) -> torch.Tensor:
    """log(mean_i softmax(z_i)): logits whose softmax is the members' averaged prediction."""
    stacked = torch.stack([F.log_softmax(z, dim=-1) for z in logits])  # (M, B, K)
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


@dataclass
class Lowered:
    """A generated module `module(x, y) -> (objectives, terms)` and what its outputs are."""

    module: fx.GraphModule
    networks: tuple[str, ...]   # objectives[i] belongs to networks[i]
    terms: tuple[str, ...]      # terms[j] is the text of the j-th primitive term

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
          trainable: set[str]) -> Lowered:
    """Generate the module computing `networks`' objectives of `stage` (gradients only into `trainable`)."""
    objectives = [objective_node(stage.name, n) for n in networks]
    needed: set[str] = set()
    for obj in objectives:
        needed |= nx.ancestors(g, obj)
    owners = set(networks) & trainable
    order = [n for n in nx.topological_sort(g) if n in needed]
    path_nodes = [n for n in _first_use_order(g, stage.name, networks) if n in needed]
    no_grad = [n for n in path_nodes if not _needs_grad(g, n, owners)]
    with_grad = [n for n in path_nodes if n not in set(no_grad)]

    graph = fx.Graph()
    env: dict[str, fx.Node] = {"x": graph.placeholder("x"), "y": graph.placeholder("y")}

    def emit_path(node: str) -> None:
        data = g.nodes[node]
        (parent,) = g.predecessors(node)
        env[node] = graph.call_module(data["target"], (env[parent],))

    if no_grad:
        graph.call_function(torch._C._set_grad_enabled, (False,))
        for n in no_grad:
            emit_path(n)
        graph.call_function(torch._C._set_grad_enabled, (True,))
    for n in with_grad:
        emit_path(n)
    for n in order:
        data = g.nodes[n]
        if data["kind"] == "ensemble":
            members = [env[str(m)] for m in data["ensemble"].members]
            env[n] = graph.call_function(ensemble_logits, tuple(members))

    term_names: list[str] = []
    term_values: dict[str, fx.Node] = {}

    def emit_term(term: ir.Term):
        if isinstance(term, ir.Const):
            return term.value
        if isinstance(term, ir.Arith):
            return graph.call_function(_ARITH[term.op], (emit_term(term.left), emit_term(term.right)))
        key = term_node(term)
        if key not in term_values:
            args = tuple(env[str(a)] if isinstance(a, ir.Path | ir.Ensemble) else
                         env["y"] if isinstance(a, ir.Labels) else a for a in term.args)
            term_values[key] = graph.call_function(LOSSES[term.name].fn, args)
            term_names.append(key)
        return term_values[key]

    outputs = []
    for net in networks:
        value = emit_term(g.nodes[objective_node(stage.name, net)]["term"])
        if not isinstance(value, fx.Node):  # a constant objective cannot be trained
            raise ValueError(f"objective of {net} is constant")
        outputs.append(value)
    graph.output((tuple(outputs), tuple(term_values[k] for k in term_names)))
    graph.lint()
    return Lowered(fx.GraphModule(root, graph, class_name=f"Objective_{stage.name}"), tuple(networks),
                   tuple(term_names))


def path_module(root: nn.Module, path: ir.Path) -> fx.GraphModule:
    """A module computing one path's output from x (evaluation, `Experiment.forward`)."""
    graph = fx.Graph()
    value = graph.placeholder("x")
    for step in path.steps:
        value = graph.call_module(module_target(step), (value,))
    graph.output(value)
    return fx.GraphModule(root, graph, class_name="Path")

