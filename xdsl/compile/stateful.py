"""Stateful loss terms: a primitive that is an `nn.Module` with its own parameters and buffers (CRD's
embedding heads and memory banks).

One module per distinct term: terms are graph nodes keyed by their text (`crd(t.body, s.body, i, y)`),
so the same call written twice, in one objective or in two train blocks, is one module with one state,
as it is one computation (each sub-result once); a call with other arguments or keywords is another
module. The module belongs to the network whose objective minimises the term: that network's optimiser
updates its parameters (with the same settings), `minimize ... wrt` freezes it with its network, and
its buffers carry state from step to step. The same term minimised for two networks is an error (it
would have two optimisers). Modules live in `root.terms`, named `<primitive><k>` (`crd0`, `crd1`, ...) in
the order the spec first uses them, so checkpoints (`root.state_dict()`) hold their state and a resumed
run continues with the same memory.

A module is built at compile time from the per-sample shapes of its tensor arguments (shape inference
has run) and its constant keywords; what depends on the data (a memory bank with one row per training
sample) is sized by `bind_data` once the data is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import nn

from xdsl.compile.graph import path_node, term_leaves, term_node
from xdsl.errors import SpecError, XdslError
from xdsl.lang import ir
from xdsl.lang.flow import call_text
from xdsl.losses import primitive_spec

__all__ = ["TermModule", "stateful_terms", "build_term_modules", "bind_data", "adopt_term_sizes", "term_rows"]


@dataclass(frozen=True)
class TermModule:
    """A stateful term of the spec: its module's name under `root.terms`, the term and its owner."""

    name: str
    prim: ir.Prim
    owner: str


def _is_stateful(prim: ir.Prim) -> bool:
    spec = primitive_spec(prim)
    return bool(spec is not None and spec.stateful)


def stateful_terms(program: ir.Program) -> dict[str, TermModule]:
    """Every stateful term (by graph node) with its module name and owner; two owners are an error."""
    found: dict[str, TermModule] = {}
    counts: dict[str, int] = {}
    for stage in program.stages:
        for net, term in stage.objectives.items():
            for prim in term_leaves(term):
                if not _is_stateful(prim):
                    continue
                node = term_node(prim)
                known = found.get(node)
                if known is None:
                    k = counts.get(prim.name, 0)
                    counts[prim.name] = k + 1
                    found[node] = TermModule(f"{prim.name}{k}", prim, net)
                elif known.owner != net:
                    raise SpecError(
                        f"{prim.name}() has its own parameters and state, so one network owns it, but this "
                        f"{prim.name}(...) is minimised for '{known.owner}' and for '{net}'", prim.pos,
                        "give each network its own term (different arguments), or minimise it for one of them")
    return found


def _arg_shape(arg: Any, shapes: dict[str, torch.Size]) -> tuple[int, ...] | None:
    if isinstance(arg, ir.Path):
        return tuple(shapes[path_node(arg)][1:])
    if isinstance(arg, ir.Ensemble):
        return tuple(shapes[path_node(arg.members[0])][1:])
    return None


def build_term_modules(program: ir.Program, graph: nx.DiGraph, shapes: dict[str, torch.Size],
                       device: str) -> nn.ModuleDict:
    """One module per stateful term, built from its arguments' per-sample shapes and its keywords; the
    graph's term nodes get `module` (the name under `root.terms`) and `owner`."""
    modules = nn.ModuleDict()
    for node, term in stateful_terms(program).items():
        spec = primitive_spec(term.prim)
        kwargs = {}
        for param, arg in zip(spec.params, term.prim.args):
            kwargs[param.name] = _arg_shape(arg, shapes) if param.kind in ("logits", "features") else arg
        try:
            with torch.device(device):
                modules[term.name] = spec.fn(**kwargs)
        except XdslError as e:
            raise SpecError(f"{term.prim.name}(): {e.message}", term.prim.pos, e.hint) from None
        graph.nodes[node]["module"] = term.name
        graph.nodes[node]["owner"] = term.owner
    return modules


def bind_data(terms: dict[str, nn.Module], labels: torch.Tensor, seed: int) -> None:
    """Size the terms' per-sample state for a training set with these labels (one per sample)."""
    for module in terms.values():
        bind = getattr(module, "bind_data", None)
        if callable(bind):
            bind(labels, seed)


def adopt_term_sizes(terms: dict[str, nn.Module], modules: dict[str, Any]) -> None:
    """Load the terms' state from a checkpoint's `modules` where it is there (`xdsl eval`: the modules were built
    before the data is known, so data-sized buffers take the checkpoint's sizes); the rest is checked after."""
    for name, module in terms.items():
        prefix = f"terms.{name}."
        state = {k[len(prefix):]: v for k, v in modules.items() if k.startswith(prefix)}
        if state:
            module.load_state_dict(state, strict=False)


def term_rows(program: ir.Program, terms: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """`xdsl compile`'s view: each stateful term's module, owner, parameter count and buffers."""
    rows = []
    for term in stateful_terms(program).values():
        module = terms[term.name]
        spec = primitive_spec(term.prim)
        args = {p.name: a for p, a in zip(spec.params, term.prim.args)}
        rows.append({"name": term.name, "term": call_text(spec, args, program.parts), "owner": term.owner,
                     "params": sum(p.numel() for p in module.parameters()),
                     "buffers": {n: list(v.shape) for n, v in module.state_dict().items()
                                 if n not in dict(module.named_parameters())}})
    return rows
