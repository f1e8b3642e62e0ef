"""Evaluation of trained experiments: the `evaluate` items of a spec, their tables, dynamic computation.

Names are imported on first use: the checker imports the item registry (`xdsl.eval.items`), which
must not pull in the engine and the compiler above it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_items": "xdsl.eval.evaluate",
    "evaluate_program": "xdsl.eval.evaluate",
    "checkpoint_snapshots": "xdsl.eval.evaluate",
    "find_items": "xdsl.eval.evaluate",
    "render_results": "xdsl.eval.tables",
    "results_markdown": "xdsl.eval.tables",
    "print_results": "xdsl.eval.tables",
    "pareto_front": "xdsl.eval.dynamic",
    "best_path": "xdsl.eval.dynamic",
    "by_budget": "xdsl.eval.dynamic",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xdsl.eval' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
