"""ir.Program -> networkx DiGraph of everything a stage computes.

Nodes are keyed by what they compute, so a sub-result used by several loss terms
(`net1.up` on the batch x) is one node, computed once:

    x ──net1.up──> [net1.up] ──net2.down──> [net1.up >> net2.down] ──> kl(...) ──> objective xml/net1
"""

from __future__ import annotations

import networkx as nx

from xdsl.lang import ir
from xdsl.lang.ir import term_leaves

__all__ = ["build_graph", "path_node", "term_node", "objective_node", "module_target", "term_leaves"]


def module_target(step: ir.Step) -> str:
    """The attribute path of a step's module inside the compiled root module."""
    if isinstance(step, ir.AdapterStep):
        return f"adapters.{step.name}"
    return f"parts.{step.net}.{step.part}"


def path_node(path: ir.Path) -> str:
    return str(path)


def term_node(prim: ir.Prim) -> str:
    return str(prim)


def objective_node(stage: str, net: str) -> str:
    return f"objective {stage}/{net}"


def _add_path(g: nx.DiGraph, path: ir.Path, program: ir.Program) -> str:
    """Add a path and all its prefixes; return the node of the whole path."""
    parent = "x"
    for i, step in enumerate(path.steps):
        prefix = path.prefix(i + 1)
        node = path_node(prefix)
        if node not in g:
            if isinstance(step, ir.AdapterStep):
                owners, kind = program.adapters[step.name].owners, "adapter"
            else:
                owners, kind = (step.net,), "part"
            g.add_node(node, kind=kind, path=prefix, step=step, owner=owners[0], owners=owners,
                       target=module_target(step),
                       label=str(step))
            g.add_edge(parent, node)
        parent = node
    return parent


def _add_arg(g: nx.DiGraph, arg, program: ir.Program) -> str | None:
    if isinstance(arg, ir.Path):
        return _add_path(g, arg, program)
    if isinstance(arg, ir.Labels):
        return "y"
    if isinstance(arg, ir.Indices):
        if "i" not in g:
            g.add_node("i", kind="indices", label="i")
        return "i"
    if isinstance(arg, ir.Ensemble):
        node = str(arg)
        if node not in g:
            g.add_node(node, kind="ensemble", ensemble=arg, label="ensemble")
            for member in arg.members:
                g.add_edge(_add_path(g, member, program), node)
        return node
    return None


def build_graph(program: ir.Program) -> nx.DiGraph:
    """One DiGraph for the whole spec: every stage's objectives plus every evaluated path."""
    g = nx.DiGraph()
    g.add_node("x", kind="input", label="x")
    g.add_node("y", kind="labels", label="y")
    for stage in program.stages:
        for net, term in stage.objectives.items():
            obj = objective_node(stage.name, net)
            g.add_node(obj, kind="objective", stage=stage.name, network=net, term=term, label=f"{stage.name}/{net}")
            for prim in term_leaves(term):
                node = term_node(prim)
                if node not in g:
                    g.add_node(node, kind="term", prim=prim, label=prim.name)
                    for position, arg in enumerate(prim.args):
                        src = _add_arg(g, arg, program)
                        if src is not None:
                            g.add_edge(src, node, position=position)
                g.add_edge(node, obj)
    for item in program.evaluate:
        for arg in item.args:
            if isinstance(arg, ir.Path) and not any(getattr(s, "epoch", None) is not None for s in arg.steps):
                _add_path(g, arg, program)
    return g
