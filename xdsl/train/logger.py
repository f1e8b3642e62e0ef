"""Metrics of a run: rows to metrics.jsonl and metrics.csv (+ TensorBoard when installed); console
output through rich. Only rank 0 writes (`enabled`)."""

from __future__ import annotations

import csv
import json
from typing import Any

from xdsl.console import make_console
from xdsl.rundir import RunDir

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """One row per (train block, epoch, network); resumed runs start from the rows already written."""

    def __init__(self, run: RunDir, quiet: bool, resume: bool, enabled: bool = True):
        self.run, self.quiet, self.enabled = run, quiet, enabled
        self.console = make_console(quiet=quiet)  # full-width lines when stdout is a log file
        self.rows: list[dict[str, Any]] = []
        self.trackers: list[Any] = []                  # mlflow / wandb runs (xdsl.trackers)
        self._steps: dict[tuple[str, int], int] = {}   # (block, epoch) -> a step number that only grows
        if resume and run.metrics_jsonl.exists():
            for line in run.metrics_jsonl.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill; its epoch is redone
                    pass
        self.tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tensorboard))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.run.metrics_jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = self._steps.setdefault((row["stage"], row["epoch"]), len(self._steps) + 1)
        for tracker in self.trackers:
            tracker.log_epoch(row, step)
        if self.tb is not None:
            for k, v in _flat(row).items():
                if isinstance(v, int | float) and k not in ("epoch",):
                    self.tb.add_scalar(f"{row['stage']}/{row['network']}/{k}", v, row["epoch"])

    def truncate(self, stage: str, epoch: int) -> None:
        """Forget rows of `stage` after `epoch` (written before a crash, redone after resume)."""
        self.rows = [r for r in self.rows if not (r["stage"] == stage and r["epoch"] > epoch)]
        if not self.enabled:
            return
        with open(self.run.metrics_jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def write_csv(self) -> None:
        if not self.rows or not self.enabled:
            return
        rows = [_flat(r) for r in self.rows]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(self.run.metrics_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def close(self) -> None:
        self.write_csv()
        if self.tb is not None:
            self.tb.close()


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with its per-term losses as columns `term <text>` (CSV and TensorBoard are flat)."""
    flat = {k: v for k, v in row.items() if k != "terms"}
    flat.update({f"term {t}": v for t, v in (row.get("terms") or {}).items()})
    return flat
