"""Re-id runs end to end: `steps N` budgets, the retrieval evaluate item, flatness on the training loss,
and the checks that keep classification items and re-id data apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import xdsl
from xdsl.cli import app
from xdsl.data import build_data
from xdsl.errors import SpecError, SpecErrors
from xdsl.eval.evaluate import evaluate_items
from xdsl.lang.check import check
from xdsl.lang.parser import parse
from xdsl.train.runner import RunOptions, run

SPECS = Path(__file__).resolve().parent.parent / "specs"
REID = """data synthetic_reid(identities=8, test_identities=6, cameras=3, images_per_camera=3, shape=[3, 16, 8],
                    batch_size=16)
network n1, n2 = builtin.cnn(num_classes=8, in_channels=3, width=4)
"""


def _run(tmp_path: Path, text: str, **opts) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "reid.xspec"
    spec.write_text(text)
    return run(spec, RunOptions(out=tmp_path / "run", quiet=True, device="cpu", **opts))


def _rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_steps_budget_trains_exactly_that_many_steps_across_epochs(tmp_path: Path):
    # 72 training images / batch 16 = 5 steps per epoch: 12 steps = two full epochs and 2 steps of a third
    _run(tmp_path, REID + "train b { minimize ce(n1, y) wrt n1; optimizer adam(lr=1e-3); steps 12 }\n")
    rows = [r for r in _rows(tmp_path) if r["network"] == "n1"]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 5), (2, 10), (3, 12)]
    last = torch.load(tmp_path / "run" / "checkpoints" / "b" / "last.pt", weights_only=True)
    assert last["done"] and last["step_count"] == 12


def test_schedules_count_steps_under_a_steps_budget(tmp_path: Path):
    # step(every=4): x0.1 after steps 4, 8 (and 12 would be the next); epochs would have decayed once at most
    _run(tmp_path, REID + "train b { minimize ce(n1, y) wrt n1; optimizer adam(lr=1e-2); steps 11\n"
                          "          schedule step(every=4, gamma=0.1) }\n")
    lrs = [(r["step"], r["lr"]) for r in _rows(tmp_path) if r["network"] == "n1"]
    assert [s for s, _ in lrs] == [5, 10, 11]
    assert [lr for _, lr in lrs] == pytest.approx([1e-3, 1e-4, 1e-4])


def test_epochs_and_steps_together_are_a_located_error():
    with pytest.raises(SpecError) as e:
        check(parse(REID + "train { minimize ce(n1, y) wrt n1; epochs 2; steps 10 }\n", "s.xspec"))
    assert e.value.message == "a train block gives either 'epochs' or 'steps', not both"
    assert (e.value.pos.line, e.value.pos.col) == (4, 46)


def test_set_epochs_replaces_a_steps_budget_and_set_steps_sets_one(tmp_path: Path):
    from xdsl.overrides import apply_overrides

    spec = parse(REID + "train b { minimize ce(n1, y) wrt n1; steps 100000 }\n", "s.xspec")
    quick = check(apply_overrides(spec, {"epochs": "1"})).stages[0]
    assert quick.epochs == 1 and quick.settings["steps"] is None
    assert check(apply_overrides(spec, {"b.steps": "7"})).stages[0].settings["steps"] == 7


@pytest.mark.parametrize("text, message", [
    ("evaluate accuracy", "accuracy() scores a labelled test split, which re-id dataset 'synthetic_reid' does not "
                          "have (its test identities are not its training classes)"),
    ("evaluate retrieval(metric=manhattan)", "retrieval(): unknown metric 'manhattan'"),
    ("evaluate retrieval(ensemble=max)", "retrieval(): unknown ensemble 'max'"),
    ("evaluate retrieval(ranks=[0, 5])", "retrieval(): ranks is a list of integers >= 1, got [0, 5]"),
    ("evaluate flatness(split=\"val\")", "flatness(): split is test or train, got 'val'"),
])
def test_bad_retrieval_items_are_located_errors(text: str, message: str):
    with pytest.raises((SpecError, SpecErrors)) as e:
        check(parse(REID + text + "\n", "s.xspec"))
    assert e.value.message == message and e.value.pos.line == 4


def test_retrieval_on_classification_data_is_a_located_error():
    with pytest.raises(SpecError) as e:
        check(parse("data digits\nnetwork n = builtin.cnn()\nevaluate retrieval(n)\n", "s.xspec"))
    assert e.value.message.startswith("retrieval() needs a re-id dataset") and e.value.pos.line == 3


def test_flatness_on_the_training_loss_matches_cross_entropy_on_the_plain_training_set(tmp_path: Path):
    spec = tmp_path / "f.xspec"
    spec.write_text(REID + 'evaluate flatness(n1, sigmas=[0.0, 0.05, 0.2], draws=2, split="train")\n')
    exp = xdsl.load(spec)
    bundle = build_data("synthetic_reid", dict(exp.program.data.kwargs))
    res = evaluate_items(exp, bundle.test_loader(), exp.program.evaluate, data=bundle)
    (item,) = res["items"]
    rows = {r["sigma"]: r for r in item["rows"]}
    x, y = bundle.train.tensors
    net = exp.networks["n1"].eval()
    with torch.no_grad():
        logits = net(x)
    assert item["split"] == "train"
    assert rows[0.0]["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert rows[0.0]["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert rows[0.0]["loss"] < rows[0.05]["loss"] < rows[0.2]["loss"]  # noise on the weights raises the loss


def test_re_id_spec_runs_and_reports_retrieval_per_network_and_ensemble(tmp_path: Path):
    out = tmp_path / "run"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "run", str(SPECS / "dml_reid_synthetic.xspec"), "--out", str(out), "--device", "cpu", "--set", "steps=20"])
    assert result.exit_code == 0, result.output
    assert "Retrieval: retrieval(n1, n2" in result.output and "results: retrieval Rank-1 (R1) and mAP" in result.output
    results = json.loads((out / "results.json").read_text())
    for block in ("independent", "dml"):
        item = next(i for i in results["stages"][block]["evaluate"]["items"] if i["kind"] == "retrieval")
        labels = [r["label"] for r in item["rows"]]
        assert labels == ["n1", "n2", "ensemble(n1, n2)"] and all(r["status"] == "ok" for r in item["rows"])
        assert all(0.0 < r["mAP"] <= 1.0 and r["rank1"] <= r["rank5"] <= r["rank10"] for r in item["rows"])
        assert item["queries"] == 96 and all(r["queries"] == 96 for r in item["rows"])
    metric_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["test_acc"] is None for r in metric_rows)  # no per-epoch accuracy on re-id data
    assert max(r["step"] for r in metric_rows) == 20


def test_re_id_run_without_evaluate_defaults_to_retrieval(tmp_path: Path):
    results = _run(tmp_path, REID + "train b { minimize ce(n1, y) wrt n1; steps 3 }\n")
    (item,) = results["results"][0]["stages"]["b"]["evaluate"]["items"]
    assert item["kind"] == "retrieval" and [r["label"] for r in item["rows"]] == ["n1", "n2", "ensemble(n1, n2)"]


@pytest.mark.parametrize("evaluate, message", [
    ('retrieval(n1, feature="nowhere")', "retrieval(): feature 'nowhere' is not in n1's part(s) on path n1"),
    ("retrieval(n1.up >> n2.down, feature=\"layer1\")",
     "retrieval(): feature 'layer1' is not in n2's part(s) on path n1.up >> n2.down"),
])
def test_a_retrieval_feature_missing_from_the_path_is_located_at_the_item(tmp_path: Path, evaluate: str,
                                                                          message: str):
    spec = tmp_path / "f.xspec"
    spec.write_text(REID + 'cut n1, n2 at "layer2" into up, down\nevaluate ' + evaluate + "\n")
    result = CliRunner().invoke(app, ["check", str(spec)])
    assert result.exit_code == 2 and f"{spec}:5:10: error: {message}" in result.output, result.output


def test_shipped_market1501_specs_build_and_cut_on_meta():
    for name in ("dml_market1501_mobilenet", "dml_cohort_market1501_mobilenet", "dml_market1501_inception_mobilenet"):
        result = CliRunner().invoke(app, ["check", str(SPECS / f"{name}.xspec")])
        assert result.exit_code == 0, result.output


def test_a_steps_budget_interrupted_mid_epoch_resumes_to_the_same_weights_and_schedule(tmp_path: Path):
    from xdsl.checkpoint import load_checkpoint

    text = (REID + "train b { minimize ce(n1, y) wrt n1; optimizer adam(lr=1e-2); steps 12\n"
            "          schedule step(every=4, gamma=0.5) }\n")
    reference = _run(tmp_path / "whole", text)
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        _run(stopped, text, stop_after_steps=7)  # epoch 2, after its 2nd batch
    state = load_checkpoint(stopped / "run" / "checkpoints" / "b" / "last.pt")
    assert (state["epoch"], state["batch"], state["step_count"]) == (1, 2, 7)
    spec = stopped / "reid.xspec"
    run(spec, RunOptions(out=stopped / "run", quiet=True, device="cpu", resume=True))
    want = load_checkpoint(Path(reference["out"]) / "checkpoints" / "b" / "final.pt")["modules"]
    got = load_checkpoint(stopped / "run" / "checkpoints" / "b" / "final.pt")["modules"]
    assert all(torch.equal(want[k], got[k]) for k in want)
    last = load_checkpoint(stopped / "run" / "checkpoints" / "b" / "last.pt")
    assert last["step_count"] == 12 and last["optimizers"]["n1"]["param_groups"][0]["lr"] == pytest.approx(1e-2 / 8)
