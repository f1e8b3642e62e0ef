"""`xdsl graph` explains the experiment: per block, networks as clusters of their parts, crossed edges
highlighted, detached targets dashed, each term's weight, each objective with the network owning it."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdsl.errors import XdslError
from xdsl.experiment import compile_program
from xdsl.lang.check import check
from xdsl.lang.parser import parse
from xdsl.viz.explain import block_graphs, term_weights, to_dot, to_mermaid

QUICKSTART = Path(__file__).resolve().parent.parent / "specs" / "quickstart.xspec"
KD = Path(__file__).resolve().parent.parent / "specs" / "kd_digits.xspec"


@pytest.fixture(scope="module")
def quickstart():
    return block_graphs(compile_program(QUICKSTART, device="meta"))


def _edges(bg, **flags):
    return {(e.src, e.dst) for e in bg.edges if all(getattr(e, k) == v for k, v in flags.items())}


def test_only_edges_between_networks_are_crossed(quickstart) -> None:
    by_name = {bg.name: bg for bg in quickstart}
    assert _edges(by_name["dml"], crossed=True) == set()
    assert _edges(by_name["xml"], crossed=True) == {("net1.up", "net1.up >> net2.down"),
                                                     ("net2.up", "net2.up >> net1.down")}
    node = by_name["xml"].nodes["net2.up >> net1.down"]
    assert node.network == "net1" and node.label.startswith("net1.down\\non net2.up")


def test_kl_targets_are_dashed_and_predictions_are_not(quickstart) -> None:
    dml = next(bg for bg in quickstart if bg.name == "dml")
    term = "kl(net2.up >> net2.down, net1.up >> net1.down, 1.0, False)"
    assert (("net2.up >> net2.down", term) in _edges(dml, detached=True)
            and ("net1.up >> net1.down", term) in _edges(dml, detached=False))
    assert all(not e.detached for e in dml.edges if e.dst.startswith("ce("))


def test_term_weights_follow_the_objective_arithmetic() -> None:
    program = check(parse("""network a, b = builtin.cnn(num_classes=10, in_channels=1, width=4)
train t { minimize (0.3 * ce(a, y) + kl(b, a) * 2 - ce(a, y, label_smoothing=0.1) / 4) / 2 wrt a }
train u { minimize ce(a, y) * ce(b, y) wrt a }
"""))
    weights = term_weights(program.stages[0].objectives["a"])
    assert sorted(weights.values()) == pytest.approx([-0.125, 0.15, 1.0])
    assert set(term_weights(program.stages[1].objectives["a"]).values()) == {None}  # a product: no weight


def test_objectives_name_their_network_and_frozen_teachers_are_marked() -> None:
    kd = block_graphs(compile_program(KD, device="meta"), ["kd"])
    assert [bg.name for bg in kd] == ["kd"]
    objective = kd[0].nodes["objective student"]
    assert objective.network == "student" and "wrt student" in objective.label
    dot = to_dot(kd)
    assert 'label="teacher (frozen)"' in dot and "style=dashed" in dot and 'label="×1"' in dot
    mermaid = to_mermaid(kd)
    assert mermaid.startswith("flowchart LR") and "-.->" in mermaid and "teacher (frozen)" in mermaid


def test_unknown_block_is_a_clear_error() -> None:
    with pytest.raises(XdslError, match="no train block 'dmlx'"):
        block_graphs(compile_program(QUICKSTART, device="meta"), ["dmlx"])
