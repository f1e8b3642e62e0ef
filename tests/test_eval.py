"""Evaluator: every number equals a direct computation with exp.forward; weights and modes are untouched."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl.data import build_data
from xdsl.eval import (
    best_path,
    by_budget,
    evaluate_items,
    evaluate_program,
    find_items,
    pareto_front,
    render_results,
    results_markdown,
)
from xdsl.eval.evaluate import checkpoint_snapshots
from xdsl.lang import ir
from xdsl.shapes import param_count as path_params

DATA = "data synthetic(num_classes=10, shape=[1, 8, 8], train_size=256, test_size=128, batch_size=32)\n"
SPEC2 = DATA + """
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1)
cut net1, net2 at "layer2" into up, down
xml(net1, net2, epochs=1, optimizer=adam(lr=1e-3))
evaluate accuracy, xross(net1, net2), ensemble(net1, net2), entropy, flatness(sigmas=[0.0, 0.05], draws=2)
"""
SPEC3 = DATA + """
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1)
cut net1, net2 at "layer1", "layer2" into p1, p2, p3
evaluate xross(net1, net2), mapping(net1, net2), latency(net1, net2, repeats=2), accuracy(net1.p1)
"""
SPEC_ADAPT = DATA + """
network net1 = builtin.cnn(num_classes=10, in_channels=1, width=8)
network net2 = builtin.cnn(num_classes=10, in_channels=1, width=16)
cut net1, net2 at "layer2" into up, down
adapter a12 = conv1x1(relu=true) owner net1
evaluate xross(net1, net2), accuracy(net1.up >> a12 >> net2.down)
"""
SPEC_SNAP = DATA + """
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1)
cut net1, net2 at "layer2" into up, down
evaluate xross(net1@1, net2), accuracy(net1@1)
"""


def _load(tmp_path: Path, text: str, name: str = "spec.xspec"):
    spec = tmp_path / name
    spec.write_text(text)
    torch.manual_seed(0)
    exp = xdsl.load(spec)
    data = build_data(exp.program.data.name, exp.program.data.kwargs)
    return exp, data.test_loader()


def _direct(exp, loader, path: str) -> tuple[float, float]:
    """Accuracy and mean CE of one path, the plain way."""
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            z = exp.forward(path, x)
            correct += int((z.argmax(1) == y).sum())
            loss += float(F.cross_entropy(z, y, reduction="sum"))
            n += len(y)
    return correct / n, loss / n


def _state(exp) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in exp.compiled.root.state_dict().items()}


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory):
    exp, loader = _load(tmp_path_factory.mktemp("spec2"), SPEC2)
    exp.set_train_mode(True)
    for x, y in loader:  # a few steps so that the networks differ from chance and from each other
        exp.train_step(x, y)
    exp.set_train_mode(False)
    before = _state(exp)
    exp.set_train_mode(True)
    results = evaluate_program(exp, loader)
    return exp, loader, results, before


def test_results_are_json(two_parts):
    _, _, results, _ = two_parts
    assert json.loads(json.dumps(results)) == results
    assert results["num_samples"] == 128 and results["num_batches"] == 4
    assert [i["kind"] for i in results["items"]] == ["accuracy", "xross", "ensemble", "entropy", "flatness"]


def test_modes_and_weights_restored(two_parts):
    exp, _, _, before = two_parts
    assert all(m.training for m in exp.networks["net1"].modules())  # was set_train_mode(True) before
    after = exp.compiled.root.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_accuracy_matches_direct(two_parts):
    exp, loader, results, _ = two_parts
    exp.set_train_mode(False)
    rows = find_items(results, "accuracy")[0]["rows"]
    assert [r["label"] for r in rows] == ["net1", "net2"]
    for r in rows:
        acc, loss = _direct(exp, loader, r["path"])
        assert r["accuracy"] == pytest.approx(acc)
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        assert r["params"] == sum(p.numel() for p in exp.networks[r["label"]].parameters())
    exp.set_train_mode(True)


def test_xross_two_parts(two_parts):
    exp, loader, results, _ = two_parts
    exp.set_train_mode(False)
    item = find_items(results, "xross")[0]
    assert item["parts"] == ["up", "down"]
    assert [r["networks"] for r in item["rows"]] == [["net1", "net1"], ["net1", "net2"], ["net2", "net1"],
                                                     ["net2", "net2"]]
    for r in item["rows"]:
        assert r["status"] == "ok"
        assert r["path"] == f"{r['networks'][0]}.up >> {r['networks'][1]}.down"
        assert r["accuracy"] == pytest.approx(_direct(exp, loader, r["path"])[0])
    cross = item["rows"][1]
    parts = exp.compiled.root.parts
    expected = sum(p.numel() for p in parts["net1"]["up"].parameters()) + \
        sum(p.numel() for p in parts["net2"]["down"].parameters())
    assert cross["params"] == expected
    exp.set_train_mode(True)


def test_ensemble_and_entropy(two_parts):
    exp, loader, results, _ = two_parts
    exp.set_train_mode(False)
    item = find_items(results, "ensemble")[0]
    correct, n, ent = 0, 0, {"net1": 0.0, "net2": 0.0}
    with torch.no_grad():
        for x, y in loader:
            probs = [F.softmax(exp.forward(net, x), 1) for net in ("net1", "net2")]
            correct += int(((probs[0] + probs[1]) / 2).argmax(1).eq(y).sum())
            n += len(y)
            for net, p in zip(("net1", "net2"), probs):
                ent[net] += float(-(p * p.log()).sum())
    assert item["accuracy"] == pytest.approx(correct / n)
    assert [m["label"] for m in item["members"]] == ["net1", "net2"]
    for r in find_items(results, "entropy")[0]["rows"]:
        assert r["entropy"] == pytest.approx(ent[r["label"]] / n, rel=1e-4)
    exp.set_train_mode(True)


def test_flatness(two_parts):
    _, _, results, _ = two_parts
    item = find_items(results, "flatness")[0]
    acc = {r["label"]: r["accuracy"] for r in find_items(results, "accuracy")[0]["rows"]}
    rows = {(r["label"], r["sigma"]): r for r in item["rows"]}
    assert set(rows) == {(n, s) for n in ("net1", "net2") for s in (0.0, 0.05)}
    for net in ("net1", "net2"):
        assert rows[(net, 0.0)]["accuracy"] == acc[net]
        assert rows[(net, 0.05)]["status"] == "ok" and 0.0 <= rows[(net, 0.05)]["accuracy"] <= 1.0


def test_flatness_deterministic_and_noisy(two_parts):
    exp, loader, _, _ = two_parts
    item = ir.EvalItem("flatness", (), {"sigmas": [0.5], "draws": 1}, None)
    a = evaluate_items(exp, loader, [item], max_batches=1)["items"][0]["rows"]
    b = evaluate_items(exp, loader, [item], max_batches=1)["items"][0]["rows"]
    assert a == b
    clean = evaluate_items(exp, loader, [ir.EvalItem("accuracy", (), {}, None)], max_batches=1)
    assert a[0]["loss"] != clean["items"][0]["rows"][0]["loss"]  # noise of sigma 0.5 changes the loss


def test_tables_render(two_parts):
    from rich.console import Console

    _, _, results, _ = two_parts
    console = Console(record=True, width=140, file=io.StringIO())
    for table in render_results(results):
        console.print(table)
    text = console.export_text()
    for header in ("Up Half", "Down Half", "Accuracy", "#Params", "ensemble", "sigma"):
        assert header in text
    md = results_markdown(results)
    assert "| Up Half | Down Half | Accuracy | #Params |" in md
    for r in find_items(results, "xross")[0]["rows"]:  # each row with its own numbers, params with separators
        up, down = r["networks"]
        assert f"| {up} | {down} | {100 * r['accuracy']:.2f}% | {r['params']:,} |" in md, md
    assert "| net1 | net2 | " in md and "75,002 |" in md


def test_three_parts(tmp_path):
    exp, loader = _load(tmp_path, SPEC3)
    results = evaluate_program(exp, loader)
    exp.set_train_mode(False)
    item = find_items(results, "xross")[0]
    assert len(item["rows"]) == 8 and item["parts"] == ["p1", "p2", "p3"]
    assert len({tuple(r["networks"]) for r in item["rows"]}) == 8
    for r in item["rows"]:
        assert r["accuracy"] == pytest.approx(_direct(exp, loader, r["path"])[0])
        steps = exp.path(r["path"]).steps
        parts = exp.compiled.root.parts
        assert r["params"] == path_params([parts[s.net][s.part] for s in steps])
    latency = find_items(results, "latency")[0]
    assert len(latency["rows"]) == 8 and all(r["latency_ms"] > 0 for r in latency["rows"])
    assert best_path(latency["rows"], max_latency_ms=1e9) is not None
    mapping = find_items(results, "mapping")[0]["rows"]
    assert [m["after"] for m in mapping] == ["p1", "p2"]
    assert all(m["status"] == "ok" and m["gale"] >= m["original"] - 1e-9 for m in mapping)
    feature = find_items(results, "accuracy")[0]["rows"][0]
    assert feature["accuracy"] is None and "not logits" in feature["status"]
    from rich.console import Console

    console = Console(record=True, width=140, file=io.StringIO())
    for table in render_results(results):
        console.print(table)
    text = console.export_text()
    assert "Part1" in text and "Part3" in text


def test_xross_adapters_and_shapes(tmp_path):
    exp, loader = _load(tmp_path, SPEC_ADAPT)
    results = evaluate_program(exp, loader, max_batches=2)
    rows = {tuple(r["networks"]): r for r in find_items(results, "xross")[0]["rows"]}
    assert rows[("net1", "net2")]["adapters"] == ["a12"]
    assert rows[("net1", "net2")]["path"] == "net1.up >> a12 >> net2.down"
    acc = find_items(results, "accuracy")[0]["rows"][0]
    assert rows[("net1", "net2")]["accuracy"] == acc["accuracy"]
    parts, adapters = exp.compiled.root.parts, exp.compiled.root.adapters
    assert rows[("net1", "net2")]["params"] == path_params([parts["net1"]["up"], adapters["a12"],
                                                            parts["net2"]["down"]])
    assert rows[("net2", "net1")]["accuracy"] is None
    assert rows[("net2", "net1")]["status"].startswith("n/a (shapes")
    assert rows[("net1", "net1")]["status"] == "ok"


def test_snapshots(tmp_path):
    exp, loader = _load(tmp_path, SPEC_SNAP)
    no_snap = evaluate_program(exp, loader, max_batches=1)
    row = find_items(no_snap, "accuracy")[0]["rows"][0]
    assert row["accuracy"] is None and "net1@1" in row["status"]
    # a checkpoint as the trainer writes it, holding other weights than the live networks
    root = exp.compiled.root
    other = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() and "running" not in k else v
             for k, v in root.parts.state_dict().items()}
    ckpt = tmp_path / "run" / "checkpoints" / "train1" / "epoch1.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"modules": {"parts": other, "adapters": {}}}, ckpt)
    live = _state(exp)
    res = evaluate_program(exp, loader, snapshot_state=checkpoint_snapshots(tmp_path / "run"))
    assert all(torch.equal(live[k], v) for k, v in root.state_dict().items())
    rows = {tuple(r["networks"]): r for r in find_items(res, "xross")[0]["rows"]}
    assert all(r["status"] == "ok" for r in rows.values())
    # direct: load the snapshot into the live network, evaluate, then put the weights back
    root.parts.load_state_dict(other)
    exp.set_train_mode(False)
    expected = _direct(exp, loader, "net1")[0]
    root.load_state_dict(live)
    assert find_items(res, "accuracy")[0]["rows"][0]["accuracy"] == pytest.approx(expected)
    assert rows[("net1@1", "net1@1")]["accuracy"] == pytest.approx(expected)


# ---- dynamic computation on hand-made rows ----

ROWS = [
    {"networks": ["a", "a"], "accuracy": 0.60, "params": 100, "latency_ms": 5.0},
    {"networks": ["a", "b"], "accuracy": 0.55, "params": 60, "latency_ms": 3.0},
    {"networks": ["b", "a"], "accuracy": 0.58, "params": 80, "latency_ms": 4.0},
    {"networks": ["b", "b"], "accuracy": 0.50, "params": 40, "latency_ms": 2.0},
    {"networks": ["c", "c"], "accuracy": 0.52, "params": 90, "latency_ms": 1.0},
    {"networks": ["x", "y"], "accuracy": None, "params": None, "status": "n/a (shapes)"},
]


def test_pareto_front():
    front = pareto_front(ROWS)
    assert [r["params"] for r in front] == [40, 60, 80, 100]
    assert pareto_front([]) == []


def test_best_path():
    assert best_path(ROWS)["params"] == 100
    assert best_path(ROWS, max_params=90)["params"] == 80
    assert best_path(ROWS, max_params=70)["params"] == 60
    assert best_path(ROWS, max_params=10) is None
    assert best_path(ROWS, max_latency_ms=2.5)["accuracy"] == 0.52
    assert best_path(ROWS, max_params=50, max_latency_ms=1.5) is None
    assert [r and r["params"] for _, r in by_budget(ROWS, [50, 1000])] == [40, 100]


# ---- plots ----

def test_plots(tmp_path, two_parts):
    pytest.importorskip("matplotlib")
    from xdsl.viz.plots import plot_acc_vs_params, plot_learning_curves, plot_xross, plot_xross_heatmap

    _, _, results, _ = two_parts
    metrics = [{"stage": st, "epoch": e, "network": n, "train_loss": 2.0 / e, "test_acc": 0.1 * e}
               for st in ("a", "b") for e in (1, 2, 3) for n in ("net1", "net2")]
    out = [plot_learning_curves(metrics, tmp_path / "curves.png"),
           plot_xross_heatmap(results, tmp_path / "xross.png"),
           plot_xross({"a": results, "b": results}, tmp_path / "xross_blocks.png", chance=0.1)]
    three = {"kind": "xross", "parts": ["p1", "p2", "p3"], "networks": ["a", "b"],
             "rows": [{"networks": list(n), "accuracy": 0.5, "params": 10 * len(set(n))} for n in
                      (("a", "a", "a"), ("a", "b", "a"))] + [{"networks": ["b", "b", "b"], "accuracy": None}]}
    out.append(plot_xross_heatmap(three, tmp_path / "xross3.png"))
    out.append(plot_acc_vs_params(three, tmp_path / "acc_params.png"))
    for f in out:
        assert f is not None and f.exists() and f.read_bytes()[:4] == b"\x89PNG"


def test_accuracy_vs_params_is_drawn_only_where_parameter_counts_differ(tmp_path):
    pytest.importorskip("matplotlib")
    from xdsl.viz.plots import plot_acc_vs_params

    same = {"kind": "xross", "parts": ["up", "down"], "networks": ["a", "b"],
            "rows": [{"networks": [u, d], "accuracy": 0.5, "params": 100} for u in "ab" for d in "ab"]}
    assert plot_acc_vs_params(same, tmp_path / "same.png") is None and not (tmp_path / "same.png").exists()


def test_learning_curves_leave_out_networks_a_block_does_not_train(tmp_path):
    pytest.importorskip("matplotlib")
    from xdsl.viz.plots import _series

    rows = [{"stage": "kd", "epoch": e, "network": n, "train_loss": 1.0, "test_acc": 0.5, "trained": n == "student"}
            for e in (1, 2) for n in ("teacher", "student")]
    assert list(_series(rows)) == [("kd", "student")]


def test_xross_links_parts_through_the_current_blocks_adapters(tmp_path):
    """After a block, its own adapters are the trained link between the parts, not another block's."""
    from xdsl.eval.paths import xross_combinations

    spec = tmp_path / "links.xspec"
    spec.write_text("""data synthetic(num_classes=10, shape=[1, 8, 8], train_size=64, test_size=32, batch_size=16)
network net1 = builtin.cnn(num_classes=10, in_channels=1, width=8)
network net2 = builtin.cnn(num_classes=10, in_channels=1, width=16)
cut net1, net2 at "layer2" into up, down
adapter a12 = conv1x1() owner net1
adapter b12 = conv1x1() owner net1, net2
train one { minimize ce(net1.up >> a12 >> net2.down, y) wrt net1 }
train both { minimize ce(net1.up >> b12 >> net2.down, y) wrt net1 }
""")
    exp = xdsl.load(spec)
    for stage, adapter in (("one", "a12"), ("both", "b12")):
        exp.use_stage(stage)
        _, combos = xross_combinations(exp, ["net1", "net2"])
        cross = next(c for c in combos if c.networks == ["net1", "net2"])
        assert cross.adapters == [adapter]
