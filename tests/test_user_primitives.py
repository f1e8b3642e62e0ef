"""User loss primitives (`primitive name = "module:function"(p=logits, ...) learns p`): checked like the
built-in ones, and the generated objective calls the user's function on the right tensors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl.errors import SpecError, SpecErrors
from xdsl.lang.check import check
from xdsl.lang.format import format_spec
from xdsl.lang.parser import parse, parse_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "user_loss"


@pytest.fixture
def spec_dir(tmp_path):
    """The example's module beside a fresh spec directory (so every test imports it from there)."""
    shutil.copy(EXAMPLE / "my_losses.py", tmp_path / "my_losses.py")
    yield tmp_path
    sys.modules.pop("my_losses", None)


HEAD = """data digits(batch_size=16)
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1, width=4)
primitive focal = "my_losses:focal"(p=logits, y=labels, gamma=number)
primitive sym_kl = "my_losses:sym_kl"(a=logits, b=logits, T=number, grad=bool) learns b, a if grad
"""


def _check(spec_dir: Path, text: str, **kw):
    path = spec_dir / "s.xspec"
    path.write_text(text)
    return check(parse_file(path), **kw)


def _error(spec_dir: Path, text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        _check(spec_dir, text)
    return info.value


def test_example_spec_checks_strict_and_round_trips_through_the_formatter():
    program = check(parse_file(EXAMPLE / "user_loss.xspec"), strict=True)
    objective = str(program.stages[0].objectives["net1"])
    assert "focal(net1, y, 2.0)" in objective and "sym_kl(net2, net1, 2.0, False)" in objective
    text = format_spec(parse_file(EXAMPLE / "user_loss.xspec"))
    assert 'primitive sym_kl = "my_losses:sym_kl"(a=logits, b=logits, T=number, grad=bool) learns b, a if grad' in text
    assert parse(text, str(EXAMPLE / "again.xspec")).statements == parse_file(EXAMPLE / "user_loss.xspec").statements


def test_objective_equals_the_functions_written_by_hand(spec_dir):
    text = HEAD + """loss mine(s, t) = focal(s, y, gamma=1.5) + 0.5 * sym_kl(t, s, T=3)
train t {
    minimize mine(net1, net2) wrt net1
    minimize mine(net2, net1) wrt net2
}
"""
    (spec_dir / "s.xspec").write_text(text)
    exp = xdsl.load(spec_dir / "s.xspec")
    exp.use_stage("t")
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    got = exp.objectives(x, y)
    a, b = exp.forward("net1", x), exp.forward("net2", x)

    def focal(p, gamma):
        logp = F.log_softmax(p, 1)[torch.arange(6), y]
        return (-(1 - logp.exp()) ** gamma * logp).mean()

    def sym_kl(t, s, T):
        pt, ps = F.softmax(t / T, 1), F.softmax(s / T, 1)
        kl = lambda p, q: (p * (p.log() - q.log())).sum(1).mean()  # noqa: E731
        return (kl(pt, ps) + kl(ps, pt)) / 2 * T * T

    torch.testing.assert_close(got["net1"], focal(a, 1.5) + 0.5 * sym_kl(b, a, 3.0))
    torch.testing.assert_close(got["net2"], focal(b, 1.5) + 0.5 * sym_kl(a, b, 3.0))
    # the peer is a detached target (grad=false): net1's objective sends no gradient into net2
    grads = torch.autograd.grad(got["net1"], exp.owned_params("net2"), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_calls_are_checked_like_builtin_primitives(spec_dir):
    train = "train t {{ minimize {} wrt net1 }}\n"
    e = _error(spec_dir, HEAD + train.format("focal(net1, y, gama=2)"))
    assert (e.message, e.hint) == ("focal() has no parameter 'gama'", "did you mean 'gamma'?")
    assert (e.pos.line, e.pos.col) == (5, 35)
    assert _error(spec_dir, HEAD + train.format("focal(net1, net2)")).message == \
        "focal(): 'y' takes the labels y, got a network"
    assert _error(spec_dir, HEAD + train.format("focal(net1, y, 2, 3)")).message == \
        "focal() takes 3 argument(s), got 4"
    assert "a number" in _error(spec_dir, HEAD + train.format('focal(net1, y, gamma="2")')).message
    # gradient flow: the declared roles say sym_kl(net1, net2) cannot train net1 (a detached target)
    with pytest.raises(SpecError, match="no gradient into 'net1'"):
        _check(spec_dir, HEAD + train.format("sym_kl(net1, net2)"))
    # ... unless grad=true lets gradient into the first argument
    _check(spec_dir, HEAD + train.format("sym_kl(net1, net2, grad=true)"))


@pytest.mark.parametrize("decl, message", [
    ('primitive focal = "my_losses:focal"(p=logits, y=label, gamma=number)', "did you mean 'labels'"),
    ('primitive focal = "my_losses:focal"(p=logits, gamma=number, y=labels)', "declares (p, gamma, y)"),
    ('primitive focal = "my_losses:focal"(p=logits, y=labels)', "declares (p, y)"),
    ('primitive focal = "my_losses:focl"(p=logits, y=labels, gamma=number)', "did you mean 'my_losses:focal'"),
    ('primitive focal = "other_module:focal"(p=logits, y=labels, gamma=number)', "not beside the spec"),
    ('primitive kl = "my_losses:focal"(p=logits, y=labels, gamma=number)', "built-in loss primitive"),
    # a network above it: the primitive is the duplicate (one error, at the primitive)
    ('primitive n = "my_losses:focal"(p=logits, y=labels, gamma=number)', "'n' is already defined as a network"),
    ('primitive f = "my_losses:Tensor"(p=logits, y=labels)', "is a class; a primitive is a function"),
    ('primitive s = "my_losses:sym_kl"(a=logits, b=logits, T=number, grad=bool)', "say which carry gradient"),
    ('primitive s = "my_losses:sym_kl"(a=logits, b=logits, T=number, grad=bool) learns bb', "did you mean 'b'"),
    ('primitive s = "my_losses:sym_kl"(a=logits, b=logits, T=number, grad=bool) learns b, a if T',
     "names no bool parameter"),
    ('primitive s = "my_losses:sym_kl"(a=logits, b=logits, T=bool, grad=bool) learns b', "default T=1.0"),
])
def test_declaration_mistakes_are_located_errors(spec_dir, decl, message):
    text = "data digits()\nnetwork n = builtin.cnn(num_classes=10, in_channels=1)\n" + decl + "\n"
    e = _error(spec_dir, text)
    assert message in f"{e.message} {e.hint}"
    assert e.pos is not None and e.pos.line == 3


def test_installed_modules_need_allow_imports(spec_dir):
    text = ('data digits()\nnetwork n = builtin.cnn(num_classes=10, in_channels=1)\n'
            'primitive huber = "torch.nn.functional:huber_loss"(input=features, target=features, '
            'reduction=number, delta=number) learns input\n')
    e = _error(spec_dir, text)
    assert "not beside the spec" in e.message and "--allow-imports" in e.hint
    # with --allow-imports it is imported, and its signature is checked against the declaration
    with pytest.raises(SpecError, match=r"declares \(input, target, reduction, delta\) but"):
        _check(spec_dir, text, allow_imports=True)


def test_the_cli_runs_the_example(tmp_path):
    from typer.testing import CliRunner

    from xdsl.cli import app

    result = CliRunner().invoke(app, ["check", "--strict", str(EXAMPLE / "user_loss.xspec")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["expand", str(EXAMPLE / "user_loss.xspec")])
    assert result.exit_code == 0 and "primitive focal" in result.output


PROBED = '''
import torch
import torch.nn.functional as F

def kwonly(p, y, *, gamma=2.0):
    return gamma * F.cross_entropy(p, y)

def per_sample(p, y):
    return F.cross_entropy(p, y, reduction="none")

def integer(p, y):
    return 3

def raises(p, y):
    raise RuntimeError("boom")

def detached(p, y):
    return F.cross_entropy(p.detach(), y)

def tempered(p, y, T=1.0):
    return F.cross_entropy(p / T, y)

def in_place(p, y):
    t = p.detach()
    t.mul_(2.0)  # writes into the network's logits, which other terms share
    return F.cross_entropy(p, y)

def leaky(t, s):
    torch.rand(3)  # draws from the global generator: the probe must not move the trainer's stream
    return F.mse_loss(s, t)
'''


def _probe_error(spec_dir: Path, fn: str, call: str, kinds: str = "p=logits, y=labels", learns: str = "") -> str:
    from xdsl.experiment import compile_program

    (spec_dir / "probed.py").write_text(PROBED)
    sys.modules.pop("probed", None)
    (spec_dir / "s.xspec").write_text(
        "data digits()\nnetwork net1, net2 = builtin.cnn(num_classes=10, in_channels=1, width=4)\n"
        f'primitive f = "probed:{fn}"({kinds}){learns}\n'
        f"train t {{ minimize {call} wrt s for s in [net1, net2] }}\n")
    with pytest.raises(SpecError) as info:  # one error for the cohort's two calls at one place
        compile_program(spec_dir / "s.xspec", device="meta")
    e = info.value
    assert (e.pos.line, e.pos.col) == (4, 20)
    return f"{e.message} | {e.hint}"


@pytest.mark.parametrize("fn, expected", [
    ("per_sample", "returned a torch.float32 tensor of shape (2,); a loss primitive returns a floating-point scalar"),
    ("integer", "returned a value of type int"),
    ("raises", "raised RuntimeError: boom"),
    ("detached", "sends no gradient into 'p', which the declaration says learns"),
    ("in_place", "changed its argument 'p' in place; other loss terms share that tensor"),
])
def test_a_function_that_does_not_do_what_its_declaration_says_is_a_located_error(spec_dir, fn, expected):
    message = _probe_error(spec_dir, fn, "f(s, y)")
    assert f"primitive 'f' ('probed:{fn}') called as f(net1, y) on a batch of 2 (p: logits (2, 10), y: labels (2,))" \
        in message
    assert expected in message


def test_a_call_whose_numbers_make_the_loss_non_finite_is_a_located_error(spec_dir):
    message = _probe_error(spec_dir, "tempered", "f(s, y, T=0)", "p=logits, y=labels, T=number")
    assert "called as f(net1, y, 0.0)" in message and "returned nan" in message and "division by a 0" in message


def test_a_target_that_is_not_detached_is_a_located_error_and_the_probe_keeps_the_random_stream(spec_dir):
    state = torch.get_rng_state()
    message = _probe_error(spec_dir, "leaky", "f(net2, s)", "t=logits, s=logits", " learns s")
    assert "sends gradient into 't', which the declaration says is a detached target" in message
    assert "t.detach()" in message
    assert torch.equal(torch.get_rng_state(), state)


def test_keyword_only_parameters_are_passed_by_keyword(spec_dir):
    (spec_dir / "probed.py").write_text(PROBED)
    sys.modules.pop("probed", None)
    (spec_dir / "s.xspec").write_text(
        "data digits()\nnetwork net1 = builtin.cnn(num_classes=10, in_channels=1, width=4)\n"
        'primitive f = "probed:kwonly"(p=logits, y=labels, gamma=number)\n'
        "train t { minimize f(net1, y, gamma=3) wrt net1 }\n")
    exp = xdsl.load(spec_dir / "s.xspec")
    exp.use_stage("t")
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    torch.testing.assert_close(exp.objectives(x, y)["net1"], 3 * F.cross_entropy(exp.forward("net1", x), y))


def test_a_declaration_that_fails_reports_once_not_at_every_call(spec_dir):
    text = HEAD.replace("my_losses:focal", "my_losses:focl") + "train t { minimize focal(net1, y, gamma=2) wrt net1 }\n"
    e = _error(spec_dir, text)  # one error (a SpecErrors would list the calls as unknown names too)
    assert "did you mean 'my_losses:focal'" in e.hint and e.pos.line == 3
    # the calls are still checked against the declared kinds
    with pytest.raises(SpecErrors) as info:
        _check(spec_dir, text.replace("focal(net1, y, gamma=2)", "focal(net1, net2)"))
    assert "'y' takes the labels y, got a network" in info.value.render()
