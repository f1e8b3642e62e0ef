"""Evaluation results -> tables (rich for the terminal, Markdown for reports).

Each evaluate item draws its own tables (`EvaluateItem.tables`, in the papers' formats); this module
only lays them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from xdsl.eval.items import EVALUATIONS
from xdsl.eval.table import Tab, fmt_acc, fmt_params, part_headers

__all__ = ["render_results", "results_markdown", "print_results", "result_tables", "fmt_acc", "fmt_params",
           "part_headers"]


def _tables(results: Mapping[str, Any]) -> list[Tab]:
    tabs: list[Tab] = []
    for item in results.get("items", []):
        kind = item.get("kind")
        if item.get("error"):
            tabs.append(Tab(f"{item.get('title', kind)}", ["Error"], [[item["error"]]]))
        elif kind in EVALUATIONS:
            tabs += EVALUATIONS.get(kind).tables(item)
    return tabs


def result_tables(results: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    """Every result table as (title, headers, rows, right-aligned columns), for other renderers (HTML)."""
    return [(t.title, t.headers, t.rows, t.numeric) for t in _tables(results)]


def render_results(results: Mapping[str, Any]) -> list[Table]:
    """One rich Table per result (two for a 2-part Xross: the XML paper's list and an up x down matrix)."""
    return [tab.to_rich() for tab in _tables(results)]


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
    from xdsl.console import make_console, print_table

    console = console or make_console()
    for table in render_results(results):
        print_table(console, table)
