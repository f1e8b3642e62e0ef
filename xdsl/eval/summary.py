"""The table `xdsl run` ends with: one row per train block, one column per network / cross path / ensemble.

With `--seeds N` every cell is mean +/- std over the seeds. The full per-block tables (the XML paper's
Xross format, flatness, mapping...) are printed before it and kept in results.json. Tables over the
whole run (`error_table`: networks x methods, the Born-Again paper's layout) are printed after it.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["best_note", "summary_rows", "run_tables", "print_run_summary"]


def _columns(stage_result: dict[str, Any]) -> dict[str, float | None]:
    """Accuracy per column of one block's evaluation: networks, then cross paths, then ensembles."""
    from xdsl.eval.items import EVALUATIONS

    n_networks = len(stage_result["best"]) if "best" in stage_result else None
    cols: dict[str, float | None] = {}
    for item in stage_result["evaluate"].get("items", []):
        if item.get("kind") in EVALUATIONS:
            cols.update(EVALUATIONS.get(item["kind"]).columns(item, n_networks))
    for net, best in stage_result.get("best", {}).items():
        cols[f"{net} best"] = best.get("acc")
    return cols


def summary_rows(all_results: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """Column names and, per block and column, the values over seeds."""
    columns: list[str] = []
    values: dict[str, dict[str, list[float]]] = {}
    for result in all_results:
        for stage, r in result["stages"].items():
            for col, v in _columns(r).items():
                if col not in columns:
                    columns.append(col)
                if v is not None:
                    values.setdefault(stage, {}).setdefault(col, []).append(v)
    # best-epoch columns last
    columns = [c for c in columns if not c.endswith(" best")] + [c for c in columns if c.endswith(" best")]
    return columns, values


def run_tables(all_results: list[dict[str, Any]]) -> list[Any]:
    """The tables over every block of the run (`EvaluateItem.run_tables`), from the last block's items."""
    from xdsl.eval.items import EVALUATIONS

    if not all_results or not all_results[0].get("stages"):
        return []
    last = list(all_results[0]["stages"].values())[-1]
    tabs = []
    for item in last["evaluate"].get("items", []):
        if item.get("kind") in EVALUATIONS and not item.get("error"):
            tabs += EVALUATIONS.get(item["kind"]).run_tables(item, all_results)
    return tabs


def best_note(all_results: list[dict[str, Any]]) -> str:
    """What the 'best' columns mean: test accuracy at the best-validation epoch, or best on test."""
    on_val = bool(all_results) and all(r.get("best_on") == "validation" for r in all_results)
    return "'best' = test accuracy at the best-validation epoch" if on_val else "'best' = best on test"


def _cell(vals: list[float] | None) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    return f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}"


def print_run_summary(all_results: list[dict[str, Any]], quiet: bool = False, show: bool = True) -> dict[str, Any]:
    """Print every block's detailed tables, then the comparison table; return it as a dict.

    `quiet` (`xdsl run -q`) leaves out the detailed tables but still prints the comparison table: a quiet
    run's log must still hold its result. `show=False` prints nothing (DDP ranks other than 0).
    """
    from rich.table import Table

    from xdsl.console import heading, make_console, print_table
    from xdsl.eval.tables import render_results

    console = make_console(quiet=not show)
    if len(all_results) == 1 and not quiet:
        for stage, r in all_results[0]["stages"].items():
            heading(console, stage)
            for table in render_results(r["evaluate"]):
                print_table(console, table)
    columns, values = summary_rows(all_results)
    n = len(all_results)
    reid = any(c.endswith((" R1", " mAP")) for c in columns)  # retrieval columns (re-id data)
    what = "retrieval Rank-1 (R1) and mAP (%)" if reid else "top-1 test accuracy (%)"
    table = Table(title=f"results: {what}" + (f", mean ± std over {n} seeds" if n > 1 else "")
                  + f"; last epoch, {best_note(all_results)}")
    if len(columns) <= 8:  # one row per train block
        table.add_column("train block", no_wrap=True)
        for c in columns:
            table.add_column(c, justify="right", no_wrap=True)
        for stage in values:
            table.add_row(stage, *[_cell(values[stage].get(c)) for c in columns])
    else:  # many paths: one row per path, one column per train block
        table.add_column("path", no_wrap=True)
        for stage in values:
            table.add_column(stage, justify="right", no_wrap=True)
        for c in columns:
            table.add_row(c, *[_cell(values[stage].get(c)) for stage in values])
    print_table(console, table)
    for tab in run_tables(all_results):  # networks x methods (error_table): after, never instead of, it
        print_table(console, tab.to_rich(no_wrap=True))
    return {"columns": columns, "rows": {stage: {c: values[stage].get(c, []) for c in columns} for stage in values}}
