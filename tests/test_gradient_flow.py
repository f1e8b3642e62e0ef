"""The checker's gradient-flow rule: a spec that checks trains what it says.

`minimize L wrt s` must be able to send gradient into something `s` owns; a term that cannot is a
located warning naming the likely fix, an objective where no term can is a located error, and
`--strict` makes warnings errors. Every shipped spec passes `--strict`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import xdsl
from xdsl.cli import app
from xdsl.errors import SpecError, XdslWarning
from xdsl.lang.check import check
from xdsl.lang.parser import parse

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.xspec"))

H = """data digits(batch_size=32)
network a, b = builtin.cnn(num_classes=10, in_channels=1, width=4)
cut a, b at "layer2" into up, down
"""  # 3 lines: appended text starts on line 4


def _warnings(text: str) -> list[str]:
    return [w.render() for w in check(parse(text, "t.xspec")).warnings]


def test_kl_with_the_minimised_network_as_target_is_a_located_warning_with_the_swap() -> None:
    (w,) = _warnings(H + "train { minimize ce(a, y) + kl(a, b) wrt a }")
    first = w.splitlines()[0]
    assert first == ("t.xspec:4:29: warning: dead loss term: kl(a, b) sends no gradient into 'a': "
                     "kl's first argument ('target') is the detached target")
    assert "hint: did you mean kl(b, a)? Or write grad=true if the target should learn too." in w


def test_swapped_kl_inside_a_dml_loss_warns_at_the_loss_definition_for_each_network() -> None:
    text = H + ("loss dml(s, T) = 0.5 * ce(s, y) + 0.5 * mean(kl(s, t) for t in T)\n"
                "train { minimize dml(s, peers(s)) wrt s for s in [a, b] }")
    ws = _warnings(text)
    assert [w.splitlines()[0].split(": dead")[0] for w in ws] == ["t.xspec:4:46: warning"] * 2
    assert "kl(a, b) sends no gradient into 'a'" in ws[0] and "did you mean kl(b, a)?" in ws[0]
    assert "kl(b, a) sends no gradient into 'b'" in ws[1]


def test_correct_dml_xml_kd_and_keyword_forms_have_no_warning() -> None:
    text = H + """loss dml(s, T) = 0.5 * ce(s, y) + 0.5 * mean(kl(t, s) for t in T)
loss xm(s, T) = sum(kl(t, t.up >> s.down) + ce(s.up >> t.down, y) for t in T)
train one { minimize dml(s, peers(s)) wrt s for s in [a, b] }
train two { minimize xm(s, peers(s)) + sum(kl(target=t, p=s) for t in peers(s)) wrt s for s in [a, b] }
train three { minimize kd(b, a, y) + kl(ensemble(b), a, T=4) wrt a }
"""
    assert _warnings(text) == []


def test_objective_with_no_path_into_its_network_is_a_located_error() -> None:
    with pytest.raises(SpecError) as err:
        check(parse(H + "train { minimize ce(b, y) wrt a }", "t.xspec"))
    assert str(err.value.pos) == "t.xspec:4:18"
    assert "this objective sends no gradient into 'a'" in err.value.message
    assert "ce(b, y) does not depend on 'a'" in err.value.message


def test_objective_of_only_detached_targets_is_an_error_with_the_swap_hint() -> None:
    with pytest.raises(SpecError) as err:
        check(parse(H + "train { minimize kl(a, b) + hint(b.up, a.up) wrt a }", "t.xspec"))
    assert err.value.hint == "did you mean kl(b, a)? Or write grad=true if the target should learn too."


def test_a_frozen_teacher_path_still_carries_gradient_to_the_part_before_it() -> None:
    # s.up >> t.down with t frozen: gradient flows through t.down's activations into a.up
    assert _warnings(H + "train { minimize ce(a.up >> b.down, y) wrt a }") == []
    with pytest.raises(SpecError):
        check(parse(H + "train { minimize ce(b.up >> b.down, y) wrt a }", "t.xspec"))


def test_an_adapter_counts_as_trainable_only_for_its_owners() -> None:
    text = H + "adapter m = conv1x1() owner {owner}\ntrain {{ minimize l2(b.up >> m, a.up) wrt a }}"
    assert _warnings(text.format(owner="a")) == []
    with pytest.raises(SpecError) as err:
        check(parse(text.format(owner="b"), "t.xspec"))
    assert "l2(b.up >> m, a.up) sends no gradient into 'a'" in err.value.message
    assert err.value.hint.startswith("did you mean l2(a.up, b.up >> m)?")


def test_feature_distance_with_grad_true_trains_the_target_side() -> None:
    assert _warnings(H + "train { minimize ce(a, y) + mse(b.up, a.up, grad=true) wrt a }") == []
    (w,) = _warnings(H + "train { minimize ce(a, y) + mse(b.up, a.up) wrt a }")
    assert "mse(b.up, a.up) sends no gradient into 'a'" in w


def test_a_term_not_involving_the_network_is_a_constant_warning() -> None:
    (w,) = _warnings(H + "train { minimize ce(a, y) + entropy(b) wrt a }")
    assert "entropy(b) does not depend on 'a'" in w and "constant in a's objective" in w


def test_strict_turns_warnings_into_errors_on_the_command_line(tmp_path: Path) -> None:
    spec = tmp_path / "dead.xspec"
    spec.write_text(H + "train { minimize ce(a, y) + kl(a, b) wrt a }")
    ok = CliRunner().invoke(app, ["check", str(spec)])
    assert ok.exit_code == 0, ok.output
    assert f"{spec}:4:29: warning: dead loss term" in ok.output
    strict = CliRunner().invoke(app, ["check", "--strict", str(spec)])
    assert strict.exit_code == 2
    assert f"{spec}:4:29: error: dead loss term" in strict.output and "Traceback" not in strict.output


def test_python_api_issues_spec_warnings_as_xdsl_warnings(tmp_path: Path) -> None:
    spec = tmp_path / "dead.xspec"
    spec.write_text(H + "train { minimize ce(a, y) + kl(a, b) wrt a }")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xdsl.load(spec)
    assert any(issubclass(w.category, XdslWarning) and "kl(a, b)" in str(w.message) for w in caught)


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_passes_strict(spec: Path) -> None:
    from xdsl.lang.parser import parse_file

    check(parse_file(spec), strict=True)


def test_a_dead_term_with_a_scheduled_keyword_is_named_with_its_schedule() -> None:
    """A keyword may be a schedule (`T=1 + epoch / epochs`): the warning quotes it, it does not crash."""
    (w,) = _warnings(H + "train { minimize ce(a, y) + kl(a, b, T=1 + epoch / epochs) wrt a }")
    assert "dead loss term: kl(a, b, T=(1.0 + (epoch / epochs))) sends no gradient into 'a'" in w
    assert "did you mean kl(b, a, T=(1.0 + (epoch / epochs)))?" in w


@pytest.mark.parametrize("objective", ["ce(a, y) + 0 * kl(b, a)", "ce(a, y) + kl(b, a) * 0.0",
                                       "ce(a, y) - 0 * (2 * kl(b, a))", "ce(a, y) + (0 * kl(b, a) + 0 * kl(b, a)) / 4"])
def test_a_term_multiplied_by_the_constant_zero_is_a_dead_term(objective: str) -> None:
    found = _warnings(H + f"train {{ minimize {objective} wrt a }}")
    column = len("train { minimize ") + objective.index("kl") + 1
    assert found and found[0].splitlines()[0] == (
        f"t.xspec:4:{column}: warning: dead loss term: kl(b, a) is multiplied by 0 in a's objective, so it adds "
        "nothing to its gradient")
    assert "hint: remove the term, or give it a weight other than 0" in found[0]


@pytest.mark.parametrize("objective", ["ce(a, y) * 0", "0 * ce(a, y) + 0.0 * kl(b, a)"])
def test_an_objective_whose_every_term_is_multiplied_by_zero_is_an_error(objective: str) -> None:
    with pytest.raises(SpecError, match="sends no gradient into 'a'.*multiplied by 0"):
        check(parse(H + f"train {{ minimize {objective} wrt a }}", "t.xspec"))


@pytest.mark.parametrize("objective", ["ce(a, y) + min(epoch / 20, 1) * kl(b, a)", "ce(a, y) + 0.5 * kl(b, a)",
                                       "ce(a, y) + kl(b, a) / 0.5"])
def test_nonzero_or_scheduled_weights_are_live(objective: str) -> None:
    assert _warnings(H + f"train {{ minimize {objective} wrt a }}") == []
