"""Bad input never crashes xdsl: every malformed spec is one located message, exit code 2, no traceback.

Also: a fuzz property over mutations of every shipped spec, and the security rules (spec text is
data, user code only from beside the spec or with --allow-imports, checkpoints load with
weights_only=True, relative spec paths stay inside the spec's directory).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.errors import XdslError
from xdsl.lang.check import check
from xdsl.lang.parser import parse

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
SHIPPED = sorted(SPECS_DIR.glob("*.xspec"))

H = """data digits(batch_size=32)
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1, width=8)
cut net1, net2 at "layer2" into up, down
"""  # 3 lines: errors in appended text are on line 4


def _t(objective: str) -> str:
    return f"train {{ minimize {objective} wrt net1 }}"


TWO_WIDTHS = """data digits(batch_size=32)
network net1 = builtin.cnn(num_classes=10, in_channels=1, width=8)
network net2 = builtin.cnn(num_classes=10, in_channels=1, width=16)
cut net1, net2 at "layer2" into up, down
"""

# (id, spec text or bytes, "line:col", exact message, exact hint or None)
CASES: list[tuple[str, str | bytes, str, str, str | None]] = [
    # ---- syntax ----
    ("syntax_missing_name", H + "network = builtin.cnn()", "4:9", "unexpected '='; expected a name", None),
    ("syntax_unclosed_paren", H + "loss f(s) = (ce(s, y)", "4:13", "'(' is never closed",
     "add the matching ')'; the statement runs on to the end of the file"),
    ("syntax_unclosed_paren_before_next_statement", H + "loss f(s) = (ce(s, y)\ntrain { minimize f(net1) wrt net1 }",
     "4:13", "'(' is never closed", "add the matching ')'; the statement runs on to line 5"),
    ("syntax_reserved_word", H + "network train = builtin.cnn()", "4:9", "unexpected 'train'; expected a name",
     "'train' is a reserved word; choose another name"),
    ("syntax_python_call", H + "network n = __import__('os').system('touch pwned')", "4:24",
     "unexpected character \"'\"; expected '(', ')', '*', '+', ',', '-', '.', '/', ...", None),
    ("syntax_python_import", "import os\n" + H, "1:8", "unexpected name 'os'; expected '('", None),
    ("syntax_cut_without_into", H.replace(" into up, down", ""), "3:27",
     "unexpected end of file; expected ',', 'into'", None),
    ("syntax_unterminated_string", 'data cifar10(root="data/cifar\n', "1:19", "unterminated string",
     'a string ends with " on the same line'),
    ("syntax_positional_after_keyword", H + "train { minimize kl(net1, T=2, net2) wrt net2 }", "4:32",
     "positional argument after keyword argument", None),
    ("syntax_data_positional", "data digits(32)", "1:13", "data takes keyword arguments only (name=value)", None),
    ("syntax_missing_wrt", H + "train { minimize ce(net1, y) }", "4:30", "unexpected '}'; expected 'wrt'", None),
    # ---- names ----
    ("name_undefined", H + _t("ce(nett1, y)"), "4:21", "undefined name 'nett1'", "did you mean 'net1'?"),
    ("name_duplicate", H + "network net1 = builtin.cnn()", "4:1", "'net1' is already defined as a network", None),
    ("name_unknown_loss", H + _t("cee(net1, y)"), "4:18", "unknown loss or function 'cee'", "did you mean 'ce'?"),
    ("name_unknown_dataset", "data digitz()", "1:1", "unknown dataset 'digitz'", "did you mean 'digits'?"),
    ("name_unknown_torchvision_model", "network n = torchvision.resnet19(num_classes=10)", "1:1",
     "unknown torchvision model 'torchvision.resnet19'", "did you mean 'torchvision.resnet18'?"),
    ("name_unknown_builtin_model", "network n = builtin.cnnn()", "1:1", "unknown builtin model 'builtin.cnnn'",
     "did you mean 'builtin.cnn'?"),
    ("name_cut_of_undefined_network", H + 'cut net3 at "layer2" into a, b', "4:1",
     "cut of undefined network 'net3'", "did you mean 'net2'?"),
    ("name_adapter_owner", H + "adapter a = conv1x1() owner net3", "4:1", "adapter owner 'net3' is not a network",
     "did you mean 'net2'?"),
    ("name_adapter_kind", H + "adapter a = conv5x5() owner net1", "4:1", "unknown adapter kind 'conv5x5'",
     "did you mean 'conv3x3'?"),
    ("name_unknown_evaluation", H + "evaluate acuracy", "4:10", "unknown evaluation 'acuracy'",
     "did you mean 'accuracy'?"),
    ("name_unknown_macro", H + "xmll(net1, net2)", "4:1", "unknown statement or macro 'xmll'", "did you mean 'xml'?"),
    ("name_after_unknown_block", H + "train b after a { minimize ce(net1, y) wrt net1 }", "4:1",
     "'after a': no earlier train block is called 'a'", None),
    ("name_unknown_part", H + _t("ce(net1.upp >> net2.down, y)"), "4:21", "network 'net1' has no part 'upp'",
     "did you mean 'up'?"),
    ("name_part_of_uncut_network", "network n = builtin.cnn()\ntrain { minimize ce(n.up, y) wrt n }", "2:21",
     "network 'n' is not cut, so it has no part 'up'", 'add: cut n at "layer2" into up, down'),
    # ---- types ----
    ("type_labels_expected", H + _t("ce(net1, net2)"), "4:27", "ce(): 'y' takes the labels y, got a network", None),
    ("type_number_expected", H + "train { minimize kl(net1, net2, T=net1) wrt net2 }", "4:35",
     "kl(): 'T' takes a number, got a network", None),
    ("type_list_expected", H + "loss f(s, T) = mean(kl(t, s) for t in T)\ntrain { minimize f(net1, net2) wrt net1 }",
     "4:39", "'for t in ...' needs a list, got a network", None),
    ("type_network_in_arithmetic", H + _t("ce(net1, y) + net2"), "4:32",
     "'+' needs losses or numbers, but its right side is a network", "wrap a path in a loss, e.g. ce(path, y)"),
    ("type_len_of_network", H + _t("ce(net1, y) / len(net1)"), "4:36", "len() takes a list, got a network", None),
    ("type_wrt_a_loss", H + "train { minimize ce(net1, y) wrt ce(net1, y) }", "4:34",
     "'wrt' takes a network, got a loss", None),
    ("type_features_not_logits", H + _t("ce(net1.up, y)"), "4:21",
     "ce(): 'p' needs logits, but net1.up ends inside net1 (features, not logits)",
     "continue the path to the last part, e.g. ... >> net1.down"),
    ("type_batch_size_string", 'data digits(batch_size="big")', "1:24", "batch_size must be an integer >= 1", None),
    # ---- shapes ----
    ("shape_widths_without_adapter", TWO_WIDTHS + _t("ce(net1.up >> net2.down, y)"), "5:18",
     "shape mismatch in path net1.up >> net2.down: net1.up gives (2, 16, 4, 4), but net2.down expects (2, 32, 4, 4)",
     "put an adapter between them, e.g. `adapter a = conv1x1(relu=true) owner net2`"),
    ("shape_mismatch_in_evaluate_only", TWO_WIDTHS + "evaluate accuracy(net1.up >> net2.down)", "5:10",
     "shape mismatch in path net1.up >> net2.down: net1.up gives (2, 16, 4, 4), but net2.down expects (2, 32, 4, 4)",
     "put an adapter between them, e.g. `adapter a = conv1x1(relu=true) owner net2`"),
    ("shape_input_channels", "data digits(batch_size=32)\nnetwork n = builtin.cnn(num_classes=10, in_channels=3)",
     "2:1", "n: module cannot take a tensor of shape (2, 1, 8, 8): RuntimeError: Given groups=1, weight of size "
     "[16, 3, 3, 3], expected input[2, 1, 8, 8] to have 3 channels, but got 1 channels instead",
     "its input is a batch of the data's samples, each (1, 8, 8): the model's input keywords (in_features=, "
     "in_channels=, ...) must fit it"),
    ("shape_path_not_consecutive", H + _t("ce(net1.down >> net2.down, y)"), "4:21",
     "path net1.up >> net1.down >> net2.down is not consecutive: net2.down is part 2 of net2, but part 3 must come "
     "after net1.down", None),
    # ---- cut points ----
    ("cut_inside_residual_block",
     'data cifar10()\nnetwork n = torchvision.resnet18(num_classes=10)\ncut n at "layer2.0.conv1" into a, b', "3:1",
     "cannot cut n (torchvision.resnet18): cut at 'layer2.0.conv1' leaves 2 live tensors crossing the boundary "
     "(layer1_1_relu_1, layer2_0_conv1): cut at a block boundary such as 'layer2.0' or 'layer2'",
     "a part takes one tensor; a cut inside a residual block also cuts its skip connection"),
    ("cut_unknown_point",
     'data cifar10()\nnetwork n = torchvision.resnet18(num_classes=10)\ncut n at "layer22" into a, b', "3:1",
     "cannot cut n (torchvision.resnet18): unknown cut point 'layer22' in ResNet", "did you mean 'layer2'?"),
    ("cut_part_count", H.replace("into up, down", "into up, mid, down"), "3:1",
     "1 cut point(s) make 2 parts, but 3 part name(s) are given", None),
    ("cut_twice", H + 'cut net1 at "layer1" into a, b', "4:1", "network 'net1' is already cut (at {f}:3:1)", None),
    ("cut_points_repeated", 'network n = builtin.cnn()\ncut n at "layer1", "layer1" into a, b, c', "2:1",
     "cut points must be distinct", None),
    # ---- numbers ----
    ("number_epochs_negative", H + "train { minimize ce(net1, y) wrt net1; epochs -3 }", "4:47",
     "epochs must be an integer >= 1, got -3", None),
    ("number_epochs_fractional", H + "train { minimize ce(net1, y) wrt net1; epochs 2.5 }", "4:47",
     "epochs must be an integer >= 1, got 2.5", None),
    ("number_lr_zero", H + "train { minimize ce(net1, y) wrt net1; optimizer adam(lr=0) }", "4:58",
     "lr must be a number > 0, got 0", None),
    ("number_overflows_to_inf", H + "train { minimize ce(net1, y) wrt net1; optimizer adam(lr=1e999) }", "4:58",
     "number 1e999 is too large", None),
    ("number_division_by_zero", H + _t("ce(net1, y) / 0"), "4:32", "division by zero", None),
    ("number_temperature_zero", H + "train { minimize kl(net1, net2, T=0) wrt net2 }", "4:35",
     "kl(): T must be > 0, got 0.0", None),
    ("number_batch_size_zero", "data digits(batch_size=0)", "1:24", "batch_size must be an integer >= 1", None),
    ("number_width_zero", "network n = builtin.cnn(width=0)", "1:1", "width must be a positive integer, got 0", None),
    ("number_grad_clip_negative", H + "train { minimize ce(net1, y) wrt net1; grad_clip -1 }", "4:50",
     "grad_clip must be > 0, got -1", None),
    # ---- unknown options ----
    ("option_unknown_setting", H + "train { minimize ce(net1, y) wrt net1; epoch 3 }", "4:40",
     "unknown train setting 'epoch'", "did you mean 'epochs'?"),
    ("option_unknown_optimizer_keyword", H + "train { minimize ce(net1, y) wrt net1; optimizer adam(lrr=1e-3) }",
     "4:55", "optimizer 'adam' has no parameter 'lrr'", "did you mean 'lr'?"),
    ("option_unknown_schedule", H + "train { minimize ce(net1, y) wrt net1; schedule stepp(every=3) }", "4:49",
     "unknown schedule 'stepp'", "did you mean 'step'?"),
    ("option_unknown_model_keyword", "network n = builtin.cnn(widht=16)", "1:1",
     "builtin.cnn got an unknown keyword argument 'widht'", "did you mean 'width'?"),
    ("option_unknown_evaluation_keyword", H + "evaluate flatness(sigma=[0.1])", "4:19",
     "evaluation 'flatness' has no parameter 'sigma'", "did you mean 'sigmas'?"),
    ("option_unknown_order", H + "train { minimize ce(net1, y) wrt net1; order alternatng }", "4:46",
     "unknown order 'alternatng'", "did you mean 'alternating'?"),
    ("option_unknown_data_parameter", "data digits(batchsize=32)", "1:13",
     "dataset 'digits' has no parameter 'batchsize'", "did you mean 'batch_size'?"),
    # ---- files ----
    ("file_binary", b"network n = builtin.cnn()\n\x00\x01\x02\xff", "2:1",
     "spec contains a NUL byte: is this a binary file?", None),
    ("file_huge", b"# padding\n" * 110_000, "1:1", "spec is larger than the limit of 1,000,000 bytes",
     "a spec is a page of text; is this the right file?"),
    ("file_latin1", "data digits()\n# café\n".encode("latin-1"), "2:6",
     "spec is not valid UTF-8 (byte 0xe9 at offset 19)", "save the file as UTF-8"),
    ("file_tab_indented", H + "train {\n\tminimize cee(net1, y) wrt net1 }", "5:11",
     "unknown loss or function 'cee'", "did you mean 'ce'?"),
]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def _assert_clean_failure(result, first_line: str | None = None) -> list[str]:
    """Exit code 2, one message, no traceback; returns the output lines."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    if first_line is not None:
        assert lines[0] == first_line, result.output
    return lines


def test_the_table_has_at_least_40_cases_with_distinct_ids() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name,content,where,message,hint", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_one_located_message(tmp_path: Path, name, content, where, message, hint) -> None:
    spec = tmp_path / f"{name}.xspec"
    if isinstance(content, bytes):
        spec.write_bytes(content)
    else:
        spec.write_text(content, encoding="utf-8")
    f = str(spec)
    lines = _assert_clean_failure(_invoke(["check", f]), f"{f}:{where}: error: {message.replace('{f}', f)}")
    if hint is not None:
        assert f"  hint: {hint}" in lines
    else:
        assert not any(line.startswith("  hint:") for line in lines)
    if isinstance(content, bytes):  # not readable as text (binary, huge, not UTF-8): nothing to quote
        assert len(lines) == 1 + (hint is not None), lines
        return
    line, col = (int(n) for n in where.split(":"))
    assert lines[1] == "    " + content.splitlines()[line - 1].expandtabs(1), lines  # the line (a tab = 1 col)
    assert lines[2] == " " * (4 + col - 1) + "^", lines  # and a caret under the column


@pytest.mark.parametrize("text", ["", "\n\n   \n", "# only a comment\n# and another\n"], ids=["empty", "blank",
                                                                                          "comments"])
def test_empty_spec_is_valid_and_has_nothing_to_do(tmp_path: Path, text: str) -> None:
    """Decision: a spec with no statements checks fine (exit 0) but cannot be run (no data), exit 2."""
    spec = tmp_path / "empty.xspec"
    spec.write_text(text)
    result = _invoke(["check", str(spec)])
    assert result.exit_code == 0, result.output
    assert result.output == f"ok: {spec}: 0 networks, 0 parts, 0 adapters, 0 train blocks, 0 loss terms\n"
    result = _invoke(["run", str(spec), "--out", str(tmp_path / "run")])
    _assert_clean_failure(result, "error: the spec has no 'data' statement, so it cannot be run")


def test_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path: Path) -> None:
    spec = tmp_path / "windows.xspec"
    spec.write_bytes(b"\xef\xbb\xbf" + H.replace("\n", "\r\n").encode())
    result = _invoke(["check", str(spec)])
    assert result.exit_code == 0, result.output
    spec.write_bytes(b"\xef\xbb\xbf" + (H + _t("cee(net1, y)")).encode())  # positions ignore the BOM
    _assert_clean_failure(_invoke(["check", str(spec)]), f"{spec}:4:18: error: unknown loss or function 'cee'")


def test_missing_unreadable_and_device_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.xspec"
    _assert_clean_failure(_invoke(["check", str(missing)]),
                          f"error: cannot read spec '{missing}': No such file or directory")
    _assert_clean_failure(_invoke(["check", str(tmp_path)]), f"error: cannot read spec '{tmp_path}': Is a directory")
    if Path("/dev/zero").exists():  # an endless file is refused after reading a bounded prefix
        _assert_clean_failure(_invoke(["check", "/dev/zero"]),
                              "/dev/zero:1:1: error: spec is larger than the limit of 1,000,000 bytes")


def test_missing_dataset_directory_fails_run_before_training(tmp_path: Path) -> None:
    spec = tmp_path / "cifar.xspec"
    spec.write_text('data cifar10(root="nowhere/cifar")\nnetwork n = builtin.cnn(in_channels=3, width=4)\n'
                    "train { minimize ce(n, y) wrt n; epochs 1 }\n")
    assert _invoke(["check", str(spec)]).exit_code == 0  # check does not read data
    out = tmp_path / "run"
    root = tmp_path / "nowhere" / "cifar"
    lines = _assert_clean_failure(_invoke(["run", str(spec), "--out", str(out)]))
    assert lines[0].startswith(f"{spec}:1:1: error: dataset 'cifar10' not found: directory {root} does not exist "
                               "(root='nowhere/cifar' is resolved against the spec file's directory)"), lines[0]
    assert any("hint: download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in line for line in lines)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


CLI_MISUSE = [
    (["check", "--frobnicate", "{spec}"], "No such option: --frobnicate"),
    (["run", "{spec}", "--out", "{out}", "--epochs", "many"], "Invalid value for '--epochs'"),
    (["run", "{spec}", "--out", "{out}", "--set", "lr"], "error: --set takes key=value, got 'lr'"),
    (["run", "{spec}", "--out", "{out}", "--set", "data.batchsize=3"],
     "--set data.batchsize=3:1:6: error: dataset 'digits' has no parameter 'batchsize'"),
    (["run", "{spec}", "--out", "{out}", "--set", "epochs=0"],
     "--set epochs=0:1:8: error: epochs must be an integer >= 1, got 0"),
    (["run", "{spec}", "--out", "{out}", "--set", "data.batch_size=__import__('os').getpid()"],
     "--set data.batch_size=__import__('os').getpid():1:17: error: batch_size must be an integer >= 1"),
    (["run", "{spec}", "--out", "{out}", "--amp", "fp8"], "error: --amp: unknown value 'fp8'"),
    (["eval", "{spec}"], "Missing option '--checkpoint'"),
    (["graph", "{spec}", "--format", "gif"], "error: unknown format 'gif'"),
]


@pytest.mark.parametrize("args,message", CLI_MISUSE, ids=["unknown_option", "epochs_not_a_number", "set_without_value",
                                                          "set_unknown_data_key", "set_bad_epochs", "set_code",
                                                          "unknown_amp", "eval_without_checkpoint",
                                                          "unknown_graph_format"])
def test_command_line_misuse_is_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    spec = tmp_path / "ok.xspec"
    spec.write_text(H + "train { minimize ce(net1, y) wrt net1; epochs 1 }\n")
    args = [a.format(spec=spec, out=tmp_path / "run") for a in args]
    lines = _assert_clean_failure(_invoke(args))
    assert any(message in line for line in lines), lines
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- fuzzing: mutations of every shipped spec give a program or an xdsl error, nothing else ----

PIECES = list("()[]{},.=+-*/>@#\"'\n ;:0123456789_$\\") + [
    "net1", "net2", "up", "down", ">>", "for", "in", "wrt", "minimize", "train", "loss", "ce", "kl", "y", "x",
    "peers", "1e-4", "-3", "0", "1e999", "after", "owner", "weights", "at", "cut", "network", "data", "evaluate",
    "adapter", "true", "false", "sum(", "mean(", "len(", "ensemble(", "xross(", "dml(", "xml(", "kd(", "epochs",
    "order", "optimizer", "schedule", "@3", "T=0", '"layer2"', '"a:b"', "__import__('os')", "\x00", "é", "\ufeff",
]


@st.composite
def _mutation(draw, text: str) -> str:
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate_line", "drop_line"]))
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(1, 12)))
        if op == "insert":
            text = text[:i] + draw(st.sampled_from(PIECES)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "replace":
            text = text[:i] + draw(st.sampled_from(PIECES)) + text[j:]
        else:
            lines = text.split("\n")
            k = draw(st.integers(0, len(lines) - 1))
            lines = lines[:k] + lines[k:k + 1] * (2 if op == "duplicate_line" else 0) + lines[k + 1:]
            text = "\n".join(lines)
    return text


def _parse_check(text: str):
    try:
        return check(parse(text, "fuzz.xspec"))
    except XdslError as e:  # SpecError and SpecErrors are XdslErrors
        assert e.render()
        return None


def test_there_are_shipped_specs_to_fuzz() -> None:
    assert len(SHIPPED) >= 6


@pytest.mark.parametrize("spec", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_mutated_shipped_spec_gives_a_program_or_an_xdsl_error(spec: Path) -> None:
    text = spec.read_text()
    assert _parse_check(text) is not None  # the unmutated spec checks

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_mutation(text))
    def fuzz(mutated: str) -> None:
        _parse_check(mutated)

    fuzz()


SMALL_SPECS = [p for p in SHIPPED if re.search(r"^data (digits|synthetic)\b", p.read_text(), re.M)]


@pytest.mark.skipif(not SMALL_SPECS, reason="no shipped spec on digits/synthetic data")
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SMALL_SPECS).flatmap(lambda p: _mutation(p.read_text()).map(lambda t: (p, t))))
def test_mutated_small_specs_assemble_on_meta_or_give_an_xdsl_error(case) -> None:
    from xdsl.compile.assemble import assemble

    spec, text = case
    program = _parse_check(text)
    if program is None:
        return
    try:
        assemble(program, device="meta", spec_dir=spec.parent)
    except XdslError as e:
        assert e.render()


# ---- security ----

INJECTIONS = [
    "network n = __import__('os').system('touch {marker}')",
    'data digits(batch_size=__import__("os").system("touch {marker}"))',
    'loss f(s) = eval("open(\'{marker}\', \'w\')")\ntrain {{ minimize f(n) wrt n }}',
    'network n = builtin.cnn(width=exec("touch {marker}"))',
    "# {marker}\nnetwork n = builtin.cnn()\nimport os; os.system('touch {marker}')",
]


@pytest.mark.parametrize("template", INJECTIONS, ids=["import_call", "dunder_in_kwarg", "eval_loss", "exec_kwarg",
                                                      "statement"])
def test_spec_text_is_never_evaluated(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.xspec"
    spec.write_text(template.format(marker=marker))
    lines = _assert_clean_failure(_invoke(["check", str(spec)]))
    assert re.match(rf"{re.escape(str(spec))}:\d+:\d+: error: ", lines[0]), lines[0]
    assert not marker.exists()


BESIDE = """
from torch import nn


def make(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
"""


def test_user_model_beside_the_spec_is_imported(tmp_path: Path) -> None:
    (tmp_path / "hardening_beside_nets.py").write_text(BESIDE)
    spec = tmp_path / "user.xspec"
    spec.write_text('data digits()\nnetwork n = "hardening_beside_nets:make"(num_classes=10)\n')
    result = _invoke(["check", str(spec)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {spec}: 1 networks")


def test_installed_module_needs_allow_imports(tmp_path: Path) -> None:
    spec = tmp_path / "user.xspec"
    spec.write_text('network n = "collections:OrderedDict"()\n')
    lines = _assert_clean_failure(_invoke(["check", str(spec)]),
                                  f"{spec}:1:1: error: model 'collections:OrderedDict' needs Python module "
                                  "'collections', which is not beside the spec file")
    assert lines[-1] == ("  hint: put collections.py (or the package folder collections/) next to the spec, or pass "
                         "--allow-imports to import installed modules (this runs their code)")
    # with the flag the module is imported; OrderedDict() is then refused for what it returns, not where it lives
    _assert_clean_failure(_invoke(["check", str(spec), "--allow-imports"]),
                          f"{spec}:1:1: error: collections:OrderedDict returned OrderedDict, not a torch.nn.Module")


def test_module_on_sys_path_but_not_beside_the_spec_is_refused(tmp_path: Path, monkeypatch) -> None:
    lib, here = tmp_path / "lib", tmp_path / "spec"
    lib.mkdir()
    here.mkdir()
    marker = tmp_path / "imported"
    (lib / "hardening_elsewhere_nets.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + BESIDE)
    monkeypatch.syspath_prepend(str(lib))
    spec = here / "user.xspec"
    spec.write_text('network n = "hardening_elsewhere_nets:make"()\n')
    _assert_clean_failure(_invoke(["check", str(spec)]))
    _assert_clean_failure(_invoke(["run", str(spec), "--out", str(tmp_path / "run")]))
    assert not marker.exists() and "hardening_elsewhere_nets" not in sys.modules


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    from xdsl.checkpoint import load_checkpoint, load_latest

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"modules": {}, "stage": "x", "payload": _Payload(marker)}, evil)
    with pytest.raises(XdslError) as err:
        load_checkpoint(evil)
    assert re.fullmatch(rf"checkpoint '{re.escape(str(evil))}' refers to the Python object (posix|nt)\.system; "
                        "refused: checkpoints load with weights_only=True and hold only tensors and plain data",
                        err.value.message), err.value.message
    with pytest.raises(XdslError, match="refers to the Python object"):
        load_latest(evil)  # no previous checkpoint to fall back to
    spec = tmp_path / "s.xspec"
    spec.write_text(H + "train { minimize ce(net1, y) wrt net1; epochs 1 }\n")
    lines = _assert_clean_failure(_invoke(["eval", str(spec), "--checkpoint", str(evil), "--device", "cpu"]))
    assert "refers to the Python object" in lines[0]
    # `xdsl run --resume` of a run directory whose last.pt carries the payload
    out = tmp_path / "run"
    last = out / "checkpoints" / "train1" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(evil.read_bytes())
    lines = _assert_clean_failure(_invoke(["run", str(spec), "--out", str(out), "--resume", "--device", "cpu"]))
    error = next((line for line in lines if line.startswith("error:")), "")  # after `xdsl run`'s data note
    assert re.fullmatch(rf"error: checkpoint '{re.escape(str(last))}' refers to the Python object "
                        r"(posix|nt)\.system; refused: .*", error), lines
    assert not marker.exists() and not (out / "checkpoints" / "train1" / "final.pt").exists()


def test_relative_paths_cannot_leave_the_spec_directory(tmp_path: Path) -> None:
    from xdsl.data.params import BuildContext, DataParamError, resolve_spec_path

    home = tmp_path / "project"
    (home / "data").mkdir(parents=True)
    assert resolve_spec_path("data/x", home) == home / "data" / "x"
    assert resolve_spec_path("data/../w.pt", home) == home / "w.pt"  # `..` that stays inside is fine
    assert resolve_spec_path(tmp_path / "w.pt", home) == tmp_path / "w.pt"  # absolute: as given
    for bad in ("../w.pt", "data/../../w.pt", ".."):
        with pytest.raises(XdslError, match="points outside the spec's directory") as err:
            resolve_spec_path(bad, home, "weights file")
        assert "absolute path" in (err.value.hint or "")
    with pytest.raises(DataParamError) as err:
        BuildContext("cifar10", spec_dir=home).resolve("../cifar")
    assert err.value.key == "root" and err.value.message == (
        "dataset 'cifar10': root '../cifar' points outside the spec's directory")
    # a symlink inside the spec's directory may point anywhere: the rule is about the text of the spec
    (home / "linked").symlink_to(tmp_path)
    assert BuildContext("cifar10", spec_dir=home).resolve("linked/cifar") == (tmp_path / "cifar").resolve()


def test_spec_paths_with_dotdot_are_located_errors(tmp_path: Path) -> None:
    home = tmp_path / "project"
    home.mkdir()
    from xdsl.compile.build import build_model

    torch.save(build_model("builtin.cnn", {}).state_dict(), tmp_path / "outside.pt")  # check compares the keys
    spec = home / "w.xspec"
    spec.write_text('network n = builtin.cnn() weights "../outside.pt"\n')
    lines = _assert_clean_failure(_invoke(["check", str(spec)]),
                                  f"{spec}:1:1: error: weights file '../outside.pt' points outside the spec's "
                                  "directory")
    assert lines[-1] == (f"  hint: relative paths in a spec stay inside its directory; write an absolute path "
                         f"(e.g. '{tmp_path / 'outside.pt'}') to use a file elsewhere")
    spec.write_text(f'data digits()\nnetwork n = builtin.cnn() weights "{tmp_path / "outside.pt"}"\n')
    assert _invoke(["check", str(spec)]).exit_code == 0  # the absolute form is allowed (exists; loads at run)

    spec.write_text('data cifar10(root="../cifar")\nnetwork n = builtin.cnn(in_channels=3, width=4)\n'
                    "train { minimize ce(n, y) wrt n; epochs 1 }\n")
    _assert_clean_failure(_invoke(["run", str(spec), "--out", str(tmp_path / "run")]),
                          f"{spec}:1:1: error: dataset 'cifar10': root '../cifar' points outside the spec's directory")


def test_build_model_weights_keyword_follows_the_same_rule(tmp_path: Path) -> None:
    from xdsl.compile.build import build_model

    (tmp_path / "outside.pt").write_bytes(b"")
    home = tmp_path / "project"
    home.mkdir()
    with pytest.raises(XdslError, match="points outside the spec's directory"):
        build_model("builtin.cnn", {"weights": "../outside.pt"}, device="meta", spec_dir=home)
