"""Evaluate items the seeds' tables need: `cohort` (mean +/- std over a block's members, the DML
paper's Fig. 2) and `anytime` (per-classifier accuracy, #params and latency, BYOT's table)."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

import xdsl
from xdsl.data import build_data
from xdsl.eval.evaluate import evaluate_program
from xdsl.eval.items import EVALUATIONS

DATA = "data synthetic(num_classes=10, shape=[1, 8, 8], train_size=64, test_size=48, batch_size=16)\n"


def _load(tmp_path: Path, text: str):
    path = tmp_path / "s.xspec"
    path.write_text(DATA + text)
    exp = xdsl.load(path)
    bundle = build_data(exp.program.data.name, exp.program.data.kwargs)
    return exp, bundle


def _accuracy(exp, net: str, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        exp.networks[net].eval()
        for x, y in loader:
            correct += int((exp.networks[net](x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def test_cohort_reports_the_blocks_members_and_their_mean_and_std(tmp_path):
    exp, bundle = _load(tmp_path, "network a, b, c = builtin.cnn(num_classes=10, in_channels=1, width=4)\n"
                                  "dml(a, b, name=two)\ndml(a, b, c, name=three)\nevaluate cohort, cohort(a, c)\n")
    for stage, members in (("two", ["a", "b"]), ("three", ["a", "b", "c"])):
        exp.use_stage(stage)
        items = evaluate_program(exp, bundle.test_loader())["items"]
        by_block, explicit = items
        accs = [_accuracy(exp, n, bundle.test_loader()) for n in members]
        assert [r["path"] for r in by_block["rows"]] == members
        assert abs(by_block["mean"] - statistics.mean(accs)) < 1e-9
        assert abs(by_block["std"] - statistics.stdev(accs)) < 1e-9
        assert [r["path"] for r in explicit["rows"]] == ["a", "c"]
        cols = EVALUATIONS.get("cohort").columns(by_block, 3)
        assert cols == {"cohort mean": by_block["mean"], "cohort std": by_block["std"]}


def test_anytime_times_each_head_and_reports_its_accuracy_and_params(tmp_path):
    exp, bundle = _load(tmp_path, """network net = builtin.cnn(num_classes=10, in_channels=1, width=4)
cut net at "layer1", "layer2", "pool" into s1, s2, s3, fc
byot(net, head="sepconv")
evaluate anytime(net.s1 >> net_neck1 >> net_fc1, net.s2 >> net_neck2 >> net_fc2, net, repeats=2)
""")
    exp.use_stage("byot")
    (item,) = evaluate_program(exp, bundle.test_loader())["items"]
    rows = item["rows"]
    assert [r["label"] for r in rows][-1] == "net" and len(rows) == 3
    assert all(r["latency_ms"] > 0 for r in rows)
    head1 = list(exp.parts["net"]["s1"].parameters()) + list(exp.adapters["net_neck1"].parameters()) \
        + list(exp.adapters["net_fc1"].parameters())
    assert rows[0]["params"] == sum(p.numel() for p in head1)
    assert rows[2]["params"] == sum(p.numel() for p in exp.networks["net"].parameters())
    assert abs(rows[2]["accuracy"] - _accuracy(exp, "net", bundle.test_loader())) < 1e-9
