"""Measurements on the training set (`split="train"`) and the ranked posterior (`ranked(k=5)`): the
DML paper's Figure 3 measures entropy and the top-5 posterior on the training data, seed 000 reports
training accuracy. Each number equals the same quantity computed by hand on the unaugmented train set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl.data import build_data
from xdsl.errors import SpecError
from xdsl.eval.evaluate import evaluate_program
from xdsl.eval.items import EVALUATIONS
from xdsl.lang.check import check
from xdsl.lang.parser import parse

SPEC = """data synthetic(num_classes=12, shape=[1, 8, 8], train_size=64, test_size=48, batch_size=16)
network a, b = builtin.cnn(num_classes=12, in_channels=1, width=4)
dml(a, b)
evaluate accuracy, accuracy(split="train"), entropy(a, split="train"), ranked(a, b, k=5), ranked(b, split="train", k=3)
"""


def _by_hand(exp, net: str, loader, k: int) -> dict:
    logits = torch.cat([exp.networks[net](x) for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    p = F.softmax(logits, 1)
    return {"accuracy": float((logits.argmax(1) == y).double().mean()),
            "entropy": float(-(p * p.log()).sum(1).double().mean()),
            "ranked": p.topk(k, 1).values.double().mean(0).tolist()}


def test_train_split_and_ranked_equal_hand_computations(tmp_path: Path):
    (tmp_path / "s.xspec").write_text(SPEC)
    exp = xdsl.load(tmp_path / "s.xspec")
    exp.use_stage("dml")
    bundle = build_data(exp.program.data.name, exp.program.data.kwargs)
    for net in exp.networks.values():
        net.eval()
    acc_test, acc_train, ent_train, ranked_test, ranked_train = evaluate_program(
        exp, bundle.test_loader(), data=bundle)["items"]
    with torch.no_grad():
        test = {n: _by_hand(exp, n, bundle.test_loader(), 5) for n in ("a", "b")}
        train = {n: _by_hand(exp, n, bundle.plain_train_loader(), 5) for n in ("a", "b")}
    for row in acc_test["rows"]:
        assert row["accuracy"] == pytest.approx(test[row["path"]]["accuracy"])
    assert acc_train["split"] == "train" and len(acc_train["rows"]) == 2
    for row in acc_train["rows"]:
        assert row["accuracy"] == pytest.approx(train[row["path"]]["accuracy"])
    assert ent_train["rows"][0]["entropy"] == pytest.approx(train["a"]["entropy"], rel=1e-5)
    for row in ranked_test["rows"]:
        assert row["ranked"] == pytest.approx(test[row["path"]]["ranked"], rel=1e-5)
    assert ranked_train["rows"][0]["ranked"] == pytest.approx(train["b"]["ranked"][:3], rel=1e-5)
    # the summary keeps test accuracy and adds training accuracy beside it
    cols = EVALUATIONS.get("accuracy").columns(acc_train, 2)
    assert set(cols) == {"a train", "b train", "a train top-5", "b train top-5"}  # 12 classes: top-5 too
    tables = EVALUATIONS.get("ranked").tables(ranked_test)
    assert tables[0].headers == ["Path", "#1", "#2", "#3", "#4", "#5"]


@pytest.mark.parametrize("item, message", [
    ('accuracy(split="val")', "split is test or train"),
    ("ranked(k=0)", "k is a whole number >= 1"),
    ('entropy(split="tarin")', "split is test or train"),
])
def test_bad_split_and_k_are_located_errors(item, message):
    text = SPEC.rsplit("evaluate", 1)[0] + f"evaluate {item}\n"
    with pytest.raises(SpecError, match=message) as info:
        check(parse(text, "s.xspec"))
    assert info.value.pos.line == 4
