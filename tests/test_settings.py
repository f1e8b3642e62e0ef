"""Train settings: PyTorch's defaults, one table for checker / macros / `--set`, every resolved value recorded."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import xdsl
from xdsl.cli import app
from xdsl.errors import SpecError
from xdsl.lang import macros
from xdsl.lang.check import check
from xdsl.lang.format import format_spec
from xdsl.lang.parser import parse
from xdsl.lang.settings import OPTIMIZERS, SCHEDULES, SETTINGS, TRAIN_KEYS, resolved_spec
from xdsl.overrides import apply_overrides

H = """data digits(batch_size=32, train_fraction=0.1)
network a, b = builtin.cnn(num_classes=10, in_channels=1, width=4)
"""


def _torch_defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_optimizer_defaults_are_the_torch_classes_defaults(name: str, cls) -> None:
    theirs = _torch_defaults(cls)
    for key, ours in OPTIMIZERS[name].items():
        if key in ("beta1", "beta2"):
            assert ours == theirs["betas"][key == "beta2"]
        else:
            assert ours == theirs[key], key


def test_schedule_defaults_are_the_torch_schedulers_defaults() -> None:
    assert SCHEDULES["step"]["gamma"] == _torch_defaults(torch.optim.lr_scheduler.StepLR)["gamma"]
    assert SCHEDULES["multistep"]["gamma"] == _torch_defaults(torch.optim.lr_scheduler.MultiStepLR)["gamma"]
    with pytest.raises(SpecError, match=r"schedule step\(\) needs every="):
        check(parse(H + "train { minimize ce(a, y) wrt a; schedule step(gamma=0.5) }"))


def test_sgd_with_only_lr_is_torch_sgd_with_only_lr(tmp_path: Path) -> None:
    spec = tmp_path / "s.xspec"
    spec.write_text(H + "train { minimize ce(a, y) wrt a; optimizer sgd(lr=0.1) }")
    opt = xdsl.load(spec).optimizers["a"]
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    reference = torch.optim.SGD([torch.zeros(1)], lr=0.1).param_groups[0]
    for key in ("lr", "momentum", "dampening", "nesterov", "weight_decay"):
        assert group[key] == reference[key], key


def test_adam_keywords_reach_torch(tmp_path: Path) -> None:
    spec = tmp_path / "s.xspec"
    spec.write_text(H + "train { minimize ce(a, y) wrt a\n"
                        "optimizer adam(lr=1e-4, beta2=0.99, eps=1e-6, amsgrad=true) }")
    group = xdsl.load(spec).optimizers["a"].param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["amsgrad"]) == (1e-4, (0.9, 0.99), 1e-6, True)


@pytest.mark.parametrize("setting,message", [
    ("optimizer sgd(lr=0.1, nesterov=true)", "nesterov=true needs momentum > 0 and dampening=0"),
    ("optimizer sgd(lr=0.1, momentum=-1)", "momentum must be >= 0, got -1"),
    ("optimizer adam(beta1=1.5)", "beta1 must be in [0, 1), got 1.5"),
    ("optimizer sgd(nesterov=1)", "nesterov must be true or false, got 1"),
    ("schedule multistep(milestones=[5, 2])", "milestones must be a list of increasing epochs >= 1"),
])
def test_values_torch_would_reject_are_located_errors(setting: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        check(parse(H + f"train {{ minimize ce(a, y) wrt a\n{setting} }}", "t.xspec"))
    assert message in err.value.message and err.value.pos.line == 4


def test_python_booleans_get_a_hint() -> None:
    with pytest.raises(SpecError) as err:
        check(parse(H + "train { minimize ce(a, y) wrt a; optimizer sgd(lr=0.1, momentum=0.9, nesterov=True) }"))
    assert err.value.hint == "booleans are written true"


def test_macros_and_overrides_take_the_checkers_setting_names() -> None:
    assert TRAIN_KEYS == tuple(SETTINGS)
    for name in macros.MACROS.names():
        assert set(TRAIN_KEYS) <= set(macros.MACROS.get(name).params), name


def test_resolved_spec_writes_every_setting_and_checks_again() -> None:
    program = check(parse(H + "dml(a, b, epochs=2)\n"))
    text = format_spec(resolved_spec(program))
    assert ("    optimizer adam(lr=0.001, beta1=0.9, beta2=0.999, eps=1e-08, weight_decay=0.0, amsgrad=false)\n"
            "    epochs 2\n    order alternating\n    schedule none\n    eval_every 1\n") in text
    again = check(parse(text))
    assert again.stages[0].optimizer.kwargs == program.stages[0].optimizer.kwargs


# ---- --set edits the spec before checking ----

def _with(overrides: dict[str, str], text: str = H + "train t { minimize ce(a, y) wrt a; epochs 3 }\n"):
    return check(apply_overrides(parse(text, "s.xspec"), overrides))


def test_set_changes_settings_blocks_data_and_lr() -> None:
    p = _with({"epochs": "5", "order": "simultaneous", "data.batch_size": "8", "lr": "0.5",
               "t.max_steps": "2"})
    (stage,) = p.stages
    assert (stage.epochs, stage.order, stage.settings["max_steps"]) == (5, "simultaneous", 2)
    assert stage.optimizer.kwargs["lr"] == 0.5 and p.data.kwargs["batch_size"] == 8
    assert _with({"optimizer": "sgd(lr=0.1, momentum=0.9)"}).stages[0].optimizer.kwargs["momentum"] == 0.9


def test_set_reaches_blocks_written_by_macros() -> None:
    p = _with({"xml.epochs": "1"}, H.replace("network a, b", "network a, b") + 'cut a, b at "layer2" into up, down\n'
              "xml(a, b, epochs=7)\ndml(a, b, epochs=7)\n")
    assert [s.epochs for s in p.stages] == [1, 7]


@pytest.mark.parametrize("arg,where,message,hint", [
    ("order=simultanous", "1:7", "unknown order 'simultanous'", "did you mean 'simultaneous'?"),
    ("ordr=simultaneous", "1:1", "unknown train setting 'ordr'", "did you mean 'order'?"),
    ("tt.epochs=2", "1:1", "no train block called 'tt'", "did you mean 't'?"),
    ("t.epocs=2", "1:3", "unknown train setting 'epocs'", "did you mean 'epochs'?"),
    ("epochs=2.5", "1:8", "epochs must be an integer >= 1, got 2.5", None),
    ("data.batch_sise=2", "1:6", "dataset 'digits' has no parameter 'batch_sise'", None),
])
def test_a_bad_set_is_the_located_error_a_spec_gets(arg: str, where: str, message: str, hint) -> None:
    key, value = arg.split("=", 1)
    with pytest.raises(SpecError) as err:
        _with({key: value})
    assert str(err.value.pos) == f"--set {arg}:{where}"
    assert err.value.message == message
    if hint:
        assert err.value.hint == hint
    assert err.value.render().splitlines()[1].strip() == arg


def test_run_with_a_misspelt_set_trains_nothing_and_the_run_records_what_ran(tmp_path: Path) -> None:
    spec = tmp_path / "s.xspec"
    spec.write_text(H + "train t { minimize ce(a, y) wrt a; optimizer sgd(lr=0.1); epochs 1; max_steps 2 }\n")
    bad = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "bad"), "--set", "order=simultanous"])
    assert bad.exit_code == 2 and "unknown order 'simultanous'" in bad.output
    assert not (tmp_path / "bad" / "checkpoints").exists()
    out = tmp_path / "ok"
    ok = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--set", "order=simultaneous",
                                  "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert ("train t: optimizer sgd(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=false); "
            "epochs 1; order simultaneous; schedule none; max_steps 2; eval_every 1") in ok.output
    recorded = (out / "spec.xspec").read_text()
    assert "order simultaneous" in recorded and "momentum=0.0" in recorded
    assert check(parse(recorded)).stages[0].order == "simultaneous"
    assert json.loads((out / "results.json").read_text())["stages"]["t"]
