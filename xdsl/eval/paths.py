"""Paths that evaluate items name: snapshots (`net1@10`), labels, and the Xross combinations.

Imports nothing above `lang` at run time: the checker reads the evaluate items, which use this.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx

from xdsl.lang import ir

if TYPE_CHECKING:
    from xdsl.experiment import Experiment

__all__ = ["Unavailable", "Combo", "split_net", "path_label", "xross_combinations"]


class Unavailable(Exception):
    """A path or item that cannot be evaluated (missing snapshot, shapes that do not join); says why."""


def split_net(name: str) -> tuple[str, int | None]:
    """`"net1@10"` -> ("net1", 10): evaluate items name snapshots this way."""
    if "@" in name:
        net, epoch = name.split("@", 1)
        return net, int(epoch)
    return name, None


def path_label(program: ir.Program, path: ir.Path) -> str:
    """A network's own full chain reads as its name (`net1`, `net1@3`); any other path as its text."""
    steps = path.steps
    if steps and all(isinstance(s, ir.PartStep) for s in steps):
        first: ir.PartStep = steps[0]  # type: ignore[assignment]
        if path == program.natural_path(first.net, epoch=first.epoch):
            return first.net if first.epoch is None else f"{first.net}@{first.epoch}"
    return str(path)


def _bridges(graph: nx.DiGraph, stage: str | None = None) -> dict[tuple[str, int, str], tuple[str, ...]]:
    """Adapter chains the spec uses between net a's part i and net b's part i+1: (a, i, b) -> adapters.

    Chains the current train block `stage` trains come first: after a block, its own adapters are the
    trained link between the parts, not another block's.
    """
    used: set[str] = set()
    if stage is not None:
        for node, data in graph.nodes(data=True):
            if data.get("kind") == "objective" and data.get("stage") == stage:
                used |= nx.ancestors(graph, node)
    ordered = sorted(graph.nodes(data=True), key=lambda item: item[0] not in used)
    found: dict[tuple[str, int, str], tuple[str, ...]] = {}
    for _, data in ordered:
        path = data.get("path")
        if isinstance(path, ir.Path):
            _add_bridges(path.steps, found)
    return found


def _add_bridges(steps: tuple[ir.Step, ...], found: dict[tuple[str, int, str], tuple[str, ...]]) -> None:
    for j, step in enumerate(steps):
        if not isinstance(step, ir.PartStep):
            continue
        k = j + 1
        while k < len(steps) and isinstance(steps[k], ir.AdapterStep):
            k += 1
        if k < len(steps) and k > j + 1:
            nxt = steps[k]
            if isinstance(nxt, ir.PartStep) and nxt.index == step.index + 1:
                chain = tuple(s.name for s in steps[j + 1:k])  # type: ignore[union-attr]
                found.setdefault((step.net, step.index, nxt.net), chain)


def _shape(graph: nx.DiGraph, path: ir.Path) -> tuple[int, ...] | None:
    node = str(path)
    if node in graph and graph.nodes[node].get("shape") is not None:
        return tuple(graph.nodes[node]["shape"])[1:]
    return None


@dataclass
class Combo:
    """One row of a Xross table: the network of each part, the joined path (None when it cannot join)."""

    networks: list[str]          # as given, e.g. "net1@10"
    path: ir.Path | None
    adapters: list[str]
    status: str = "ok"


def xross_combinations(exp: Experiment, networks: Sequence[str]) -> tuple[list[str], list[Combo]]:
    """Every way to pick one network per part (K^P), joined through the spec's adapters where shapes differ.

    Returns the part names and one combination per row, first part varying slowest (the XML paper's order).
    """
    program = exp.program
    parsed = [split_net(n) for n in networks]
    counts = {len(program.parts[n]) for n, _ in parsed}
    if len(counts) != 1:
        raise Unavailable("xross needs networks cut into the same number of parts, got "
                          + ", ".join(f"{n}: {len(program.parts[n])}" for n, _ in parsed))
    (n_parts,) = counts
    first = program.parts[parsed[0][0]]
    same_names = all(program.parts[n] == first for n, _ in parsed)
    part_names = list(first) if same_names else [f"part{i + 1}" for i in range(n_parts)]
    bridges = _bridges(exp.graph, exp.stage.name if exp.stage is not None else None)
    combos = [_combo(exp, bridges, [parsed[k] for k in pick], [networks[k] for k in pick])
              for pick in itertools.product(range(len(parsed)), repeat=n_parts)]
    return part_names, combos


def _combo(exp: Experiment, bridges: dict[tuple[str, int, str], tuple[str, ...]],
           picked: list[tuple[str, int | None]], names: list[str]) -> Combo:
    """Part i from network picked[i], linked by the spec's adapter chain where the networks change."""
    program, graph = exp.program, exp.graph
    steps: list[ir.Step] = []
    adapters: list[str] = []
    status = "ok"
    for i, (net, epoch) in enumerate(picked):
        prev_net = picked[i - 1][0] if i > 0 else net
        if prev_net != net:
            chain = bridges.get((prev_net, i - 1, net))
            if chain and all(a in exp.compiled.root.adapters for a in chain):
                steps += [ir.AdapterStep(a) for a in chain]
                adapters += chain
            else:
                out = _shape(graph, program.natural_path(prev_net, i))
                want = _shape(graph, program.natural_path(net, i))
                if out is not None and want is not None and out != want:
                    status = (f"n/a (shapes {out} -> {want}: no adapter joins "
                              f"{prev_net}.{program.parts[prev_net][i - 1]} to {net}.{program.parts[net][i]})")
        steps.append(ir.PartStep(net, program.parts[net][i], i, epoch))
    return Combo(names, ir.Path(tuple(steps)) if status == "ok" else None, adapters, status)
