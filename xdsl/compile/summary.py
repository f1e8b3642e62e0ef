"""What `xdsl compile` reports: parts, paths and loss terms of a compiled spec."""

from __future__ import annotations

from typing import Any

from xdsl.compile.assemble import Compiled
from xdsl.compile.graph import term_leaves
from xdsl.lang import ir

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
            node = " >> ".join(f"{net}.{names[j]}" for j in range(i + 1))
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
            "parts": parts, "adapters": adapters, "paths": paths, "train": stages,
            "evaluate": [{"kind": e.kind, "args": [str(a) for a in e.args], **e.kwargs} for e in program.evaluate]}


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
    t = Table(title="paths")
    t.add_column("path")
    t.add_column("params", justify="right")
    t.add_column("output shape")
    for p in summary["paths"]:
        t.add_row(p["path"], f"{p['params']:,}", str(tuple(p["output_shape"])))
    console.print(t)
    for stage in summary["train"]:
        console.print(f"[bold]train {stage['name']}[/] ({stage['order']}, {stage['epochs']} epochs, "
                      f"{stage['optimizer']['name']})")
        for net, obj in stage["objectives"].items():
            console.print(f"  minimize wrt {net}: {len(obj['terms'])} terms")
            for term in obj["terms"]:
                console.print(f"    {term}")
