"""Schedules inside losses: `epoch`, `epochs`, `step`, `min`, `max`, `exp`, `cos`, `pi` in loss expressions and
primitive keywords; checked like everything else, equal to a hand computation at every epoch, and handed to
the generated objective as a tensor so that a compiled objective never recompiles when they change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl.errors import SpecError, SpecErrors
from xdsl.lang import ir
from xdsl.lang.check import check
from xdsl.lang.parser import parse
from xdsl.losses import kl
from xdsl.train.runner import RunOptions, run

SPEC = """
data digits(batch_size=32, train_fraction=0.2)
network t, s = builtin.mlp(num_classes=10, in_features=64, hidden=16)
train distil {{
    minimize {objective} wrt s
    optimizer sgd(lr=0.1)
    epochs 3
}}
"""
WARMUP = "ce(s, y) + min(epoch / 2, 1) * kl(t, s, T=1 + 3 * (1 - epoch / epochs))"


def _objective(text: str) -> ir.Term:
    return check(parse(SPEC.format(objective=text))).stages[0].objectives["s"]


def _error(text: str) -> SpecError:
    with pytest.raises((SpecError, SpecErrors)) as info:
        _objective(text)
    err = info.value
    return err.errors[0] if isinstance(err, SpecErrors) else err


def test_schedule_names_become_clock_terms_and_constant_calls_are_folded() -> None:
    term = _objective(WARMUP)
    assert "min((epoch / 2.0), 1.0)" in str(term) and "(epoch / epochs)" in str(term)
    folded = _objective("min(2, 3) * exp(0) * cos(pi) * ce(s, y)")
    assert str(folded) == f"({-2.0!r} * ce(s, y, 0.0))"


@pytest.mark.parametrize(("objective", "message"), [
    ("min(epoh / 2, 1) * ce(s, y)", "undefined name 'epoh'"),
    ("min(ce(s, y), 1)", "min() takes numbers or epoch/epochs/step, got a loss"),
    ("exp(epoch, 2) * ce(s, y)", "exp() takes 1 argument(s), got 2"),
    ("min(epoch) * ce(s, y)", "min() takes 2 or more arguments, got 1"),
    ("epoch / epochs", "minimize needs a loss, got a number that changes while training"),
    ("ce(s, y, label_smoothing=epoch / 10)", "'label_smoothing' takes a number, got a number that changes"),
    ("kl(t, s, T=s)", "'T' takes a number, got a network"),
])
def test_schedule_mistakes_are_located_errors(objective: str, message: str) -> None:
    err = _error(objective)
    assert message in err.message
    assert err.pos is not None and err.pos.line == 5


def test_misspelt_schedule_name_suggests_it() -> None:
    assert "epoch" in (_error("epcoh * ce(s, y)").hint or "")


def test_schedule_names_cannot_be_redefined() -> None:
    with pytest.raises((SpecError, SpecErrors), match="already defined"):
        check(parse("network epoch = builtin.mlp()\n"))


def test_kl_with_a_tensor_temperature_equals_kl_with_the_number() -> None:
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    for T in (1.0, 2.5):
        assert torch.allclose(kl(t, s, torch.tensor(T)), kl(t, s, T), atol=1e-6)
    by_hand = F.kl_div(F.log_softmax(s / 2.5, 1), F.softmax(t / 2.5, 1), reduction="batchmean") * 2.5**2
    assert torch.allclose(kl(t, s, torch.tensor(2.5)), by_hand, atol=1e-6)


def _load(tmp_path: Path, objective: str = WARMUP) -> xdsl.experiment.Experiment:
    spec = tmp_path / "s.xspec"
    spec.write_text(SPEC.format(objective=objective))
    torch.manual_seed(0)
    return xdsl.load(spec)


def test_objective_follows_the_schedule_at_every_epoch_and_step(tmp_path: Path) -> None:
    exp = _load(tmp_path, WARMUP + " + 0.5 * max(cos(pi * step / 4), exp(-epoch)) * ce(s, y)")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    exp.set_train_mode(False)
    with torch.no_grad():
        zt, zs = exp.forward("t", x), exp.forward("s", x)
        for epoch, step in ((0, 0), (1, 3), (2, 7)):
            exp.epoch, exp.step_count = epoch, step
            T = 1 + 3 * (1 - epoch / 3)
            soft = F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt / T, 1), reduction="batchmean") * T * T
            ce = F.cross_entropy(zs, y)
            extra = 0.5 * max(math.cos(math.pi * step / 4), math.exp(-epoch)) * ce
            expected = ce + min(epoch / 2, 1) * soft + extra
            assert torch.allclose(exp.objectives(x, y)["s"], expected, atol=1e-5), (epoch, step)


def test_compiled_objective_never_recompiles_when_the_schedule_changes(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    exp = _load(tmp_path)
    eager = exp._single["s"].module
    counter = CompileCounter()
    compiled = torch.compile(eager, backend=counter, dynamic=False)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    values = []
    for epoch in range(3):
        exp.epoch = epoch
        for step in range(2):
            exp.step_count = 2 * epoch + step
            clock = exp.clock(exp._single["s"])
            (loss,), _ = compiled(x, y, clock)
            (reference,), _ = eager(x, y, clock)
            assert torch.allclose(loss, reference)
            values.append(float(loss.detach()))
    assert counter.frame_count == 1  # compiled once: 0 recompiles over 3 epochs
    assert len({round(v, 6) for v in values[::2]}) == 3  # the weight really changed between epochs


def test_a_run_with_schedules_trains_and_logs_the_scheduled_terms(tmp_path: Path) -> None:
    spec = tmp_path / "s.xspec"
    spec.write_text(SPEC.format(objective=WARMUP).replace("epochs 3", "epochs 2"))
    run(spec, RunOptions(out=tmp_path / "run", quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = [r["terms"] for r in rows if r["network"] == "s"]
    assert len(terms) == 2 and all(any(k.startswith("kl(") and "epoch" in k for k in t) for t in terms)


def test_epochs_in_a_schedule_is_the_block_total_under_a_steps_budget(tmp_path: Path) -> None:
    """`epochs` in a loss is the block's total: under `steps N`, the epochs the budget needs (it read 1)."""
    spec = tmp_path / "s.xspec"
    base = SPEC.format(objective="(1 + epoch / epochs) * ce(s, y)")
    spec.write_text(base.replace("epochs 3", "epochs 1"))
    run(spec, RunOptions(out=tmp_path / "one", quiet=True))
    per_epoch = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])["step"]
    spec.write_text(base.replace("epochs 3", f"steps {2 * per_epoch + 1}"))  # 3 epochs, the last one 1 step
    run(spec, RunOptions(out=tmp_path / "steps", quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "steps" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["network"] == "s"]
    ratios = [r["train_loss"] / next(iter(r["terms"].values())) for r in rows]
    assert ratios == pytest.approx([1, 1 + 1 / 3, 1 + 2 / 3], rel=1e-5)
