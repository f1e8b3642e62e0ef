"""The console every command prints through: a terminal's width on a terminal, and wide enough for any
table when stdout is a file or a pipe (a log file must not hold `94.99 ± …` or a results row wrapped
in two, and an epoch line must stay one line)."""

from __future__ import annotations

import sys

from rich.console import Console

__all__ = ["make_console", "heading", "print_table", "LOG_WIDTH"]

LOG_WIDTH = 400  # characters per line when not on a terminal: wider than any table xdsl prints


def make_console(quiet: bool = False, stderr: bool = False) -> Console:
    """A rich Console: on a terminal its own width; otherwise LOG_WIDTH, no colour codes, no live bars."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(quiet=quiet, stderr=stderr)
    # soft_wrap: a printed line is never broken, however long (a warning naming two checkpoint paths)
    return Console(quiet=quiet, stderr=stderr, width=LOG_WIDTH, no_color=True, highlight=False, file=stream,
                   soft_wrap=True)


def heading(console: Console, text: str) -> None:
    """A section heading: a rule across a terminal; in a log, one short line (a rule would be LOG_WIDTH long)."""
    if console.is_terminal:
        console.rule(f"[bold]{text}")
    else:
        console.print(f"── {text} ──")


def print_table(console: Console, table) -> None:
    """Print a rich Table; off a terminal at the width it needs, however wide, so no cell is cut to `…`."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update_width(100_000), table).maximum
    console.print(table, width=max(needed, 1))
