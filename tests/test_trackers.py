"""Experiment trackers: `xdsl run --mlflow URI` (a local file store) and `--wandb PROJECT` (offline mode)
record settings, per-epoch metrics with per-term losses, the results table and the plots; skipped when
the optional package is not installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.trackers import metric_name

SPEC = """data digits(batch_size=64, train_fraction=0.1)
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1, width=4)
cut net1, net2 at "layer2" into up, down
dml(net1, net2, epochs=2, optimizer=adam(lr=3e-3))
evaluate accuracy, xross(net1, net2)
"""


def test_metric_names_keep_block_network_and_term_readable() -> None:
    assert metric_name("xml", "net1", "term", "kl(net2, net1.up >> net2.down)") == \
        "xml/net1/term/kl_net2_ net1.up _ net2.down"


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    spec = tmp_path / "t.xspec"
    spec.write_text(SPEC)
    out = tmp_path / "run"
    result = CliRunner(env=env).invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu", "-q", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed "
                                                                        "(pip install 'xdsl-distill[mlflow]')")
def test_mlflow_file_store_gets_settings_epochs_terms_results_and_plots(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    out = _run(tmp_path, "--mlflow", store, env={"MLFLOW_ALLOW_FILE_STORE": "true"})
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.data.params["seed"] == "0" and run.data.params["dml.epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "dml/net1/test_acc")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in history] == [r["test_acc"] for r in rows if r["network"] == "net1"]
    assert any(k.startswith("dml/net1/term/kl") for k in run.data.metrics)
    results = json.loads((out / "results.json").read_text())
    net1 = next(i for i in results["stages"]["dml"]["evaluate"]["items"] if i["kind"] == "accuracy")["rows"][0]
    assert run.data.metrics["dml/final/net1"] == pytest.approx(net1["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curves.png", "xross.png", "report.html", "results_table.json"} <= artifacts


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed "
                                                                       "(pip install 'xdsl-distill[wandb]')")
def test_wandb_offline_run_gets_settings_results_and_plots(tmp_path: Path) -> None:
    out = _run(tmp_path, "--wandb", "xdsl-test", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    [run_dir] = (out / "wandb").glob("offline-run-*")
    records = next(run_dir.glob("run-*.wandb")).read_bytes()  # W&B's offline log: protobuf records
    for key in (b"dml.epochs", b"dml/net1/test_acc", b"dml/net1/term/kl", b"dml/final/net1"):
        assert key in records, key  # a setting, an epoch metric, a per-term loss, a final result
    files = run_dir / "files"
    assert {"report.html", "results.json"} <= {p.name for p in files.iterdir()}
    assert list((files / "media" / "images").rglob("learning_curves*.png"))
    [table] = (files / "media" / "table").glob("results*.table.json")
    assert json.loads(table.read_text())["columns"][:3] == ["train block", "net1", "net2"]
