"""`error_table`: the run's results as the Born-Again paper lays them out (networks x methods, test error %).

The layout of a known results structure against a hand-written table, the checker's located errors,
the default results table unchanged, and a shipped digits spec end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xdsl.errors import SpecError, SpecErrors
from xdsl.eval.items.error_table import ErrorTable, resolve_layout
from xdsl.eval.summary import run_tables, summary_rows
from xdsl.lang.check import check
from xdsl.lang.parser import parse

ROOT = Path(__file__).resolve().parent.parent

BASE = """data digits(batch_size=32)
network a0, a1, a2 = builtin.cnn(num_classes=10, in_channels=1, width=8)
network b0, b1 = builtin.cnn(num_classes=10, in_channels=1, width=16)
born_again(a0, a1, a2, variant="ban", name=a_gen, epochs=1)
born_again(b0, b1, variant="ban", name=b_gen, epochs=1)
"""
LAYOUT = 'error_table(columns=["Teacher=*_gen0", "BAN-1=*_gen1", "BAN-2=a_gen2", "Ens*2=a_gen2:a1+a2"])'


def _program(evaluate: str):
    return check(parse(BASE + "evaluate " + evaluate + "\n", "t.xspec"))


def _acc_item(accs: dict[str, float]) -> dict:
    return {"kind": "accuracy", "title": "accuracy", "split": "test",
            "rows": [{"path": n, "label": n, "accuracy": a, "params": 100 if n[0] == "a" else 200, "status": "ok"}
                     for n, a in accs.items()]}


def _results(accs: dict[str, dict[str, float]], ens: dict[str, float], layout: dict) -> dict:
    """One seed's results.json: per block, accuracy of every network, the ensemble, the layout item."""
    return {"stages": {block: {"evaluate": {"items": [
        _acc_item(a), {"kind": "ensemble", "title": "ensemble(a1, a2)", "accuracy": ens[block], "members": []},
        {"kind": "error_table", "title": "error_table", "cells": "error", **layout}]}}
        for block, a in accs.items()}}


ACCS = {  # block -> network -> top-1 accuracy after it
    "a_gen0": {"a0": 0.90, "a1": 0.10, "a2": 0.10, "b0": 0.10, "b1": 0.10},
    "a_gen1": {"a0": 0.90, "a1": 0.925, "a2": 0.10, "b0": 0.10, "b1": 0.10},
    "a_gen2": {"a0": 0.90, "a1": 0.925, "a2": 0.9375, "b0": 0.10, "b1": 0.10},
    "b_gen0": {"a0": 0.90, "a1": 0.10, "a2": 0.10, "b0": 0.80, "b1": 0.10},
    "b_gen1": {"a0": 0.90, "a1": 0.10, "a2": 0.10, "b0": 0.80, "b1": 0.8125},
}
ENS = {"a_gen0": 0.1, "a_gen1": 0.5, "a_gen2": 0.95, "b_gen0": 0.1, "b_gen1": 0.1}


def test_layout_of_known_results_is_the_hand_written_table():
    program = _program("accuracy, ensemble(a1, a2), " + LAYOUT)
    layout = resolve_layout(program.evaluate[2].kwargs, program)
    assert layout["networks"] == ["builtin.cnn(width=8)", "builtin.cnn(width=16)"]
    assert layout["methods"] == ["Teacher", "BAN-1", "BAN-2", "Ens*2"]
    (tab,) = run_tables([_results(ACCS, ENS, layout)])
    assert tab.title == "Test error (%) by network and method"
    assert tab.headers == ["Network", "#Params", "Teacher", "BAN-1", "BAN-2", "Ens*2"]
    assert tab.rows == [["builtin.cnn(width=8)", "100", "10.00", "7.50", "6.25", "5.00"],
                        ["builtin.cnn(width=16)", "200", "20.00", "18.75", "-", "-"]]


def test_several_seeds_give_mean_and_std_of_the_error_and_accuracy_cells():
    program = _program("accuracy, ensemble(a1, a2), " + LAYOUT)
    layout = resolve_layout(program.evaluate[2].kwargs, program)
    other = {b: {n: (a - 0.02 if (b, n) == ("a_gen0", "a0") else a) for n, a in accs.items()}
             for b, accs in ACCS.items()}
    (tab,) = run_tables([_results(ACCS, ENS, layout), _results(other, ENS, layout)])
    assert tab.title == "Test error (%), mean ± std over 2 seeds by network and method"
    assert tab.rows[0][2] == "11.00 ± 1.41" and tab.rows[0][3] == "7.50 ± 0.00"
    acc = ErrorTable.run_tables({**layout, "cells": "accuracy"}, [_results(ACCS, ENS, layout)])[0]
    assert acc.rows[1] == ["builtin.cnn(width=16)", "200", "80.00", "81.25", "-", "-"]


def test_default_columns_are_the_blocks_and_the_results_table_is_unchanged():
    program = _program("accuracy, error_table")
    layout = resolve_layout(program.evaluate[1].kwargs, program)
    assert layout["methods"] == ["a_gen0", "a_gen1", "a_gen2", "b_gen0", "b_gen1"]
    with_table = _results(ACCS, ENS, layout)
    without = {"stages": {b: {"evaluate": {"items": r["evaluate"]["items"][:2]}}
                          for b, r in with_table["stages"].items()}}
    assert summary_rows([with_table]) == summary_rows([without])
    assert run_tables([without]) == []


def _error(evaluate: str) -> SpecError:
    with pytest.raises((SpecError, SpecErrors)) as info:
        _program(evaluate)
    err = info.value
    return err.errors[0] if isinstance(err, SpecErrors) else err


@pytest.mark.parametrize(("evaluate", "at", "message", "hint"), [  # `at`: where the caret points
    ('accuracy, error_table(columns=["Teacher=a_gen9"])', '"Teacher=', "no train block is called 'a_gen9'",
     "did you mean 'a_gen"),
    ('accuracy, error_table(columns=["T=a_gen0", "E=a_gen2:a1+a3"])', '"E=', "'a3' is not a network",
     "networks: a0, a1, a2"),
    ('accuracy, error_table(columns=["E=a_gen2:a1+a2"])', '"E=', "the evaluate clause has no ensemble(a1, a2)",
     "add ensemble(a1, a2)"),
    ('accuracy, ensemble(a1, b1), error_table(columns=["E=b_gen1:a1+b1"])', '"E=', "different architectures", None),
    ('accuracy, error_table(columns=["Teacher"])', '"Teacher', 'is not "LABEL=BLOCK"', None),
    ('accuracy, error_table(columns=["T=a_gen0", "T=a_gen1"])', '"T=a_gen1', "two columns are labelled 'T'", None),
    ('accuracy, error_table(columns=["T=a_gen0", "U=*"])', '"U=', "two values for one architecture",
     "LABEL=BLOCK:NET"),
    ('accuracy(b0), error_table(columns=["T=a_gen0"])', '"T=', "no accuracy item of the test set reports 'a0'",
     "add `accuracy`"),
    ('accuracy, error_table(colums=["T=a_gen0"])', 'colums', "has no parameter 'colums'", "did you mean 'columns'?"),
    ('accuracy, error_table(cells="eror")', '"eror', "cells is error or accuracy, got 'eror'", "did you mean 'error'?"),
    ('accuracy, error_table(a0)', 'error_table', "takes no networks", None),
    ('accuracy, eror_table', 'eror_table', "unknown evaluation 'eror_table'", "did you mean 'error_table'?"),
])
def test_checker_rejects_a_bad_layout_at_its_position(evaluate, at, message, hint):
    err = _error(evaluate)
    col = len("evaluate ") + evaluate.index(at) + 1
    assert (err.pos.line, err.pos.col) == (6, col), str(err)
    assert message in err.message
    if hint is not None:
        assert hint in (err.hint or "")
    assert err.render().startswith(f"t.xspec:6:{col}: error:")


def test_shipped_born_again_specs_check_with_their_layout():
    from xdsl.lang.parser import parse_file

    for name in ("born_again_digits", "born_again_wrn_cifar100", "born_again_cifar10", "born_again_cifar10_digits"):
        program = check(parse_file(ROOT / "specs" / f"{name}.xspec"))
        (item,) = [i for i in program.evaluate if i.kind == "error_table"]
        layout = resolve_layout(item.kwargs, program)
        if name.startswith("born_again_cifar10"):  # Table 1: Teacher / BAN per architecture
            assert layout["methods"] == ["Teacher", "BAN"]
            assert len(layout["networks"]) == (8 if name == "born_again_cifar10" else 2)
        else:  # Table 2: one architecture, every method and the BAN ensembles
            assert layout["methods"] == ["Teacher", "BAN-1", "BAN-2", "BAN-3", "BAN+L", "CWTM", "DKPP",
                                         "Ens*2", "Ens*3"]
            assert len(layout["networks"]) == 1


def test_digits_spec_runs_end_to_end_and_prints_the_layout(tmp_path, capsys):
    from xdsl.train.runner import RunOptions, run

    out = tmp_path / "run"
    torch.manual_seed(0)
    run(ROOT / "specs" / "born_again_cifar10_digits.xspec", RunOptions(out=out, quiet=True, epochs=1, device="cpu"))
    printed = capsys.readouterr().out
    assert "Test error (%) by network and method" in printed
    results = json.loads((out / "results.json").read_text())
    (tab,) = run_tables([results])
    assert [r[0] for r in tab.rows] == ["builtin.wrn(depth=10, widen=1)", "builtin.densenet(depth=16, growth=4)"]

    def acc(block: str, net: str) -> float:
        rows = results["stages"][block]["evaluate"]["items"][0]["rows"]
        return next(r["accuracy"] for r in rows if r["label"] == net)

    assert tab.rows[0][2:] == [f"{100 * (1 - acc('wrn_gen0', 'wrn_t')):.2f}",
                               f"{100 * (1 - acc('wrn_gen1', 'wrn_s')):.2f}"]
    assert tab.rows[1][2:] == [f"{100 * (1 - acc('dense_gen0', 'dense_t')):.2f}",
                               f"{100 * (1 - acc('dense_gen1', 'dense_s')):.2f}"]
    assert "by network and method" in (out / "report.html").read_text()
