"""Render a compiled graph as DOT, Mermaid, or an image (graphviz `dot` if present, else matplotlib)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import networkx as nx

__all__ = ["to_dot", "to_mermaid", "render_image"]

_SHAPES = {"input": "ellipse", "labels": "ellipse", "part": "box", "adapter": "box", "ensemble": "diamond",
           "term": "note", "objective": "doubleoctagon"}
_COLORS = {"input": "#dddddd", "labels": "#dddddd", "part": "#cfe2ff", "adapter": "#ffe5b4",
           "ensemble": "#e2d4f0", "term": "#d1f0d1", "objective": "#f8d7da"}


def _label(g: nx.DiGraph, node: str) -> str:
    data = g.nodes[node]
    label = data.get("label", node)
    if data.get("kind") == "term":
        label = node
    if "shape" in data:
        label += f"\\n{tuple(data['shape'][1:])}"
    return label


def to_dot(g: nx.DiGraph, only_used: bool = True) -> str:
    """Graphviz DOT text: parts as boxes labelled with their output shape, terms, objectives."""
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    lines = ["digraph xdsl {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10, style=filled];']
    for n, data in g.nodes(data=True):
        if only_used and data.get("kind") in ("part", "adapter") and g.out_degree(n) == 0 and not any(
                True for _ in g.predecessors(n)):
            continue
        kind = data.get("kind", "term")
        label = _label(g, n).replace('"', '\\"')
        lines.append(f'  {ids[n]} [label="{label}", shape={_SHAPES.get(kind, "box")}, '
                     f'fillcolor="{_COLORS.get(kind, "#ffffff")}"];')
    for a, b in g.edges:
        lines.append(f"  {ids[a]} -> {ids[b]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(g: nx.DiGraph) -> str:
    """Mermaid flowchart text (renders in GitHub markdown)."""
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    lines = ["flowchart LR"]
    for n in g.nodes:
        label = _label(g, n).replace("\\n", " ").replace('"', "'")
        lines.append(f'  {ids[n]}["{label}"]')
    for a, b in g.edges:
        lines.append(f"  {ids[a]} --> {ids[b]}")
    return "\n".join(lines) + "\n"


def render_image(g: nx.DiGraph, out: Path, fmt: str) -> Path:
    """Write svg/png: with graphviz's `dot` when installed, otherwise a matplotlib layered drawing."""
    dot = shutil.which("dot")
    if dot:
        subprocess.run([dot, f"-T{fmt}", "-o", str(out)], input=to_dot(g).encode(), check=True)
        return out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = {n: 0 for n in g.nodes}
    for n in nx.topological_sort(g):
        for s in g.successors(n):
            layers[s] = max(layers[s], layers[n] + 1)
    for n, layer in layers.items():
        g.nodes[n]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer")
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * (max(layers.values()) + 1)), max(5, 0.45 * len(g))))
    colors = [_COLORS.get(g.nodes[n].get("kind"), "#ffffff") for n in g.nodes]
    nx.draw_networkx(g, pos, ax=ax, node_color=colors, node_size=900, font_size=6, arrows=True,
                     labels={n: _label(g, n).replace("\\n", "\n") for n in g.nodes})
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, format=fmt)
    plt.close(fig)
    return out
