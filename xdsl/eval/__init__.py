"""Evaluation of trained experiments: the `evaluate` items of a spec, their tables, dynamic computation."""

from xdsl.eval.dynamic import best_path, by_budget, pareto_front
from xdsl.eval.evaluate import checkpoint_snapshots, evaluate_items, evaluate_program, find_items
from xdsl.eval.tables import print_results, render_results, results_markdown

__all__ = [
    "evaluate_items",
    "evaluate_program",
    "checkpoint_snapshots",
    "find_items",
    "render_results",
    "results_markdown",
    "print_results",
    "pareto_front",
    "best_path",
    "by_budget",
]
