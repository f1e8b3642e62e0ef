"""Experiment trackers, optional: `xdsl run --mlflow URI` and `--wandb PROJECT`.

Each seed of a run is one tracked run. It receives the settings (spec, seed, overrides, every train
block's optimiser, epochs and order, the data keywords), every epoch's metrics row (train loss, test
accuracy, learning rate and each loss term's epoch mean, named `<block>/<network>/<metric>`), the final
results table (one metric per block and column, plus the table itself) and the run directory's plots
and report as files. The packages are optional extras (`pip install 'xdsl-distill[mlflow]'` /
`'[wandb]'`); asking for a tracker that is not installed is an error before training starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from xdsl.errors import XdslError

__all__ = ["Tracker", "make_trackers", "metric_name", "run_settings"]


def metric_name(*parts: str) -> str:
    """`xml/net1/kl(net2, net1.up >> net2.down)` -> a name both trackers accept (letters, digits, _-./ )."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]+", "_", p).strip("_") for p in parts)


def run_settings(program, seed: int, overrides: dict[str, str]) -> dict[str, Any]:
    """The flat settings a tracker records for a run."""
    settings: dict[str, Any] = {"spec": str(program.file), "seed": seed}
    if program.data is not None:
        settings["data"] = program.data.name
        settings.update({f"data.{k}": v for k, v in program.data.kwargs.items()})
    for stage in program.stages:
        settings[f"{stage.name}.epochs"] = stage.epochs
        settings[f"{stage.name}.order"] = stage.order
        if stage.optimizer is not None:
            settings[f"{stage.name}.optimizer"] = stage.optimizer.name
            settings.update({f"{stage.name}.optimizer.{k}": v for k, v in stage.optimizer.kwargs.items()})
    settings.update({f"set.{k}": v for k, v in overrides.items()})
    return {k: str(v) if isinstance(v, list | tuple | dict) else v for k, v in settings.items()}


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as named numbers."""
    out = {}
    for key in ("train_loss", "test_acc", "train_acc", "val_acc", "lr"):
        if isinstance(row.get(key), int | float):
            out[metric_name(row["stage"], row["network"], key)] = float(row[key])
    for term, value in (row.get("terms") or {}).items():
        out[metric_name(row["stage"], row["network"], "term", term)] = float(value)
    return out


class Tracker:
    """What the runner calls; each backend implements these."""

    def log_epoch(self, row: dict[str, Any], step: int) -> None: ...

    def log_results(self, columns: list[str], rows: dict[str, dict[str, float | None]]) -> None: ...

    def log_files(self, paths: list[Path]) -> None: ...

    def finish(self) -> None: ...


class MlflowTracker(Tracker):
    def __init__(self, uri: str, name: str, settings: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(Path(str(settings["spec"])).stem)
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_params(settings)

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(epoch_metrics(row), step=step)

    def log_results(self, columns: list[str], rows: dict[str, dict[str, float | None]]) -> None:
        self.mlflow.log_metrics({metric_name(block, "final", c): v for block, cells in rows.items()
                                 for c, v in cells.items() if v is not None})
        self.mlflow.log_dict({"columns": columns, "rows": rows}, "results_table.json")

    def log_files(self, paths: list[Path]) -> None:
        for p in paths:
            self.mlflow.log_artifact(str(p))

    def finish(self) -> None:
        self.mlflow.end_run()


class WandbTracker(Tracker):
    def __init__(self, project: str, name: str, settings: dict[str, Any], out: Path):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, config=settings, dir=str(out), reinit="create_new")

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self.run.log(epoch_metrics(row), step=step)

    def log_results(self, columns: list[str], rows: dict[str, dict[str, float | None]]) -> None:
        table = self.wandb.Table(columns=["train block", *columns],
                                 data=[[block, *[cells.get(c) for c in columns]] for block, cells in rows.items()])
        self.run.log({"results": table})
        for block, cells in rows.items():
            for c, v in cells.items():
                if v is not None:
                    self.run.summary[metric_name(block, "final", c)] = v

    def log_files(self, paths: list[Path]) -> None:
        images = {metric_name("plots", p.stem): self.wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            self.run.log(images)
        for p in paths:
            if p.suffix != ".png":
                self.run.save(str(p), base_path=str(p.parent), policy="now")

    def finish(self) -> None:
        self.run.finish()


def check_available(mlflow_uri: str | None, wandb_project: str | None) -> None:
    """Fail before training when a requested tracker's package is missing."""
    import importlib.util

    for wanted, module, extra in ((mlflow_uri, "mlflow", "mlflow"), (wandb_project, "wandb", "wandb")):
        if wanted and importlib.util.find_spec(module) is None:
            raise XdslError(f"--{module} needs the {module} package", hint=f"pip install 'xdsl-distill[{extra}]'")


def make_trackers(mlflow_uri: str | None, wandb_project: str | None, name: str, settings: dict[str, Any],
                  out: Path) -> list[Tracker]:
    """The trackers asked for, each with a run started."""
    check_available(mlflow_uri, wandb_project)
    trackers: list[Tracker] = []
    try:
        if mlflow_uri:
            trackers.append(MlflowTracker(mlflow_uri, name, settings))
        if wandb_project:
            trackers.append(WandbTracker(wandb_project, name, settings, out))
    except Exception as e:  # the tracker's own error (bad URI, no login): say which flag, before training
        for t in trackers:
            t.finish()
        flag = "--wandb" if trackers or not mlflow_uri else "--mlflow"
        raise XdslError(f"{flag}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint="MLflow 3 refuses a plain file store unless MLFLOW_ALLOW_FILE_STORE=true; W&B without "
                             "a login needs WANDB_MODE=offline") from None
    return trackers
