"""`xdsl compare RUN_OR_SWEEP...`: one results table across run directories and sweeps.

Each run directory counts as one entry (a `--seeds N` run: mean +/- std over its seeds); a sweep
directory contributes one entry per configuration. Rows are (entry, train block), columns the union of
every entry's columns in `xdsl run`'s order (networks, cross paths, ensembles, best epochs), so the same
block names and metrics line up; a cell an entry does not have is blank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdsl.errors import XdslError

__all__ = ["Entry", "load_entries", "compare_table", "entry_curves"]


@dataclass
class Entry:
    """One compared experiment: a label, its results.json per seed, and its run directories (curves)."""

    label: str
    results: list[dict[str, Any]]
    run_dirs: list[Path] = field(default_factory=list)


def _run_entry(path: Path, label: str) -> Entry | None:
    """A run directory: results.json of one seed, or of `--seeds N` (then seed<K>/ hold the runs)."""
    file = path / "results.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    if "seeds" in data:
        dirs = [path / f"seed{r['seed']}" for r in data["seeds"]]
        return Entry(label, list(data["seeds"]), [d for d in dirs if d.is_dir()])
    return Entry(label, [data], [path])


def _sweep_entries(path: Path) -> list[Entry]:
    from xdsl.sweep.driver import read_sweep

    entries = []
    for name, (_, results) in read_sweep(path).items():
        dirs = [path / name / f"seed{r['seed']}" for r in results]
        if results:
            entries.append(Entry(f"{path.name}/{name}", results, dirs))
    return entries


def load_entries(paths: list[Path]) -> list[Entry]:
    """Entries of every path (run or sweep directory); a path that is neither is an error."""
    entries: list[Entry] = []
    for p in paths:
        p = Path(p)
        if (p / "plan.json").is_file():
            found = _sweep_entries(p)
        else:
            one = _run_entry(p, p.name)
            found = [one] if one else []
        if not found:
            raise XdslError(f"'{p}' is neither a finished run directory (results.json) nor a sweep (plan.json)",
                            hint="pass directories written by `xdsl run` or `xdsl sweep`")
        entries += found
    labels = [e.label for e in entries]
    for e in entries:  # two runs called `run` in different folders: tell them apart
        if labels.count(e.label) > 1:
            e.label = str(e.run_dirs[0].parent if e.run_dirs else e.label)
    return entries


def compare_table(entries: list[Entry]):
    """A rich Table: one row per entry and train block, the union of columns, blanks where missing."""
    from rich.table import Table

    from xdsl.eval.summary import summary_rows
    from xdsl.sweep.aggregate import cell_text

    per_entry = [summary_rows(e.results) for e in entries]
    columns: list[str] = []
    for cols, _ in per_entry:
        columns += [c for c in cols if c not in columns]
    columns = [c for c in columns if not c.endswith(" best")] + [c for c in columns if c.endswith(" best")]
    seeds = {len(e.results) for e in entries}
    table = Table(title="top-1 test accuracy (%)" + (", mean ± std over seeds" if max(seeds) > 1 else ""))
    table.add_column("run", no_wrap=True)
    table.add_column("train block", no_wrap=True)
    table.add_column("seeds", justify="right", no_wrap=True)
    for c in columns:
        table.add_column(c, justify="right", no_wrap=True)
    for entry, (_, values) in zip(entries, per_entry):
        for block, cells in values.items():
            table.add_row(entry.label, block, str(len(entry.results)), *[cell_text(cells.get(c)) for c in columns])
    return table


def entry_curves(entry: Entry) -> list[dict[str, Any]]:
    """metrics.jsonl rows of an entry's runs, test accuracy and train loss averaged over its seeds."""
    import statistics

    groups: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    trained: dict[tuple[str, str, int], bool] = {}
    for d in entry.run_dirs:
        path = d / "metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            key = (row["stage"], row["network"], int(row["epoch"]))
            trained[key] = bool(row.get("trained", True))
            for metric in ("train_loss", "test_acc"):
                if row.get(metric) is not None:
                    groups.setdefault(key, {}).setdefault(metric, []).append(float(row[metric]))
    return [{"stage": s, "network": n, "epoch": e, "trained": trained[(s, n, e)],
             **{m: statistics.mean(v) for m, v in vals.items()}} for (s, n, e), vals in groups.items()]
