"""Parser, formatter, macros and checker: round trips, located errors, and a fuzz property."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdsl.errors import SpecError, SpecErrors
from xdsl.lang import ast, ir
from xdsl.lang.check import check
from xdsl.lang.format import format_spec
from xdsl.lang.macros import expand_macros
from xdsl.lang.parser import parse, parse_expr

HEADER = """data digits(batch_size=64)
network net1 = builtin.cnn(num_classes=10)
network net2 = builtin.cnn(num_classes=10)
cut net1, net2 at "layer2" into up, down
"""

XML_SPEC = HEADER + """
loss xml(s, T) =
    ( ce(s, y)
    + mean(kl(t, s) for t in T)
    + sum(kl(t, s.up >> t.down) for t in T)
    + sum(kl(t, t.up >> s.down) for t in T)
    + sum(ce(s.up >> t.down, y) for t in T)
    + sum(ce(t.up >> s.down, y) for t in T)
    ) / (2 * len(T))

train {
    minimize xml(s, peers(s)) wrt s for s in [net1, net2]
    optimizer adam(lr=1e-4)
    epochs 200
    order alternating
}

evaluate accuracy, xross(net1, net2), ensemble(net1, net2)
"""

CONSTRUCTS = {
    "comment": "# just a comment\n",
    "data": 'data tiny_imagenet(root="data/tiny-imagenet-200", batch_size=128)',
    "network": "network net1 = torchvision.resnet34(num_classes=200)",
    "cohort": "network a, b, c = torchvision.resnet50(num_classes=200)",
    "user_model": 'network m = "mypkg.models:small"(width=3) weights "teacher.pt"',
    "cut_one": 'cut net1, net2 at "layer2" into up, down',
    "cut_two": 'cut a, b at "layer1", "layer3" into p1, p2, p3',
    "adapter": "adapter a12 = conv1x1(relu=true) owner net1",
    "loss_arith": "loss f(s, t) = 0.5 * ce(s, y) - kl(t, s, T=4) / 2 + -1 * l2(s.up, t.up)",
    "loss_paths": "loss g(s, t) = ce(s.up >> a12 >> t.down, y) + at(t.up, s.up)",
    "loss_reduce": "loss h(s, T) = sum(kl(t, s) for t in T) + mean(ce(t, y) for t in T) / len(T)",
    "loss_list": "loss k(s) = sum([ce(s, y), ce(s, y)]) + kl(ensemble(peers(s)), s, grad=false)",
    "train": "train xml after warmup { minimize f(s, peers(s)) wrt s for s in [net1, net2]; "
             "optimizer sgd(lr=0.1, momentum=0.9, nesterov=true); epochs 200; order simultaneous; "
             "schedule step(every=60, gamma=0.1); }",
    "train_single": "train { minimize kd(t, s, y, T=4, alpha=0.9) wrt s }",
    "evaluate": "evaluate accuracy, xross(net1, net2), ensemble(net1@10, net2), flatness(sigmas=[0.0, 0.01])",
    "macro": "xml(net1, net2, epochs=200, optimizer=adam(lr=1e-4))",
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_every_construct_round_trips_through_the_formatter(name):
    spec = parse(CONSTRUCTS[name])
    text = format_spec(spec)
    assert parse(text) == spec
    assert format_spec(parse(text)) == text


def test_parse_builds_the_documented_ast_with_positions():
    spec = parse(XML_SPEC, "x.xspec")
    kinds = [type(s).__name__ for s in spec.statements]
    assert kinds == ["Data", "Network", "Network", "Cut", "LossDef", "Train", "Evaluate"]
    cut = spec.statements[3]
    assert cut == ast.Cut(("net1", "net2"), ("layer2",), ("up", "down"))
    assert (cut.pos.file, cut.pos.line, cut.pos.col) == ("x.xspec", 4, 1)
    train = spec.statements[5]
    assert [s.key for s in train.settings] == ["optimizer", "epochs", "order"]
    assert train.minimizes[0].var == "s"


def test_pipe_binds_looser_than_arithmetic_and_precedence_is_kept():
    e = parse_expr("a.up >> b.down")
    assert isinstance(e, ast.BinOp) and e.op == ">>"
    e = parse_expr("1 - 2 - 3")
    assert e == ast.BinOp("-", ast.BinOp("-", ast.Number(1), ast.Number(2)), ast.Number(3))
    e = parse_expr("1 + 2 * 3")
    assert e.op == "+" and e.right.op == "*"


def test_xml_loss_unrolls_to_the_seed_formula_for_two_networks():
    program = check(parse(XML_SPEC))
    term = program.stages[0].objectives["net1"]
    assert str(term) == (
        "((((((ce(net1.up >> net1.down, y, 0.0) + kl(net2.up >> net2.down, net1.up >> net1.down, 1.0, False))"
        " + kl(net2.up >> net2.down, net1.up >> net2.down, 1.0, False))"
        " + kl(net2.up >> net2.down, net2.up >> net1.down, 1.0, False))"
        " + ce(net1.up >> net2.down, y, 0.0)) + ce(net2.up >> net1.down, y, 0.0)) / 2.0)")


def test_xml_macro_expands_to_the_same_program_as_the_core_spec():
    macro = check(parse(HEADER + "xml(net1, net2, epochs=200, optimizer=adam(lr=1e-4))"))
    core = check(parse(XML_SPEC))
    assert macro.stages[0].objectives == core.stages[0].objectives
    assert macro.stages[0].optimizer.kwargs == core.stages[0].optimizer.kwargs


@pytest.mark.parametrize("call", ["xml(net1, net2, epochs=3)", "dml(net1, net2)", 'dml(net1, net2, teacher="ensemble")',
                                  "kd(net1, net2, T=4, alpha=0.9)", "independent(net1, net2)"])
def test_macro_expansion_is_itself_a_spec_that_checks(call):
    expanded = format_spec(expand_macros(parse(HEADER + call)))
    assert "(" in expanded and not any(line.startswith(call.split("(")[0] + "(") for line in expanded.splitlines())
    check(parse(expanded))


def test_dml_cohort_of_three_has_mean_over_two_peers():
    program = check(parse(HEADER + "network net3 = builtin.cnn(num_classes=10)\ndml(net1, net2, net3)"))
    term = program.stages[0].objectives["net2"]
    kls = [p for p in _leaves(term) if p.name == "kl"]
    assert [str(k.args[0]) for k in kls] == ["net1.up >> net1.down", "net3"]
    assert "/ 2.0" in str(term)


def _leaves(term):
    from xdsl.compile.graph import term_leaves

    return list(term_leaves(term))


# ---- located errors: one per class, message and position ----

ERRORS = [
    ("syntax", HEADER + "network = builtin.cnn()", 5, 9, "unexpected '='; expected a name"),
    ("unclosed", HEADER + "loss f(s) = (ce(s, y)", 5, 13, "'(' is never closed"),
    ("bad_char", HEADER + "loss f(s) = ce(s, y) $", 5, 22, "unexpected character '$'"),
    ("reserved", HEADER + "network train = builtin.cnn()", 5, 9, "unexpected 'train'"),
    ("undefined_name", HEADER + "loss f(s) = ce(nett1, y)\ntrain { minimize f(net1) wrt net1 }", 5, 16,
     "undefined name 'nett1'"),
    ("duplicate_name", HEADER + "network net1 = builtin.cnn()", 5, 1, "'net1' is already defined as a network"),
    ("unknown_primitive", HEADER + "train { minimize cee(net1, y) wrt net1 }", 5, 18,
     "unknown loss or function 'cee'"),
    ("arity", HEADER + "train { minimize ce(net1, y, 0.1, 2) wrt net1 }", 5, 18, "ce() takes 3 argument(s), got 4"),
    ("missing_arg", HEADER + "train { minimize ce(net1) wrt net1 }", 5, 18, "ce() is missing argument(s): y"),
    ("bad_keyword", HEADER + "train { minimize kl(net1, net2, temp=4) wrt net2 }", 5, 33,
     "kl() has no parameter 'temp'"),
    ("type_path_for_number", HEADER + "train { minimize kl(net1, net2, T=net1) wrt net2 }", 5, 35,
     "kl(): 'T' takes a number, got a network"),
    ("type_network_for_list", HEADER + "loss f(s, T) = mean(kl(t, s) for t in T)\n"
     "train { minimize f(net1, net2) wrt net1 }", 5, 39, "'for t in ...' needs a list, got a network"),
    ("unknown_order", HEADER + "train { minimize ce(net1, y) wrt net1; order alternatng }", 5, 46,
     "unknown order 'alternatng'"),
    ("negative_epochs", HEADER + "train { minimize ce(net1, y) wrt net1; epochs -3 }", 5, 47,
     "epochs must be an integer >= 1, got -3"),
    ("lr_zero", HEADER + "train { minimize ce(net1, y) wrt net1; optimizer adam(lr=0) }", 5, 58,
     "lr must be a number > 0, got 0"),
    ("undefined_loss", HEADER + "train { minimize xmll(net1, peers(net1)) wrt net1 for s in [net1] }", 5, 18,
     "unknown loss or function 'xmll'"),
    ("unknown_part", HEADER + "train { minimize ce(net1.upp >> net2.down, y) wrt net1 }", 5, 21,
     "network 'net1' has no part 'upp'"),
    ("unknown_optimizer", HEADER + "train { minimize ce(net1, y) wrt net1; optimizer adma(lr=1e-3) }", 5, 50,
     "unknown optimizer 'adma'"),
    ("unknown_setting", HEADER + "train { minimize ce(net1, y) wrt net1; epoch 3 }", 5, 40,
     "unknown train setting 'epoch'"),
    ("unknown_dataset", "data digitz()", 1, 1, "unknown dataset 'digitz'"),
    ("logits_expected", HEADER + "train { minimize ce(net1.up, y) wrt net1 }", 5, 21,
     "ce(): 'p' needs logits, but net1.up ends inside net1"),
    ("path_not_consecutive", HEADER + "train { minimize ce(net1.down >> net2.down, y) wrt net1 }", 5, 21,
     "is not consecutive"),
    ("unknown_evaluation", HEADER + "evaluate acuracy", 5, 10, "unknown evaluation 'acuracy'"),
    ("unknown_macro", HEADER + "xmll(net1, net2)", 5, 1, "unknown statement or macro 'xmll'"),
    ("peers_outside_for", HEADER + "train { minimize mean(kl(t, net1) for t in peers(net1)) wrt net1 }", 5, 44,
     "peers(s) is only defined inside"),
    ("after_unknown", HEADER + "train b after a { minimize ce(net1, y) wrt net1 }", 5, 1,
     "'after a': no earlier train block is called 'a'"),
    ("uncut_part", "network n = builtin.cnn()\ntrain { minimize ce(n.up, y) wrt n }", 2, 21,
     "network 'n' is not cut"),
    ("twice_minimized", HEADER + "train { minimize ce(net1, y) wrt net1\nminimize ce(net1, y) wrt net1 }", 6, 1,
     "network 'net1' is minimised twice"),
]


@pytest.mark.parametrize("name,text,line,col,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_spec_error_is_located_with_message(name, text, line, col, message):
    with pytest.raises(SpecError) as info:
        check(parse(text, "bad.xspec"))
    err = info.value
    assert message in err.message
    assert (err.pos.line, err.pos.col) == (line, col), err.render()
    rendered = err.render()
    assert rendered.startswith(f"bad.xspec:{line}:{col}: error: ")
    assert "^" in rendered


def test_did_you_mean_is_offered_for_close_names():
    with pytest.raises(SpecError) as info:
        check(parse(HEADER + "loss f(s) = ce(nett1, y)\ntrain { minimize f(net1) wrt net1 }"))
    assert info.value.hint == "did you mean 'net1'?"
    with pytest.raises(SpecError) as info:
        check(parse(HEADER + "train { minimize ce(net1, y) wrt net1; order simultanous }"))
    assert info.value.hint == "did you mean 'simultaneous'?"


def test_independent_errors_are_reported_together():
    text = HEADER + "train { minimize ce(net1, y) wrt net1; epochs 0; order sideways }\nevaluate acuracy"
    with pytest.raises(SpecErrors) as info:
        check(parse(text, "bad.xspec"))
    messages = [e.message for e in info.value.errors]
    assert len(messages) == 3
    assert any("epochs" in m for m in messages) and any("sideways" in m for m in messages)
    assert any("acuracy" in m for m in messages)


def test_binary_and_non_utf8_files_are_spec_errors(tmp_path):
    from xdsl.lang.parser import parse_file

    (tmp_path / "bin.xspec").write_bytes(b"network a\x00\x01")
    with pytest.raises(SpecError, match="NUL byte"):
        parse_file(tmp_path / "bin.xspec")
    (tmp_path / "latin.xspec").write_bytes("# caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not valid UTF-8"):
        parse_file(tmp_path / "latin.xspec")
    with pytest.raises(SpecError, match="limit"):
        parse("#" * 2_000_000)


def test_empty_spec_is_valid_and_has_nothing_to_do():
    program = check(parse(""))
    assert program.networks == {} and program.stages == []


def test_program_paths_are_hashable_and_shared():
    program = check(parse(XML_SPEC))
    t1, t2 = program.stages[0].objectives.values()
    paths1 = {a for p in _leaves(t1) for a in p.args if isinstance(a, ir.Path)}
    paths2 = {a for p in _leaves(t2) for a in p.args if isinstance(a, ir.Path)}
    assert paths1 == paths2  # both objectives use the same four paths: the graph computes each once


# ---- fuzzing: any mutation gives an AST or an xdsl error, never another exception ----

SEED_TEXTS = [XML_SPEC, HEADER + "dml(net1, net2, epochs=2)", HEADER + 'kd(net1, net2, T=4.0, alpha=0.9)']
ALPHABET = st.sampled_from(list("()[]{},.=+-*/>@#\"\n ;:0123456789abcdefghijklmnopqrstuvwxyz_") +
                           ["net1", "net2", "up", "down", ">>", "for", "in", "wrt", "minimize", "train", "loss",
                            "ce", "kl", "y", "x", "peers", "1e-4", "-3"])


@st.composite
def mutated_spec(draw):
    text = draw(st.sampled_from(SEED_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(ALPHABET)
        j = min(len(text), i + draw(st.integers(1, 8)))
        if op == "insert":
            text = text[:i] + piece + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        else:
            text = text[:i] + piece + text[j:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_spec())
def test_mutated_specs_give_an_ast_or_a_spec_error_never_another_exception(text):
    try:
        check(parse(text, "fuzz.xspec"))
    except (SpecError, SpecErrors) as e:
        assert e.render()


def test_xml_macro_with_three_parts_covers_every_mixed_path():
    text = HEADER.replace('at "layer2" into up, down', 'at "layer1", "layer2" into p1, p2, p3') + "xml(net1, net2)"
    term = check(parse(text)).stages[0].objectives["net1"]
    paths = {str(a) for p in _leaves(term) if p.name == "ce" for a in p.args[:1]}
    assert len(paths) == 1 + 6  # the network itself and the 2^3 - 2 mixed paths
    assert "net1.p1 >> net2.p2 >> net1.p3" in paths and "/ 6.0" in str(term)


def test_born_again_generations_form_declares_the_generations():
    program = check(parse(HEADER + "born_again(net1, generations=2, epochs=1)"))
    assert {"net1_g1", "net1_g2"} <= set(program.networks)
    assert [(s.name, s.after, s.trained) for s in program.stages] == [
        ("gen0", None, ("net1",)), ("gen1", "gen0", ("net1_g1",)), ("gen2", "gen1", ("net1_g2",))]


def test_kd_macro_accepts_temperature_and_alpha_positionally():
    a = check(parse(HEADER + "kd(net1, net2, 4, 0.9)")).stages[0].objectives
    b = check(parse(HEADER + "kd(net1, net2, T=4, alpha=0.9)")).stages[0].objectives
    assert a == b and str(a["net2"]).startswith("kd(net1.up >> net1.down, net2.up >> net2.down, y, 4.0, 0.9")
