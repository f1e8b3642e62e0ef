"""What `xdsl compile` reports: parts, paths and loss terms of a compiled spec."""

from __future__ import annotations

from typing import Any

import torch

from xdsl.compile.assemble import Compiled
from xdsl.compile.graph import term_leaves
from xdsl.compile.stateful import term_rows
from xdsl.errors import XdslError
from xdsl.lang import ir
from xdsl.shapes import infer_shapes

__all__ = ["summarize", "print_summary", "path_params"]


def path_params(compiled: Compiled, path: ir.Path) -> int:
    """Parameters of every module on a path, each Parameter counted once."""
    seen: dict[int, int] = {}
    for step in path.steps:
        module = compiled.root.get_submodule(f"adapters.{step.name}" if isinstance(step, ir.AdapterStep)
                                             else f"parts.{step.net}.{step.part}")
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def summarize(compiled: Compiled) -> dict[str, Any]:
    """JSON-ready summary: parts (network, part, params, output shape), paths (path, params), loss terms."""
    g, program = compiled.graph, compiled.program
    parts = []
    for net, names in program.parts.items():
        for i, name in enumerate(names):
            node = str(ir.Path(tuple(ir.PartStep(net, names[j], j) for j in range(i + 1))))
            module = compiled.root.parts[net][name]
            parts.append({"network": net, "part": name, "params": sum(p.numel() for p in module.parameters()),
                          "output_shape": list(g.nodes[node].get("shape", ())[1:])})
    paths = [{"path": n, "params": path_params(compiled, d["path"]), "output_shape": list(d.get("shape", ())[1:])}
             for n, d in g.nodes(data=True) if d["kind"] in ("part", "adapter")]
    stages = []
    for stage in program.stages:
        objectives = {net: {"objective": str(term), "terms": [str(t) for t in term_leaves(term)]}
                      for net, term in stage.objectives.items()}
        stages.append({"name": stage.name, "after": stage.after, "order": stage.order, "epochs": stage.epochs,
                       "optimizer": {"name": stage.optimizer.name, **stage.optimizer.kwargs},
                       "objectives": objectives})
    adapters = [{"name": n, "kind": d.kind, "owners": list(d.owners),
                 "params": sum(p.numel() for p in compiled.root.adapters[n].parameters())
                 if n in compiled.root.adapters else 0} for n, d in program.adapters.items()]
    return {"spec": program.file, "input_shape": list(compiled.input_shape), "num_classes": compiled.num_classes,
            "parts": parts, "adapters": adapters, "terms": term_rows(program, compiled.terms), "paths": paths,
            "train": stages,
            "evaluate": [{"kind": e.kind, "args": [str(a) for a in e.args], **e.kwargs,
                          "paths": evaluate_paths(compiled, e)} for e in program.evaluate]}


def _output_shape(compiled: Compiled, path: ir.Path) -> list[int]:
    """A path's output shape: from the graph when a loss or an item put it there, else inferred on meta."""
    node = compiled.graph.nodes.get(str(path))
    if node is not None and node.get("shape") is not None:
        return list(node["shape"][1:])
    modules = [compiled.root.get_submodule(f"adapters.{s.name}" if isinstance(s, ir.AdapterStep)
                                           else f"parts.{s.net}.{s.part}") for s in path.steps]
    sample = torch.empty((2, *compiled.input_shape), device="meta")
    return list(infer_shapes(modules, sample)[-1][1:])


def evaluate_paths(compiled: Compiled, item: ir.EvalItem) -> list[dict[str, Any]]:
    """Every path an evaluate item will run, with #params and output shape, before anything trains.

    `xross` and `latency` run every combination of parts (one network per part, joined through the
    spec's adapters); a combination that cannot run says why. `mapping` runs the networks' cut points.
    """
    program = compiled.program
    if item.kind in ("xross", "latency"):
        from types import SimpleNamespace

        from xdsl.eval.paths import Unavailable, xross_combinations

        nets = [str(a) for a in item.args] or list(program.networks)
        view = SimpleNamespace(program=program, graph=compiled.graph, compiled=compiled, stage=None)
        try:
            _, combos = xross_combinations(view, nets)
        except (Unavailable, XdslError) as e:
            return [{"path": None, "status": str(e)}]
        return [{"path": str(c.path), "params": path_params(compiled, c.path),
                 "output_shape": _output_shape(compiled, c.path)} if c.path is not None
                else {"path": " >> ".join(c.networks), "status": c.status} for c in combos]
    if item.kind == "mapping":
        return []
    paths = [a for a in item.args if isinstance(a, ir.Path)]
    if not item.args:
        paths = [program.natural_path(net) for net in program.networks]
    rows = []
    for path in paths:
        snapshot = any(isinstance(s, ir.PartStep) and s.epoch is not None for s in path.steps)
        live = ir.Path(tuple(ir.PartStep(s.net, s.part, s.index) if isinstance(s, ir.PartStep) else s
                             for s in path.steps)) if snapshot else path
        rows.append({"path": str(path), "params": path_params(compiled, live),
                     "output_shape": _output_shape(compiled, live)})
    return rows


def print_summary(summary: dict[str, Any]) -> None:
    """Human-readable tables of the summary."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="parts")
    for col in ("network", "part", "params", "output shape"):
        t.add_column(col, justify="right" if col == "params" else "left")
    for p in summary["parts"]:
        t.add_row(p["network"], p["part"], f"{p['params']:,}", str(tuple(p["output_shape"])))
    console.print(t)
    if summary.get("terms"):
        console.print(_terms_table(summary["terms"]))
    t = Table(title="paths")
    t.add_column("path")
    t.add_column("params", justify="right")
    t.add_column("output shape")
    for p in summary["paths"]:
        t.add_row(p["path"], f"{p['params']:,}", str(tuple(p["output_shape"])))
    console.print(t)
    for item in summary["evaluate"]:
        if not item["paths"]:
            continue
        t = Table(title=f"evaluate {item['kind']}({', '.join(item['args'])})")
        t.add_column("path")
        t.add_column("params", justify="right")
        t.add_column("output shape")
        for p in item["paths"]:
            if "status" in p:
                t.add_row(p["path"] or "", "", p["status"])
            else:
                t.add_row(p["path"], f"{p['params']:,}", str(tuple(p["output_shape"])))
        console.print(t)
    for stage in summary["train"]:
        console.print(f"[bold]train {stage['name']}[/] ({stage['order']}, {stage['epochs']} epochs, "
                      f"{stage['optimizer']['name']})")
        for net, obj in stage["objectives"].items():
            console.print(f"  minimize wrt {net}: {len(obj['terms'])} terms")
            for term in obj["terms"]:
                console.print(f"    {term}")


def _terms_table(rows: list[dict[str, Any]]):
    """Stateful loss terms: module, owner, parameters, buffers (N: one row per training sample, sized when
    the data is known)."""
    from rich.table import Table

    t = Table(title="stateful loss terms")
    for col in ("module", "term", "owner", "params", "buffers"):
        t.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        buffers = ", ".join(f"{n} ({', '.join('N' if i == 0 and d == 0 else str(d) for i, d in enumerate(shape))})"
                            for n, shape in r["buffers"].items())
        t.add_row(r["name"], r["term"], r["owner"], f"{r['params']:,}", buffers)
    return t
