"""`error_table(columns=[...], cells="error")`: the run's results as the Born-Again paper lays them out:
one row per network architecture, one column per method, test error % (100 - top-1 accuracy) in the cells.

A column is `"LABEL=BLOCK"`: every network train block BLOCK trains, after it, in the row of its
architecture (BLOCK may be a glob such as `*_gen1`, for one column over several blocks); or
`"LABEL=BLOCK:NET"` (that network after BLOCK) or `"LABEL=BLOCK:NET1+NET2"` (the `ensemble(NET1, NET2)`
item of the evaluate clause after BLOCK: the seed's Ens*2). Without `columns` every block is a column,
named by the block. An architecture is a network declaration's model and keywords (`network a, b = ...`
declares one); its row is named by the model and the keywords in which the rows differ.

The table spans train blocks, so it is drawn once, after the run's results table (`xdsl.eval.summary`),
from each block's results; the item's own result is the resolved layout. It adds nothing to the
per-block tables or to the results table's columns. The layout is resolved, and every mistake found,
at check time (`check_program`).
"""

from __future__ import annotations

import fnmatch
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.table import Tab, fmt_params
from xdsl.lang import ir
from xdsl.registry import did_you_mean

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass

__all__ = ["ErrorTable", "LayoutError", "resolve_layout", "CELLS"]

CELLS = ("error", "accuracy")  # test error % (the seed's tables) or top-1 accuracy %


class LayoutError(Exception):
    """A mistake in the layout: (message, hint, index of the column entry or None)."""

    def __init__(self, message: str, hint: str | None = None, column: int | None = None):
        super().__init__(message)
        self.message, self.hint, self.column = message, hint, column


@dataclass(frozen=True)
class _Source:
    row: int
    column: int
    block: str
    item: int            # index of the evaluate item holding the value
    path: str | None     # the accuracy row's label; None: the item's own accuracy (an ensemble)


def _arch_key(decl: ir.NetworkDecl) -> tuple:
    return decl.ref, tuple(sorted((k, repr(v)) for k, v in decl.kwargs.items())), decl.weights


def _arch_labels(keys: list[tuple]) -> list[str]:
    """Model name and the keywords in which the rows differ: builtin.wrn(depth=28, widen=1)."""
    common = set.intersection(*(set(k[1]) for k in keys)) if len(keys) > 1 else set(keys[0][1]) if keys else set()
    labels = []
    for ref, kwargs, weights in keys:
        shown = [f"{k}={v.strip(chr(39))}" for k, v in kwargs if (k, v) not in common]
        text = ref + (f"({', '.join(shown)})" if shown else "")
        labels.append(text + (f" weights {weights}" if weights else ""))
    return labels


def _accuracy_item(program: ir.Program, net: str) -> int | None:
    """Index of an `accuracy` item of the test set that reports `net`'s own full path."""
    path = program.natural_path(net)
    for i, item in enumerate(program.evaluate):
        if item.kind == "accuracy" and item.kwargs.get("split", "test") == "test" and \
                (not item.args or path in item.args):
            return i
    return None


def _ensemble_item(program: ir.Program, nets: list[str]) -> int | None:
    want = {program.natural_path(n) for n in nets}
    for i, item in enumerate(program.evaluate):
        if item.kind == "ensemble" and len(item.args) == len(want) and set(item.args) == want:
            return i
    return None


def _hint(name: str, known: list[str], otherwise: str) -> str:
    close = did_you_mean(name, known)
    return f"did you mean '{close}'?" if close else otherwise


def resolve_layout(kwargs: Mapping[str, Any], program: ir.Program) -> dict[str, Any]:
    """The table's rows, columns and where each cell's value is in the blocks' results; LayoutError if
    the layout names something the spec does not have or gives one cell two values."""
    blocks = [s.name for s in program.stages]
    nets = list(program.networks)
    entries = kwargs.get("columns") or [f"{b}={b}" for b in blocks]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise LayoutError("error_table(): columns is a list of strings \"LABEL=BLOCK\"",
                          'e.g. columns=["Teacher=gen0", "BAN-1=gen1", "Ens*2=gen2:g1+g2"]')
    arch: dict[tuple, int] = {}
    labels: list[str] = []
    sources: list[_Source] = []
    for j, entry in enumerate(entries):
        label, eq, source = (p.strip() for p in entry.partition("="))
        if not eq or not label or not source:
            raise LayoutError(f"error_table(): column \"{entry}\" is not \"LABEL=BLOCK\" or \"LABEL=BLOCK:NETS\"",
                              'e.g. "BAN-1=gen1", "Ens*2=gen2:g1+g2"', j)
        if label in labels:
            raise LayoutError(f"error_table(): two columns are labelled '{label}'", None, j)
        labels.append(label)
        pattern, colon, what = (p.strip() for p in source.partition(":"))
        matched = [b for b in blocks if fnmatch.fnmatchcase(b, pattern)]
        if not matched:
            raise LayoutError(f"error_table(): column '{label}': no train block is called '{pattern}'",
                              _hint(pattern, blocks, f"train blocks: {', '.join(blocks) or 'none'}"), j)
        members = [m.strip() for m in what.split("+")] if colon else []
        for m in members:
            if m not in program.networks:
                raise LayoutError(f"error_table(): column '{label}': '{m}' is not a network",
                                  _hint(m, nets, f"networks: {', '.join(nets)}"), j)
        for block in matched:
            stage = next(s for s in program.stages if s.name == block)
            if len(members) > 1:
                item = _ensemble_item(program, members)
                if item is None:
                    raise LayoutError(f"error_table(): column '{label}': the evaluate clause has no "
                                      f"ensemble({', '.join(members)})",
                                      f"add ensemble({', '.join(members)}) to the evaluate clause", j)
                keys = {_arch_key(program.networks[m]) for m in members}
                if len(keys) > 1:
                    raise LayoutError(f"error_table(): column '{label}': the members of "
                                      f"ensemble({', '.join(members)}) are of different architectures, "
                                      "so the ensemble has no row", None, j)
                cells = [(keys.pop(), item, None)]
            else:
                cells = []
                for net in members or list(stage.trained):
                    item = _accuracy_item(program, net)
                    if item is None:
                        raise LayoutError(f"error_table(): column '{label}': no accuracy item of the test set "
                                          f"reports '{net}'", "add `accuracy` to the evaluate clause", j)
                    cells.append((_arch_key(program.networks[net]), item, net))
            for key, item, path in cells:
                row = arch.setdefault(key, len(arch))
                clash = next((s for s in sources if s.row == row and s.column == j), None)
                if clash is not None:
                    what_new = path or "the ensemble"
                    raise LayoutError(f"error_table(): column '{label}' gets two values for one architecture: "
                                      f"{clash.path or 'an ensemble'} after {clash.block} and {what_new} after "
                                      f"{block}", 'name the network: "LABEL=BLOCK:NET"', j)
                sources.append(_Source(row, j, block, item, path))
    if not sources:
        raise LayoutError("error_table(): the layout has no cells (no train block trains a network)")
    return {"networks": _arch_labels(list(arch)), "methods": labels,
            "sources": [[s.row, s.column, s.block, s.item, s.path] for s in sources]}


class ErrorTable(EvaluateItem):
    name = "error_table"
    takes = "networks"
    per_sample = False
    keywords = {"columns": [], "cells": "error"}

    @classmethod
    def check_keywords(cls, kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
        cells = kwargs.get("cells", "error")
        if cells not in CELLS:
            close = did_you_mean(str(cells), list(CELLS))
            return ("cells", f"error_table(): cells is {' or '.join(CELLS)}, got '{cells}'",
                    f"did you mean '{close}'?" if close else None)
        return None

    @classmethod
    def check_program(cls, item: ir.EvalItem, program: ir.Program) -> tuple[str | None, int | None, str,
                                                                            str | None] | None:
        """(keyword, index in its list, message, hint) of the first mistake, else None."""
        if item.args:
            return None, None, "error_table() takes no networks: its columns name blocks and networks", \
                'e.g. error_table(columns=["Teacher=gen0", "BAN=gen1"])'
        try:
            resolve_layout(item.kwargs, program)
        except LayoutError as e:
            return "columns", e.column, e.message, e.hint
        return None

    def compute(self, job: Pass) -> Result:
        return self.result(cells=self.spec.kwargs.get("cells", "error"),
                           **resolve_layout(self.spec.kwargs, self.program))

    @classmethod
    def merge(cls, shards, weights) -> Result:
        return dict(shards[0])

    @classmethod
    def run_tables(cls, result: Mapping[str, Any], all_results: list[Mapping[str, Any]]) -> list[Tab]:
        """The layout filled from every block's results (each seed's; several seeds: mean ± std)."""
        error = result.get("cells", "error") == "error"
        rows, methods = result.get("networks", []), result.get("methods", [])
        values: dict[tuple[int, int], list[float]] = {}
        params: dict[int, int] = {}
        for run in all_results:
            for r, c, block, index, path in result.get("sources", []):
                stage = run.get("stages", {}).get(block)
                items = stage["evaluate"].get("items", []) if stage else []
                item = items[index] if index < len(items) else {}
                found = item if path is None else next(
                    (x for x in item.get("rows", []) if (x.get("label") or x.get("path")) == path), {})
                acc = found.get("accuracy")
                if acc is not None:
                    values.setdefault((r, c), []).append(100.0 * (1.0 - acc) if error else 100.0 * acc)
                if path is not None and found.get("params") is not None:
                    params.setdefault(r, found["params"])
        what = "Test error (%)" if error else "Top-1 test accuracy (%)"
        n = len(all_results)
        t = Tab(what + (f", mean ± std over {n} seeds" if n > 1 else "") + " by network and method",
                ["Network", "#Params", *methods], numeric=set(range(1, len(methods) + 2)),
                caption="error = 100 - top-1 accuracy, last epoch of each block" if error else None)
        for r, label in enumerate(rows):
            t.rows.append([label, fmt_params(params.get(r)), *[_cell(values.get((r, c))) for c in range(len(methods))]])
        return [t]


def _cell(vals: list[float] | None) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
