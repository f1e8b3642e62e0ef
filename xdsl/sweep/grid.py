"""Sweep configurations: the cartesian product of `--grid KEY=v1,v2` options (and a grid file).

Keys are the keys of `xdsl run --set` and values its values, so a configuration is a set of `--set`
overrides. Every configuration goes through the same checker `xdsl run --set` uses (the spec compiled
on the meta device with the overrides applied) before any run starts: a typo in the tenth value fails
the sweep at once, not after nine finished runs.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from xdsl.errors import XdslError

__all__ = ["Config", "parse_grid", "read_grid_file", "configurations", "check_configurations"]


@dataclass(frozen=True)
class Config:
    """One point of the grid: `--set` overrides and the directory name they give."""

    values: tuple[tuple[str, str], ...]   # (key, value text) in grid order

    @property
    def overrides(self) -> dict[str, str]:
        return dict(self.values)

    @property
    def name(self) -> str:
        """`lr=0.001,epochs=3`: readable, and safe as a directory name."""
        if not self.values:
            return "base"
        text = ",".join(f"{k}={v}" for k, v in self.values)
        return re.sub(r"[^A-Za-z0-9._=,+\-]", "_", text)


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: `milestones=[30,60],[60,90]` has two values."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["lr=1e-3,3e-3", "epochs=2"]` -> {"lr": ["1e-3", "3e-3"], "epochs": ["2"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, rest = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise XdslError(f"--grid takes KEY=v1,v2,..., got '{item}'", hint="e.g. --grid lr=1e-3,3e-3")
        values = _split_values(rest)
        if any(v == "" for v in values):
            raise XdslError(f"--grid {key}: an empty value in '{rest}'", hint="e.g. --grid lr=1e-3,3e-3")
        if key in grid:
            raise XdslError(f"--grid {key} is given twice", hint="put all its values in one --grid KEY=v1,v2")
        if len(set(values)) != len(values):
            raise XdslError(f"--grid {key}: a value is repeated in '{rest}'")
        grid[key] = values
    return grid


def read_grid_file(path: Path) -> dict[str, list[str]]:
    """A grid file: JSON `{"lr": [0.001, 0.003]}`, or lines of `KEY=v1,v2` (`#` starts a comment)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise XdslError(f"--grid-file '{path}' cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise XdslError(f"{path}:{e.lineno}:{e.colno}: error: invalid JSON: {e.msg}") from None
        items = []
        for key, values in data.items():
            values = values if isinstance(values, list) else [values]
            items.append(f"{key}=" + ",".join(v if isinstance(v, str) else json.dumps(v) for v in values))
        return parse_grid(items)
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    return parse_grid([ln for ln in lines if ln])


def configurations(grid: dict[str, list[str]]) -> list[Config]:
    """Every combination, the first key varying slowest; no grid: one configuration, the spec as written."""
    keys = list(grid)
    return [Config(tuple(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]


def check_configurations(spec: Path, configs: list[Config], fixed: dict[str, str], allow_imports: bool) -> None:
    """Compile the spec on the meta device under each configuration's overrides, as `xdsl run --set` would."""
    from xdsl.experiment import compile_program

    names = [c.name for c in configs]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise XdslError(f"two configurations share the directory name '{sorted(clash)[0]}'",
                        hint="grid values that differ only in characters outside [A-Za-z0-9._=,+-]")
    for config in configs:
        both = set(config.overrides) & set(fixed)
        if both:
            raise XdslError(f"'{sorted(both)[0]}' is both a --grid key and a --set key", hint="give it once")
        try:
            compile_program(spec, device="meta", allow_imports=allow_imports,
                            overrides={**fixed, **config.overrides})
        except XdslError as e:
            if config.values:
                e.message = f"configuration {config.name}: {e.message}"
            raise
