"""A sweep's results: one row per configuration and train block, mean +/- std over seeds of every
column `xdsl run` reports (networks, cross paths, ensembles, best epochs), the best configuration marked.

The columns are those of `xdsl run`'s results table (`xdsl.eval.summary.summary_rows`), so a sweep
cell is the mean of the numbers the single runs print. "Best" is per train block, by `metric`:
a column name, or "mean" (default) = the mean over the networks' last-epoch accuracies.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Row", "aggregate", "write_sweep_files", "sweep_table"]


@dataclass
class Row:
    """One configuration in one train block."""

    config: str
    values: dict[str, str]                 # the configuration's --set values
    block: str
    seeds: int                             # runs that finished
    cells: dict[str, list[float]] = field(default_factory=dict)   # column -> value per seed (fractions)
    score: float | None = None             # what `metric` ranks by
    best: bool = False


def _network_columns(results: dict[str, Any], block: str) -> list[str]:
    """The networks' own accuracy columns (the `accuracy` item's rows) of one block."""
    for item in results["stages"].get(block, {}).get("evaluate", {}).get("items", []):
        if item.get("kind") == "accuracy":
            return [r.get("label") or r["path"] for r in item.get("rows", [])]
    return list(results["stages"].get(block, {}).get("best", {}))


def aggregate(runs: dict[str, tuple[dict[str, str], list[dict[str, Any]]]], metric: str = "mean"
              ) -> tuple[list[str], list[Row]]:
    """`runs`: configuration name -> (its --set values, the results.json of each finished seed).

    Returns the columns (in `xdsl run`'s order) and the rows, best marked per block.
    """
    from xdsl.eval.summary import summary_rows

    columns: list[str] = []
    rows: list[Row] = []
    for name, (values, results) in runs.items():
        if not results:
            continue
        cols, per_block = summary_rows(results)
        columns += [c for c in cols if c not in columns]
        for block, cells in per_block.items():
            row = Row(name, values, block, len(results), dict(cells))
            ranked = _network_columns(results[0], block) if metric == "mean" else [metric]
            means = [statistics.mean(cells[c]) for c in ranked if cells.get(c)]
            row.score = statistics.mean(means) if means else None
            rows.append(row)
    columns = [c for c in columns if not c.endswith(" best")] + [c for c in columns if c.endswith(" best")]
    blocks = list(dict.fromkeys(r.block for r in rows))
    rows.sort(key=lambda r: blocks.index(r.block))  # stable: configurations in grid order within a block
    for block in blocks:
        scored = [r for r in rows if r.block == block and r.score is not None]
        if scored:
            max(scored, key=lambda r: r.score).best = True
    return columns, rows


def _mean_std(vals: list[float] | None) -> tuple[float | None, float | None]:
    if not vals:
        return None, None
    return 100 * statistics.mean(vals), (100 * statistics.stdev(vals) if len(vals) > 1 else None)


def cell_text(vals: list[float] | None) -> str:
    """Percent with 2 decimals; `mean ± std` over 2 or more seeds; blank when missing."""
    mean, std = _mean_std(vals)
    if mean is None:
        return ""
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def write_sweep_files(out: Path, meta: dict[str, Any], keys: list[str], columns: list[str], rows: list[Row]) -> None:
    """sweep.csv (one line per configuration and block; mean and std columns) and sweep.json (all seeds)."""
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", *keys, "block", "seeds", "best", *[f"{c} {s}" for c in columns for s in ("mean", "std")]])
        for r in rows:
            stats = [x for c in columns for x in _mean_std(r.cells.get(c))]
            w.writerow([r.config, *[r.values.get(k, "") for k in keys], r.block, r.seeds, int(r.best),
                        *["" if x is None else f"{x:.4f}" for x in stats]])
    payload = {**meta, "columns": columns, "rows": [
        {"config": r.config, "values": r.values, "block": r.block, "seeds": r.seeds, "best": r.best,
         "score": r.score, "cells": {c: {"values": v, "mean": _mean_std(v)[0], "std": _mean_std(v)[1]}
                                     for c, v in r.cells.items()}} for r in rows]}
    (out / "sweep.json").write_text(json.dumps(payload, indent=2))


def sweep_table(keys: list[str], columns: list[str], rows: list[Row], title: str):
    """The printed table: configuration keys, block, seeds, then every column; '*' marks the best."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for k in keys:
        table.add_column(k, no_wrap=True)
    table.add_column("train block", no_wrap=True)
    table.add_column("seeds", justify="right", no_wrap=True)
    for c in columns:
        table.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        table.add_row("*" if r.best else "", *[r.values.get(k, "") for k in keys], r.block, str(r.seeds),
                      *[cell_text(r.cells.get(c)) for c in columns])
    return table
