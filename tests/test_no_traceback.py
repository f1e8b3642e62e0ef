"""Nothing a spec, a checkpoint or a command line can do gives a Python traceback, and xdsl's own
checkpoints are valid `weights`. Also the smaller front-end promises (--version, did-you-mean for cut
points, one message per error, the unclosed bracket located at the bracket, no-data input shape).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import xdsl
from xdsl import __version__
from xdsl.cli import app
from xdsl.errors import SpecError, SpecErrors, XdslError

SPEC = """data digits(batch_size=32, train_fraction=0.1)
network teacher = builtin.cnn(num_classes=10, in_channels=1, width=8)
network student = builtin.cnn(num_classes=10, in_channels=1, width=4)
cut student at "layer2" into up, down
train pretrain { minimize ce(teacher, y) wrt teacher; epochs 1; max_steps 2 }
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pre")
    (d / "pre.xspec").write_text(SPEC)
    result = CliRunner().invoke(app, ["run", str(d / "pre.xspec"), "--out", str(d / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return d / "run"


def _use(tmp_path: Path, weights: str, width: int = 8, name: str = "teacher") -> Path:
    spec = tmp_path / "use.xspec"
    spec.write_text(f"data digits(batch_size=32, train_fraction=0.1)\n"
                    f'network {name} = builtin.cnn(num_classes=10, in_channels=1, width={width}) weights "{weights}"\n')
    return spec


def test_an_xdsl_checkpoint_is_valid_weights_and_loads_the_network_by_name(run_dir: Path, tmp_path: Path) -> None:
    final = run_dir / "checkpoints" / "pretrain" / "final.pt"
    check = CliRunner().invoke(app, ["check", str(_use(tmp_path, final))])
    assert check.exit_code == 0, check.output
    exp = xdsl.load(_use(tmp_path, final))
    saved = torch.load(final, weights_only=True)["modules"]
    for key, value in exp.networks["teacher"].state_dict().items():
        torch.testing.assert_close(value, saved[f"parts.teacher.all.{key}"])
    # another network of the checkpoint, cut there, by #name
    exp = xdsl.load(_use(tmp_path, f"{final}#student", width=4, name="s"))
    torch.testing.assert_close(exp.networks["s"].state_dict()["fc.weight"], saved["parts.student.down.fc.weight"])


def test_weights_that_do_not_fit_are_check_time_errors_naming_the_networks(run_dir: Path, tmp_path: Path) -> None:
    final = run_dir / "checkpoints" / "pretrain" / "final.pt"
    with pytest.raises(SpecError) as err:
        xdsl.load(_use(tmp_path, f"{final}#nope"))
    assert err.value.message.endswith("holds no network 'nope' (it holds: student, teacher)")
    result = CliRunner().invoke(app, ["check", str(_use(tmp_path, final, width=4))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "do not fit teacher (builtin.cnn): 36 shape(s) differ (stem.0.weight is (8, 1, 3, 3) in the file" \
        in result.output
    with pytest.raises(SpecError, match="holds no network 'net'"):
        xdsl.load(_use(tmp_path, final, name="net"))  # two networks held: the name must match


def test_eval_of_a_directory_or_of_another_specs_checkpoint_says_what_is_wrong(run_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "other.xspec"
    spec.write_text(SPEC.replace("width=8", "width=16"))
    result = CliRunner().invoke(app, ["eval", str(spec), "--checkpoint", str(run_dir / "checkpoints" / "pretrain")])
    assert result.exit_code == 2 and "is a directory, not a checkpoint file" in result.output
    assert f"use {run_dir / 'checkpoints' / 'pretrain' / 'final.pt'}" in result.output
    final = run_dir / "checkpoints" / "pretrain" / "final.pt"
    result = CliRunner().invoke(app, ["eval", str(spec), "--checkpoint", str(final), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "does not fit the spec's modules: 36 shape(s) differ" in result.output


BAD_SPECS = {
    "no_path": SPEC.replace("wrt teacher", "wrt student"),
    "dead_term_strict": SPEC.replace("ce(teacher, y) wrt teacher", "ce(teacher, y) + kl(teacher, student) wrt teacher"),
    "unknown_loss": SPEC.replace("ce(teacher", "cee(teacher"),
    "bad_schedule": SPEC.replace("epochs 1", "schedule step(gamma=0.1)"),
    "python_bool": SPEC.replace("epochs 1", "optimizer sgd(lr=0.1, momentum=0.9, nesterov=True)"),
    "weights_missing": SPEC.replace("width=8)", 'width=8) weights "nothere.pt"'),
    "weights_not_torch": SPEC.replace("width=8)", 'width=8) weights "garbage.pt"'),
    "unclosed": SPEC + "loss f(s) = (ce(s, y)\n",
    "binary": "\x00\x01",
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
@pytest.mark.parametrize("command", [["check", "--strict"], ["compile", "--json"], ["graph"], ["expand"],
                                     ["run", "--device", "cpu", "-q"]])
def test_bad_specs_give_a_message_and_never_a_traceback(name: str, command: list[str], tmp_path: Path) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    spec = tmp_path / f"{name}.xspec"
    spec.write_text(BAD_SPECS[name])
    args = [*command, str(spec)] + (["--out", str(tmp_path / "run")] if command[0] == "run" else [])
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    if command[0] == "expand" and name not in ("unclosed", "binary"):
        return  # expand only parses
    if name == "dead_term_strict" and command[0] != "check":
        assert result.exit_code == 0 and "warning: dead loss term" in result.output, result.output
        return  # a warning unless --strict
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)


def test_python_api_raises_xdsl_errors(tmp_path: Path) -> None:
    spec = tmp_path / "s.xspec"
    spec.write_text("data digits(batch_size=32)\n"
                    "network a = builtin.cnn(num_classes=10, in_channels=1, width=4)\n"
                    "network b = builtin.cnn(num_classes=10, in_channels=1, width=8)\n"
                    'cut a, b at "layer2" into up, down\n'
                    "train { minimize ce(a, y) wrt a }\n")
    exp = xdsl.load(spec)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    cases = [
        lambda: exp.forward("a.up >> b.down", x),             # widths 4 -> 8 without an adapter
        lambda: exp.forward("a.up >>", x),                    # syntax
        lambda: exp.forward("c", x),                          # unknown network
        lambda: exp.forward("a", torch.randn(4, 3, 8, 8)),    # wrong channels
        lambda: exp.objectives(x, y.float()),                 # float labels
        lambda: exp.train_step(x, y[:2]),                     # batch sizes differ
        lambda: exp.use_stage("nope"),
        lambda: xdsl.load(tmp_path / "missing.xspec"),
    ]
    for case in cases:
        with pytest.raises(XdslError) as err:
            case()
        assert err.value.message
    assert "a.up >> b.down cannot run" in _message(cases[0])
    empty = tmp_path / "empty.xspec"
    empty.write_text("data digits()\nnetwork a = builtin.cnn(num_classes=10, in_channels=1, width=4)\n")
    with pytest.raises(XdslError, match="no train block"):
        xdsl.load(empty, device="cpu").train_step(x, y)


def _message(case) -> str:
    try:
        case()
    except XdslError as e:
        return e.message
    return ""


def test_version_option_prints_the_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"xdsl {__version__}"


def test_cut_point_suggestion_prefers_the_module_written_like_it(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        xdsl.load(_write(tmp_path, "data digits()\nnetwork a = builtin.cnn(num_classes=10, in_channels=1)\n"
                                   'cut a at "layer_2" into u, d\n'))
    assert err.value.hint == "did you mean 'layer2'?"


def test_the_same_error_in_three_objectives_is_reported_once(tmp_path: Path) -> None:
    text = ("network a, b, c = builtin.cnn(num_classes=10, in_channels=1)\n"
            "loss f(s) = ce(s, y) + kl(s, zz)\n"
            "train { minimize f(s) wrt s for s in [a, b, c] }\n")
    with pytest.raises(SpecError) as err:  # one SpecError, not SpecErrors of three copies
        xdsl.load(_write(tmp_path, text))
    assert not isinstance(err.value, SpecErrors) and "undefined name 'zz'" in err.value.message


def test_a_spec_without_data_says_the_input_shape_was_assumed(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        xdsl.load(_write(tmp_path, "network a = builtin.cnn(num_classes=10, in_channels=1)\n"), device="meta")
    assert "the spec has no 'data' statement, so the input shape is unknown and (3, 224, 224) was assumed" \
        in err.value.message
    assert err.value.hint.startswith("add the data statement")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.xspec"
    path.write_text(text)
    return path
