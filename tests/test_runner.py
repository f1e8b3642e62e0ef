"""`xdsl run` end to end on digits: it learns, writes the documented run directory, prints the
evaluation tables, reports mean +/- std over seeds, and `xdsl eval` reproduces the final numbers."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xdsl.checkpoint import load_checkpoint
from xdsl.cli import app
from xdsl.lang.check import check
from xdsl.lang.parser import parse_file

EPOCHS = 3
SPEC = f"""data digits(batch_size=32, train_fraction=0.5)
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1, width=8)
cut net1, net2 at "layer2" into up, down
dml(net1, net2, epochs={EPOCHS}, optimizer=adam(lr=3e-3))
evaluate accuracy, xross(net1, net2), ensemble(net1, net2)
"""
SEEDS_SPEC = """data digits(batch_size=32, train_fraction=0.3)
network a = builtin.cnn(num_classes=10, in_channels=1, width=4)
train { minimize ce(a, y) wrt a; optimizer sgd(lr=1e-30); epochs 1 }
"""  # lr 1e-30: training moves no weight by more than ~1e-29, so the final weights are the initial ones
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """One short DML run on digits through the CLI: (spec, run directory, printed output)."""
    home = tmp_path_factory.mktemp("runner")
    spec = home / "digits.xspec"
    spec.write_text(SPEC)
    out = home / "run"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return spec, out, result.output


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _item(results: dict, kind: str) -> dict:
    return next(i for i in results["stages"]["dml"]["evaluate"]["items"] if i["kind"] == kind)


def test_a_short_run_learns_digits(digits_run) -> None:
    _, out, _ = digits_run
    results = _results(out)
    accuracy = {r["label"]: r["accuracy"] for r in _item(results, "accuracy")["rows"]}
    assert set(accuracy) == {"net1", "net2"}
    assert all(a > 0.6 for a in accuracy.values()), accuracy  # chance is 0.1
    assert _item(results, "ensemble")["accuracy"] > 0.6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for net in ("net1", "net2"):
        losses = [r["train_loss"] for r in rows if r["network"] == net]
        assert len(losses) == EPOCHS and losses[-1] < losses[0]


def test_run_directory_holds_what_the_docs_list(digits_run) -> None:
    _, out, _ = digits_run
    expected = {"spec.xspec", "metrics.jsonl", "metrics.csv", "results.json", "checkpoints"}
    if HAS_MPL:
        expected |= {"learning_curves.png", "xross.png"}  # equal parameter counts: no acc-vs-params plot
    assert expected <= {p.name for p in out.iterdir()}
    if HAS_MPL:
        for png in out.glob("*.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the spec that ran, macros expanded, is itself a spec that checks to the same train blocks
    program = check(parse_file(out / "spec.xspec"))
    assert [s.name for s in program.stages] == ["dml"] and program.stages[0].epochs == EPOCHS
    assert "dml(" not in (out / "spec.xspec").read_text().split("loss dml(", 1)[0]  # the macro call is gone
    # metrics: one row per (epoch, network), the CSV mirrors the JSONL
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["network"]) for r in rows] == [
        ("dml", e, n) for e in range(1, EPOCHS + 1) for n in ("net1", "net2")]
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["epoch"], r["network"], float(r["test_acc"])) for r in table] == [
        (str(r["epoch"]), r["network"], r["test_acc"]) for r in rows]
    # checkpoints: a finished resumable last.pt and a weights-only final.pt
    last = load_checkpoint(out / "checkpoints" / "dml" / "last.pt")
    assert last["done"] and last["epoch"] == EPOCHS
    final = load_checkpoint(out / "checkpoints" / "dml" / "final.pt")
    assert set(final) == {"modules", "stage", "seed"}  # the seed rebuilds the run's validation split in xdsl eval
    environment = json.loads((out / "environment.json").read_text())
    assert isinstance(final["seed"], int) and final["seed"] == environment["seed"]
    assert final["modules"].keys() == last["modules"].keys()
    assert all(torch.equal(final["modules"][k], last["modules"][k]) for k in final["modules"])


def test_evaluation_tables_are_printed_and_saved(digits_run) -> None:
    _, out, printed = digits_run
    results = _results(out)
    assert [i["kind"] for i in results["stages"]["dml"]["evaluate"]["items"]] == ["accuracy", "xross", "ensemble"]
    xross = _item(results, "xross")
    assert len(xross["rows"]) == 4  # up x down over {net1, net2}
    for title in ("Accuracy", "Xross: xross(net1, net2)", "Ensemble: ensemble(net1, net2)",
                  "results: top-1 test accuracy (%)"):
        assert title in printed
    for row in _item(results, "accuracy")["rows"]:  # the printed table shows the saved numbers
        assert re.search(rf"{row['label']}\s+│\s+{100 * row['accuracy']:.2f}%", printed), row


def test_eval_of_final_checkpoint_reproduces_the_run(digits_run) -> None:
    spec, out, _ = digits_run
    final = out / "checkpoints" / "dml" / "final.pt"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["eval", str(spec), "--checkpoint", str(final), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for row in _item(_results(out), "accuracy")["rows"]:
        assert re.search(rf"{row['label']}\s+│\s+{100 * row['accuracy']:.2f}%", result.output), result.output
    ensemble = _item(_results(out), "ensemble")["accuracy"]
    assert f"{100 * ensemble:.2f}%" in result.output


def test_seeds_report_mean_and_std(tmp_path) -> None:
    spec = tmp_path / "seeds.xspec"
    spec.write_text(SEEDS_SPEC)
    out = tmp_path / "run"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["run", str(spec), "--out", str(out), "--seeds", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"seed0", "seed1", "results.json"}
    combined = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in combined["seeds"]] == [0, 1]
    per_seed = [r["stages"]["train1"]["evaluate"]["items"][0]["rows"][0]["accuracy"] for r in combined["seeds"]]
    assert combined["summary"]["rows"]["train1"]["a"] == per_seed
    assert "mean ± std over 2 seeds" in " ".join(result.output.split())  # the title may wrap anywhere
    cell = f"{100 * statistics.mean(per_seed):.2f} ± {100 * statistics.stdev(per_seed):.2f}"
    assert cell in result.output
    # different seeds start from different weights: with lr 1e-30 the final weights are the initial ones (to
    # ~1e-29), so weights that differ by more than 1e-3 differed at initialisation, not through data order
    w0, w1 = (load_checkpoint(out / f"seed{s}" / "checkpoints" / "train1" / "final.pt")["modules"] for s in (0, 1))
    weights = [k for k in w0 if k.endswith("weight") and w0[k].dim() > 1]
    assert len(weights) >= 3
    for k in weights:
        assert (w0[k] - w1[k]).abs().max() > 1e-3, f"{k}: seeds 0 and 1 started from the same weights"
