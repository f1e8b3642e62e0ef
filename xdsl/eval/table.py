"""A result table independent of how it is drawn (rich in the terminal, Markdown in reports), and the
cell formats every evaluate item shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Tab", "fmt_acc", "fmt_params", "fmt", "row_label", "part_headers"]


@dataclass
class Tab:
    """Title, column headers, rows of cells, an optional caption and the right-aligned columns."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str | None = None
    numeric: set[int] = field(default_factory=set)

    def to_rich(self, *, no_wrap: bool = False) -> Any:
        """The table as a rich Table (numeric columns right-aligned), for the terminal."""
        from rich.table import Table

        table = Table(title=self.title, caption=self.caption)
        for i, h in enumerate(self.headers):
            table.add_column(h, justify="right" if i in self.numeric else "left", no_wrap=no_wrap)
        for row in self.rows:
            table.add_row(*row)
        return table


def fmt_acc(acc: float | None, status: str | None = None) -> str:
    """0.58798 -> '58.80%'; a row that could not be evaluated shows why."""
    if acc is None:
        return status if status and status != "ok" else "n/a"
    return f"{100.0 * acc:.2f}%"


def fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def row_label(row: Mapping[str, Any]) -> str:
    return str(row.get("label") or row.get("path"))


def part_headers(parts: list[str]) -> list[str]:
    """Column names of the parts: the XML paper's "Up Half | Down Half" for up/down cuts, else Part1..PartP."""
    if [p.lower() for p in parts] == ["up", "down"]:
        return ["Up Half", "Down Half"]
    return [f"Part{i + 1}" for i in range(len(parts))]
