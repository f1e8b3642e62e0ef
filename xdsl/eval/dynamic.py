"""Dynamic computation over Xross paths (the XML paper): pick the best mixed network for a budget.

Rows are Xross/latency result rows: dicts with "accuracy", "params" and optionally "latency_ms";
rows whose accuracy is None (paths that could not be joined) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["pareto_front", "best_path", "by_budget"]

Row = Mapping[str, Any]


def _usable(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.get("accuracy") is not None and r.get("params") is not None]


def pareto_front(rows: Iterable[Row]) -> list[Row]:
    """Rows not dominated in (fewer params, higher accuracy), sorted by #params ascending.

    A row is on the front when every row with at most its #params is less accurate; of equal rows the
    first one given is kept.
    """
    ordered = sorted(enumerate(_usable(rows)), key=lambda ir: (ir[1]["params"], -ir[1]["accuracy"], ir[0]))
    front: list[Row] = []
    best = float("-inf")
    for _, r in ordered:
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def best_path(rows: Iterable[Row], max_params: int | None = None,
              max_latency_ms: float | None = None) -> Row | None:
    """The most accurate row within the budgets (ties: fewer params, then lower latency); None if none fits.

    A latency budget excludes rows without a measured "latency_ms".
    """
    fits = []
    for r in _usable(rows):
        if max_params is not None and r["params"] > max_params:
            continue
        if max_latency_ms is not None and (r.get("latency_ms") is None or r["latency_ms"] > max_latency_ms):
            continue
        fits.append(r)
    if not fits:
        return None
    return min(fits, key=lambda r: (-r["accuracy"], r["params"], r.get("latency_ms") or 0.0))


def by_budget(rows: Iterable[Row], budgets: Iterable[int]) -> list[tuple[int, Row | None]]:
    """`best_path` for each #params budget: the accuracy a deployment gets at each size."""
    rows = list(rows)
    return [(b, best_path(rows, max_params=b)) for b in budgets]
