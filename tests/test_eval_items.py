"""Evaluate items are one class each in one registry: the checker, evaluation, sharded merging and the
tables all take them from there; their paths run through the generated code of `compile.lower`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import xdsl
from xdsl.data import build_data
from xdsl.errors import SpecError
from xdsl.eval import evaluate_program, find_items, results_markdown
from xdsl.eval.engine import Engine
from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.items import EVALUATIONS
from xdsl.eval.sharded import merge_shards
from xdsl.eval.table import Tab
from xdsl.lang.check import check
from xdsl.lang.parser import parse

DATA = "data synthetic(num_classes=10, shape=[1, 8, 8], train_size=64, test_size=80, batch_size=32)\n"
NETS = """network net1, net2 = builtin.cnn(num_classes=10, in_channels=1)
cut net1, net2 at "layer2" into up, down
"""


class FeatureNorm(EvaluateItem):
    """A toy item: mean L2 norm of each path's output over the test set (features of every batch)."""

    name = "feature_norm"
    keywords = {"p": 2.0}

    @classmethod
    def check_keywords(cls, kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
        return None if kwargs["p"] > 0 else ("p", "p must be positive", None)

    def plan(self, job) -> None:
        job.capture_batches = 10**9
        for p in self.paths():
            job.capture.setdefault(str(p), p)

    def compute(self, job) -> Result:
        rows = []
        for p in self.paths():
            feats = torch.cat(job.features[str(p)]).flatten(1)
            rows.append({"path": str(p), "norm": float(feats.norm(p=self.spec.kwargs["p"], dim=1).mean()),
                         "n": len(feats)})
        return self.result(rows=rows)

    @classmethod
    def merge(cls, shards, weights) -> Result:
        out = dict(shards[0])
        out["rows"] = [{**r, "norm": sum(s["rows"][i]["norm"] * w for s, w in zip(shards, weights)) / sum(weights)}
                       for i, r in enumerate(shards[0]["rows"])]
        return out

    @classmethod
    def tables(cls, result) -> list[Tab]:
        return [Tab("Feature norm", ["Path", "Norm"], [[r["path"], f"{r['norm']:.3f}"] for r in result["rows"]])]


@pytest.fixture
def feature_norm(monkeypatch):
    monkeypatch.setitem(EVALUATIONS._items, FeatureNorm.name, FeatureNorm)
    return FeatureNorm


def _load(tmp_path: Path, text: str):
    spec = tmp_path / "spec.xspec"
    spec.write_text(text)
    torch.manual_seed(0)
    exp = xdsl.load(spec)
    return exp, build_data(exp.program.data.name, exp.program.data.kwargs).test_loader()


def test_a_registered_item_is_checked_evaluated_merged_and_drawn(tmp_path, feature_norm):
    exp, loader = _load(tmp_path, DATA + NETS + "evaluate feature_norm(net1.up, net2), accuracy\n")
    results = evaluate_program(exp, loader)
    rows = find_items(results, "feature_norm")[0]["rows"]
    with torch.no_grad():
        exp.set_train_mode(False)
        for row, path in zip(rows, ("net1.up", "net2")):
            direct = torch.cat([exp.forward(path, x).flatten(1) for x, _ in loader]).norm(dim=1).mean()
            assert row["norm"] == pytest.approx(float(direct), rel=1e-5) and row["n"] == 80
    assert "### Feature norm" in results_markdown(results)
    half = {**results, "num_samples": 40}
    merged = merge_shards([half, half])
    assert find_items(merged, "feature_norm")[0]["rows"][0]["norm"] == pytest.approx(rows[0]["norm"])
    assert merged["num_samples"] == 80


def test_the_checker_reads_item_names_and_keywords_from_the_registry(feature_norm):
    program = check(parse(DATA + NETS + "evaluate feature_norm(net1, p=1.0)\n"))
    assert program.evaluate[0].kwargs == {"p": 1.0}
    with pytest.raises(SpecError, match="p must be positive") as err:
        check(parse(DATA + NETS + "evaluate feature_norm(net1, p=-1.0)\n"))
    assert err.value.pos.line == 4
    with pytest.raises(SpecError, match="evaluation 'feature_norm' has no parameter 'q'"):
        check(parse(DATA + NETS + "evaluate feature_norm(net1, q=1.0)\n"))


def test_unregistered_items_are_unknown_to_the_checker():
    with pytest.raises(SpecError, match="unknown evaluation 'feature_norm'"):
        check(parse(DATA + NETS + "evaluate feature_norm(net1)\n"))
    assert EVALUATIONS.names() == ["accuracy", "xross", "ensemble", "entropy", "flatness", "mapping", "latency",
                                   "retrieval", "anytime", "cohort", "ranked", "error_table"]


def test_evaluation_computes_each_shared_prefix_once_in_generated_code(tmp_path):
    exp, _ = _load(tmp_path, DATA + NETS)
    engine = Engine(exp, None, torch.device("cpu"))
    paths = {t: exp.path(t) for t in ("net1.up >> net1.down", "net1.up >> net2.down", "net2.up >> net1.down",
                                      "net2.up >> net2.down", "net1.up")}
    module = engine.generated(paths)
    calls = [n.target for n in module.graph.nodes if n.op == "call_module"]
    assert sorted(calls) == sorted(["parts.net1.up", "parts.net2.up", "parts.net1.down", "parts.net2.down",
                                    "parts.net1.down", "parts.net2.down"])
    x = torch.randn(5, 1, 8, 8)
    exp.set_train_mode(False)
    with torch.no_grad():
        for out, text in zip(module(x), paths):
            torch.testing.assert_close(out, exp.forward(text, x))


@pytest.mark.parametrize("keywords, message", [
    ("sigmas=[-1]", r"sigmas is a non-empty list of noise scales >= 0, got \[-1\]"),
    ("sigmas=[]", r"sigmas is a non-empty list"), ("draws=0", r"draws is an integer >= 1, got 0"),
])
def test_flatness_keywords_out_of_range_are_located_check_errors(keywords, message):
    """A negative noise scale once checked and ran, reported as an 'ok' measurement."""
    with pytest.raises(SpecError, match=message) as err:
        check(parse(DATA + NETS + f"evaluate flatness(net1, {keywords})\n"))
    assert err.value.pos.line == 4
    assert check(parse(DATA + NETS + "evaluate flatness(net1, sigmas=[0, 0.01], draws=2)\n")).evaluate
