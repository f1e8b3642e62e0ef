"""Evaluation results -> tables (rich for the terminal, Markdown for reports), in the seeds' formats.

The Xross table reads like seed 000's: one column per part naming the network it comes from
("Up Half | Down Half" when the parts are called up/down, else "Part1 | Part2 | ..."), then
accuracy (percent, 2 decimals) and #params with thousands separators.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from xdsl.eval.dynamic import best_path, pareto_front

__all__ = ["render_results", "results_markdown", "print_results", "fmt_acc", "fmt_params", "part_headers"]


def fmt_acc(acc: float | None, status: str | None = None) -> str:
    """0.58798 -> '58.80%'; a row that could not be evaluated shows why."""
    if acc is None:
        return status if status and status != "ok" else "n/a"
    return f"{100.0 * acc:.2f}%"


def fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _label(row: Mapping[str, Any]) -> str:
    return str(row.get("label") or row.get("path"))


def part_headers(parts: list[str]) -> list[str]:
    """Column names of the parts: the seed's "Up Half | Down Half" for up/down cuts, else Part1..PartP."""
    if [p.lower() for p in parts] == ["up", "down"]:
        return ["Up Half", "Down Half"]
    return [f"Part{i + 1}" for i in range(len(parts))]


@dataclass
class _Tab:
    """A table independent of how it is drawn."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str | None = None
    numeric: set[int] = field(default_factory=set)   # right-aligned columns


def _paths_table(item: Mapping[str, Any], title: str) -> _Tab:
    t = _Tab(title, ["Path", "Accuracy", "Loss", "#Params"], numeric={1, 2, 3})
    for r in item.get("rows", []):
        t.rows.append([_label(r), fmt_acc(r.get("accuracy"), r.get("status")), _fmt(r.get("loss")),
                       fmt_params(r.get("params"))])
    return t


def _dynamic_caption(item: Mapping[str, Any], caption: str | None) -> str:
    """Dynamic computation (seed 000): the best path under the item's #params / latency budget."""
    budget = {"max_params": item.get("max_params") or None, "max_latency_ms": item.get("max_latency_ms") or None}
    best = best_path(item.get("rows", []), **budget)
    wanted = ", ".join(f"{k} <= {v}" for k, v in budget.items() if v) or "no budget"
    choice = f"{best['label'] or best['path']} ({fmt_acc(best['accuracy'])}, {fmt_params(best['params'])} params)" \
        if best else "none fits"
    text = f"* = Pareto front (accuracy vs #params); best path with {wanted}: {choice}"
    return f"{caption}; {text}" if caption else text


def _xross_tables(item: Mapping[str, Any]) -> list[_Tab]:
    parts = list(item.get("parts", []))
    archs = item.get("architectures", {})
    caption = ", ".join(f"{n} = {a}" for n, a in archs.items()) or None
    latency = item.get("kind") == "latency"
    if latency:
        caption = _dynamic_caption(item, caption)
    headers = part_headers(parts) + ["Accuracy", "#Params"] + (["ms/batch", "Pareto"] if latency else [])
    first_numeric = len(parts)
    front = {r["path"] for r in pareto_front(item.get("rows", []))} if latency else set()
    t = _Tab(("Latency: " if latency else "Xross: ") + item.get("title", ""), headers, caption=caption,
             numeric=set(range(first_numeric, len(headers))))
    for r in item.get("rows", []):
        cells = list(r["networks"]) + [fmt_acc(r.get("accuracy"), r.get("status")),
                                       fmt_params(r.get("params"))]
        if latency:
            cells += [_fmt(r.get("latency_ms"), 2), "*" if r["path"] in front else ""]
        t.rows.append(cells)
    tabs = [t]
    if len(parts) == 2 and not latency and item.get("rows"):
        nets = list(item.get("networks", []))
        grid = {tuple(r["networks"]): r for r in item["rows"]}
        m = _Tab(f"Xross accuracy ({parts[0]} rows x {parts[1]} columns)",
                 [f"{parts[0]} \\ {parts[1]}"] + nets,
                 numeric=set(range(1, len(nets) + 1)))
        for a in nets:
            m.rows.append([a] + [fmt_acc(grid[(a, b)].get("accuracy"), "n/a") if (a, b) in grid else "-"
                                 for b in nets])
        tabs.append(m)
    return tabs


def _ensemble_table(item: Mapping[str, Any]) -> _Tab:
    t = _Tab("Ensemble: " + item.get("title", ""), ["Member", "Accuracy"], numeric={1})
    members = item.get("members", [])
    for r in members:
        t.rows.append([_label(r), fmt_acc(r.get("accuracy"), r.get("status"))])
    acc = item.get("accuracy")
    best = max((r["accuracy"] for r in members if r.get("accuracy") is not None), default=None)
    gain = f" ({100.0 * (acc - best):+.2f})" if acc is not None and best is not None else ""
    t.rows.append(["ensemble (averaged softmax)", fmt_acc(acc, item.get("status")) + gain])
    t.caption = "gain over the best member in parentheses" if gain else None
    return t


def _entropy_table(item: Mapping[str, Any]) -> _Tab:
    t = _Tab("Entropy: " + item.get("title", ""), ["Path", "Mean entropy (nats)", "Accuracy"], numeric={1, 2})
    for r in item.get("rows", []):
        ok = r.get("status") == "ok"
        t.rows.append([_label(r), _fmt(r.get("entropy")) if ok else r.get("status", "n/a"),
                       fmt_acc(r.get("accuracy"), r.get("status"))])
    return t


def _flatness_table(item: Mapping[str, Any]) -> _Tab:
    paths = list(item.get("paths", []))
    labels = list(item.get("labels") or paths)
    t = _Tab("Flatness: " + item.get("title", ""), ["sigma"] + labels, numeric=set(range(0, len(paths) + 1)),
             caption=f"accuracy (CE loss) under N(0, sigma^2) weight noise, mean of {item.get('draws')} "
                     "draws")
    cells = {(r["path"], r["sigma"]): r for r in item.get("rows", [])}
    for s in item.get("sigmas", []):
        row = [f"{s:g}"]
        for p in paths:
            r = cells.get((p, s), {})
            if r.get("accuracy") is None:
                row.append(r.get("status", "n/a"))
            else:
                row.append(f"{fmt_acc(r['accuracy'])} ({_fmt(r.get('loss'), 3)})")
        t.rows.append(row)
    return t


def _mapping_table(item: Mapping[str, Any]) -> _Tab:
    t = _Tab("Channel mapping: " + item.get("title", ""),
             ["Networks", "Cut after", "Measure", "Original", "Random", "Gale", "Rounds"], numeric={3, 4, 5})
    for r in item.get("rows", []):
        if r.get("status") != "ok":
            t.rows.append([" / ".join(r["networks"]), str(r.get("after")), r.get("measure", ""),
                           r.get("status", "n/a"), "", "", ""])
            continue
        rounds = r.get("rounds", [])
        text = "/".join(str(x) for x in rounds[:10]) + (f"/... ({len(rounds)})" if len(rounds) > 10 else "")
        t.rows.append([" / ".join(r["networks"]), str(r.get("after")), r["measure"], f"{r['original']:.4g}",
                       f"{r['random']:.4g}", f"{r['gale']:.4g}", text])
    return t


def _tables(results: Mapping[str, Any]) -> list[_Tab]:
    tabs: list[_Tab] = []
    for item in results.get("items", []):
        kind = item.get("kind")
        if item.get("error"):
            tabs.append(_Tab(f"{item.get('title', kind)}", ["Error"], [[item["error"]]]))
        elif kind == "accuracy":
            tabs.append(_paths_table(item, "Accuracy"))
        elif kind in ("xross", "latency"):
            tabs += _xross_tables(item)
        elif kind == "ensemble":
            tabs.append(_ensemble_table(item))
        elif kind == "entropy":
            tabs.append(_entropy_table(item))
        elif kind == "flatness":
            tabs.append(_flatness_table(item))
        elif kind == "mapping":
            tabs.append(_mapping_table(item))
    return tabs


def render_results(results: Mapping[str, Any]) -> list[Table]:
    """One rich Table per result (two for a 2-part Xross: the seed's list and an up x down matrix)."""
    out = []
    for tab in _tables(results):
        table = Table(title=tab.title, caption=tab.caption)
        for i, h in enumerate(tab.headers):
            table.add_column(h, justify="right" if i in tab.numeric else "left")
        for row in tab.rows:
            table.add_row(*row)
        out.append(table)
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_markdown(results: Mapping[str, Any]) -> str:
    """All result tables as GitHub Markdown (for REPORT.md / README snippets)."""
    chunks = []
    n = results.get("num_samples")
    if n:
        chunks.append(f"_Evaluated on {n:,} test samples ({results.get('num_batches')} batches, "
                      f"device {results.get('device')})._")
    for tab in _tables(results):
        lines = [f"### {_md_cell(tab.title)}", ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in tab.headers) + " |")
        align = ["---:" if i in tab.numeric else "---" for i in range(len(tab.headers))]
        lines.append("|" + "|".join(align) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in tab.rows]
        if tab.caption:
            lines += ["", f"_{_md_cell(tab.caption)}_"]
        chunks.append("\n".join(lines))
    return "\n\n".join(chunks) + "\n"


def print_results(results: Mapping[str, Any], console: Any = None) -> None:
    """Print every table to a rich Console (a new one on stdout by default)."""
    from rich.console import Console

    console = console or Console()
    for table in render_results(results):
        console.print(table)
