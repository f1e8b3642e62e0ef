"""`xdsl graph`: a picture that explains the experiment, one cluster per train block.

Inside a block every network is a coloured cluster of the parts it runs (a crossed path such as
`net1.up >> net2.down` shows net2's `down` inside net2's cluster, fed from net1's `up`); edges that
carry data from one network into another (directly or through an adapter) are drawn thick and red;
an input a loss term detaches (a distillation target, no gradient through it) is a dashed edge; each
term feeds the objectives that use it with its weight on the edge; each objective is labelled and
coloured with the network that owns it (`minimize ... wrt net`), and a network the block does not train
(a frozen teacher) is grey.

The same description is rendered as Graphviz DOT (drawn to SVG/PNG by Graphviz's `dot` when it is
installed) or as Mermaid text (rendered by GitHub and most Markdown viewers).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from xdsl.compile.graph import path_node, term_leaves, term_node
from xdsl.errors import XdslError
from xdsl.lang import ir
from xdsl.losses import primitive_spec

__all__ = ["BlockGraph", "block_graphs", "to_dot", "to_mermaid", "render", "term_weights", "detached"]

_PALETTE = ["#cfe2ff", "#ffe0b2", "#d1f0d1", "#f8d7da", "#e2d4f0", "#fff3bf", "#d0f4f7", "#f2d7c9"]
_BORDER = ["#3d7bd9", "#e08600", "#2f9e44", "#c92a2a", "#7048e8", "#e0b000", "#0c8599", "#a0522d"]
_FROZEN = "#e9ecef"
_CROSS = "#d6336c"
_TARGET_PARAMS = ("target", "teacher", "teacher_feat")
_LEGEND = ("thick red edge: data from one network into another; dashed edge: a detached loss target (no "
           "gradient through it); ×w: the term's weight in the objective; grey network: frozen in this block")


@dataclass
class Node:
    id: str
    label: str
    kind: str                  # input | labels | part | adapter | ensemble | term | objective
    network: str | None = None  # the cluster a part belongs to / the owner of an objective


@dataclass
class Edge:
    src: str
    dst: str
    crossed: bool = False      # data from one network into another
    detached: bool = False     # a loss target: no gradient flows back through this edge
    label: str = ""            # a term's weight in the objective


@dataclass
class BlockGraph:
    """What one train block computes, ready to draw."""

    name: str
    trained: list[str]
    networks: list[str]
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)


# ---- what to draw ----

def _const(term: ir.Term) -> float | None:
    """The value of a term without loss primitives (`2 * len(T)` after unrolling), else None."""
    if isinstance(term, ir.Const):
        return float(term.value)
    if isinstance(term, ir.Arith):
        a, b = _const(term.left), _const(term.right)
        if a is None or b is None:
            return None
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else float("nan")}[term.op]
    return None


def term_weights(term: ir.Term) -> dict[str, float | None]:
    """Coefficient of every primitive in an objective that is linear in them (None where it is not)."""
    out: dict[str, float | None] = {}

    def add(prim: ir.Prim, k: float | None) -> None:
        key = term_node(prim)
        out[key] = None if k is None or (key in out and out[key] is None) else out.get(key, 0.0) + k

    def walk(t: ir.Term, k: float | None) -> None:
        if isinstance(t, ir.Prim):
            add(t, k)
        elif isinstance(t, ir.Arith):
            left_c, right_c = _const(t.left), _const(t.right)
            if t.op in "+-":
                walk(t.left, k)
                walk(t.right, None if k is None else (k if t.op == "+" else -k))
            elif t.op == "*" and (left_c is not None or right_c is not None):
                c, other = (left_c, t.right) if left_c is not None else (right_c, t.left)
                walk(other, None if k is None else k * c)
            elif t.op == "/" and right_c:
                walk(t.left, None if k is None else k / right_c)
            else:  # a product or quotient of two losses: no single weight
                for prim in term_leaves(t):
                    add(prim, None)

    walk(term, 1.0)
    return out


def detached(prim: ir.Prim, position: int) -> bool:
    """Whether argument `position` of a primitive is a target the loss detaches (no gradient into it)."""
    spec = primitive_spec(prim)
    if spec is None or position >= len(spec.params) or spec.params[position].kind not in ("logits", "features"):
        return False  # labels and constants are not a gradient path either way
    args = {p.name: a for p, a in zip(spec.params, prim.args)}
    flows = getattr(spec, "carries_gradient", None)
    if flows is not None:  # the primitive declares which of its arguments carry gradient
        return not flows(spec.params[position].name, args)
    return spec.params[position].name in _TARGET_PARAMS and not bool(args.get("grad", False))


def _last_net(path: ir.Path) -> str | None:
    for step in reversed(path.steps):
        if isinstance(step, ir.PartStep):
            return step.net
    return None


def _add_path(bg: BlockGraph, path: ir.Path, shapes: dict[str, tuple]) -> str:
    parent = "x"
    for i, step in enumerate(path.steps):
        prefix = path.prefix(i + 1)
        node = path_node(prefix)
        if node not in bg.nodes:
            shape = shapes.get(node)
            suffix = f"\\n{tuple(shape[1:])}" if shape else ""
            if isinstance(step, ir.AdapterStep):
                bg.nodes[node] = Node(node, f"{step.name}{suffix}", "adapter")
            src_net = _last_net(prefix.prefix(i))
            crossed = src_net is not None and (isinstance(step, ir.AdapterStep) or step.net != src_net)
            if isinstance(step, ir.PartStep):
                fed = f"\\non {prefix.prefix(i)}" if any(
                    isinstance(s, ir.PartStep) and s.net != step.net for s in prefix.steps[:i]) else ""
                bg.nodes[node] = Node(node, f"{step}{fed}{suffix}", "part", step.net)
            bg.edges.append(Edge(parent, node, crossed=crossed))
        parent = node
    return parent


def _add_arg(bg: BlockGraph, arg: object, shapes: dict[str, tuple]) -> str | None:
    if isinstance(arg, ir.Path):
        return _add_path(bg, arg, shapes)
    if isinstance(arg, ir.Labels):
        return "y"
    if isinstance(arg, ir.Ensemble):
        node = str(arg)
        if node not in bg.nodes:
            bg.nodes[node] = Node(node, "ensemble", "ensemble")
            for member in arg.members:
                bg.edges.append(Edge(_add_path(bg, member, shapes), node))
        return node
    return None


def _short(prim: ir.Prim) -> str:
    """`kl(net2, net1.up >> net2.down)`: the primitive and its tensor arguments (numbers left out)."""
    shown = [str(a) for a in prim.args if isinstance(a, ir.Path | ir.Labels | ir.Indices | ir.Ensemble)]
    return f"{prim.name}({', '.join(shown)})"


def _weight(w: float | None) -> str:
    return "×?" if w is None else f"×{w:.4g}"


def block_graphs(compiled, blocks: list[str] | None = None) -> list[BlockGraph]:
    """One BlockGraph per train block (or the named ones; an unknown name is an error)."""
    program = compiled.program
    names = [s.name for s in program.stages]
    for b in blocks or []:
        if b not in names:
            raise XdslError(f"--block: no train block '{b}'", hint=f"train blocks: {', '.join(names) or 'none'}")
    shapes = {n: tuple(d["shape"]) for n, d in compiled.graph.nodes(data=True) if "shape" in d}
    out = []
    for stage in program.stages:
        if blocks and stage.name not in blocks:
            continue
        bg = BlockGraph(stage.name, list(stage.trained), list(program.networks))
        bg.nodes["x"] = Node("x", "x (input batch)", "input")
        bg.nodes["y"] = Node("y", "y (labels)", "labels")
        for net, term in stage.objectives.items():
            obj = f"objective {net}"
            bg.nodes[obj] = Node(obj, f"{stage.name} objective of {net}\\nminimize ... wrt {net}", "objective", net)
            for key, w in term_weights(term).items():
                prim = next(p for p in term_leaves(term) if term_node(p) == key)
                if key not in bg.nodes:
                    bg.nodes[key] = Node(key, _short(prim), "term")
                    for position, arg in enumerate(prim.args):
                        src = _add_arg(bg, arg, shapes)
                        if src is not None:
                            bg.edges.append(Edge(src, key, detached=detached(prim, position)))
                bg.edges.append(Edge(key, obj, label=_weight(w)))
        if not any(e.src == "y" or e.dst == "y" for e in bg.edges):
            del bg.nodes["y"]
        out.append(bg)
    return out


# ---- DOT ----

def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n") + '"'


def _colour(bg: BlockGraph, net: str | None) -> tuple[str, str]:
    if net is None or net not in bg.networks:
        return "#ffffff", "#555555"
    if net not in bg.trained:
        return _FROZEN, "#868e96"
    i = bg.networks.index(net) % len(_PALETTE)
    return _PALETTE[i], _BORDER[i]


def to_dot(graphs: list[BlockGraph]) -> str:
    """Graphviz DOT: a cluster per block, inside it a cluster per network."""
    lines = ["digraph xdsl {", "  rankdir=LR; compound=true; newrank=true; labelloc=b; fontsize=10;",
             f"  label={_q(_LEGEND)};",
             '  node [fontname="Helvetica", fontsize=10, style="filled,rounded", shape=box];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for b, bg in enumerate(graphs):
        ids = {n: f"b{b}n{i}" for i, n in enumerate(bg.nodes)}
        lines.append(f"  subgraph cluster_b{b} {{")
        lines.append(f'    label={_q("train block " + bg.name)}; labelloc=t; fontsize=14; style=dashed; '
                     'color="#adb5bd";')
        for k, net in enumerate(bg.networks):
            members = [n for n in bg.nodes.values() if n.kind == "part" and n.network == net]
            if not members:
                continue
            fill, border = _colour(bg, net)
            status = "" if net in bg.trained else " (frozen)"
            lines.append(f"    subgraph cluster_b{b}_{k} {{")
            lines.append(f'      label={_q(net + status)}; labelloc=t; style="filled,rounded"; fillcolor="{fill}"; '
                         f'color="{border}";')
            for n in members:
                lines.append(f'      {ids[n.id]} [label={_q(n.label)}, fillcolor="white", color="{border}"];')
            lines.append("    }")
        for n in bg.nodes.values():
            if n.kind == "part":
                continue
            lines.append(f"    {ids[n.id]} [{_dot_style(bg, n)}];")
        for e in bg.edges:
            attrs = []
            if e.crossed:
                attrs += [f'color="{_CROSS}"', "penwidth=2.5"]
            if e.detached:
                attrs += ["style=dashed", 'arrowhead=empty']
            if e.label:
                attrs.append(f"label={_q(e.label)}")
            lines.append(f"    {ids[e.src]} -> {ids[e.dst]}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_style(bg: BlockGraph, n: Node) -> str:
    label = f"label={_q(n.label)}"
    if n.kind in ("input", "labels"):
        return f'{label}, shape=ellipse, fillcolor="#f1f3f5"'
    if n.kind == "adapter":
        return f'{label}, shape=box, fillcolor="#fff3bf", color="{_CROSS}"'
    if n.kind == "ensemble":
        return f'{label}, shape=diamond, fillcolor="#e2d4f0"'
    if n.kind == "term":
        return f'{label}, shape=note, fillcolor="#f8f9fa"'
    fill, border = _colour(bg, n.network)
    return f'{label}, shape=doubleoctagon, fillcolor="{fill}", color="{border}", penwidth=2'


# ---- Mermaid ----

def _m(text: str) -> str:
    return '"' + text.replace('"', "'").replace("\\n", "<br/>") + '"'


def to_mermaid(graphs: list[BlockGraph]) -> str:
    """Mermaid flowchart: subgraphs per block and network, crossed edges thick, detached edges dotted."""
    lines = ["flowchart LR", f"  %% {_LEGEND}"]
    link = 0
    styles: list[str] = []
    for b, bg in enumerate(graphs):
        ids = {n: f"b{b}n{i}" for i, n in enumerate(bg.nodes)}
        lines.append(f"  subgraph b{b}[{_m('train block ' + bg.name)}]")
        for k, net in enumerate(bg.networks):
            members = [n for n in bg.nodes.values() if n.kind == "part" and n.network == net]
            if not members:
                continue
            status = "" if net in bg.trained else " (frozen)"
            lines.append(f"    subgraph b{b}_{k}[{_m(net + status)}]")
            lines += [f"      {ids[n.id]}[{_m(n.label)}]" for n in members]
            lines.append("    end")
            fill, border = _colour(bg, net)
            styles.append(f"  style b{b}_{k} fill:{fill},stroke:{border}")
        for n in bg.nodes.values():
            if n.kind == "part":
                continue
            shape = {"input": "([{}])", "labels": "([{}])", "ensemble": "{{{}}}", "objective": "[[{}]]",
                     "adapter": "[/{}/]"}.get(n.kind, "[{}]")
            lines.append(f"    {ids[n.id]}{shape.format(_m(n.label))}")
            if n.kind == "objective":
                fill, border = _colour(bg, n.network)
                styles.append(f"  style {ids[n.id]} fill:{fill},stroke:{border},stroke-width:2px")
        for e in bg.edges:
            arrow = "-.->" if e.detached else "==>" if e.crossed else "-->"
            text = f"|{_m(e.label)}|" if e.label else ""
            lines.append(f"    {ids[e.src]} {arrow}{text} {ids[e.dst]}")
            if e.crossed:
                styles.append(f"  linkStyle {link} stroke:{_CROSS},stroke-width:3px")
            link += 1
        lines.append("  end")
    return "\n".join(lines + styles) + "\n"


# ---- files ----

def render(graphs: list[BlockGraph], out: Path, fmt: str) -> tuple[list[Path], str | None]:
    """Write `out` in `fmt` (dot | mermaid | svg | png). Without Graphviz an image request writes the DOT
    and Mermaid texts beside `out` instead; returns the files written and a note saying so (or None)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dot":
        out.write_text(to_dot(graphs))
        return [out], None
    if fmt == "mermaid":
        out.write_text(to_mermaid(graphs))
        return [out], None
    if fmt not in ("svg", "png"):
        raise XdslError(f"unknown format '{fmt}'", hint="dot, mermaid, svg or png")
    dot = shutil.which("dot")
    if dot is None:
        dot_file, mmd_file = out.with_suffix(".dot"), out.with_suffix(".mmd")
        dot_file.write_text(to_dot(graphs))
        mmd_file.write_text(to_mermaid(graphs))
        return [dot_file, mmd_file], (f"Graphviz is not installed (no `dot` program), so no {fmt} was drawn; "
                                      f"wrote {dot_file} and {mmd_file} instead (install graphviz, e.g. "
                                      f"`apt-get install graphviz`, or paste the Mermaid text into a Markdown "
                                      f"file on GitHub)")
    proc = subprocess.run([dot, f"-T{fmt}", "-o", str(out)], input=to_dot(graphs).encode(), capture_output=True)
    if proc.returncode != 0:
        raise XdslError(f"Graphviz failed to draw {out}: {proc.stderr.decode(errors='replace').strip()}")
    return [out], None
