"""Train settings and `--set`, each against an independent computation: the learning rate each epoch's
steps use against the schedule's formula, a clipped step's gradient against the gradient clipped by
hand, AdamW against torch.optim.AdamW, and the step and evaluation counts of max_steps / eval_every.

Runs go through the command line; optimiser steps are observed with torch's global optimizer hook.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

import xdsl
from xdsl.cli import app
from xdsl.data import build_data

DATA = "data synthetic(num_classes=4, shape=[1, 8, 8], train_size={n}, test_size=16, batch_size=16)\n"
NET = "network a = builtin.mlp(num_classes=4, in_features=64, hidden=8)\n"
SGD = "optimizer sgd(lr=0.1, momentum=0.0, weight_decay=0.0)"


def _run(tmp_path: Path, text: str, *extra: str) -> tuple[Path, list[dict]]:
    """`xdsl run` of `text`; returns the run directory and the optimiser steps seen (lr, network's optimizer)."""
    spec = tmp_path / "s.xspec"
    spec.write_text(text)
    out = tmp_path / "run"
    steps: list[dict] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kw: steps.append({"lr": opt.param_groups[0]["lr"]}))
    try:
        result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu", "-q", *extra])
    finally:
        hook.remove()
    assert result.exit_code == 0, result.output
    return out, steps


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- learning-rate schedules: every epoch's lr against the formula ----

EPOCHS = 7


def _step_lr(e: int) -> float:  # x0.5 every 3 epochs
    return 0.1 * 0.5 ** (e // 3)


def _multistep_lr(e: int) -> float:  # x0.1 at epochs 2 and 5
    return 0.1 * 0.1 ** sum(e >= m for m in (2, 5))


def _cosine_lr(e: int, warmup: int = 2) -> float:  # linear warm-up to the base lr, then half a cosine to 0
    if e < warmup:
        return 0.1 * (e + 1) / (warmup + 1)
    return 0.1 * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (EPOCHS - warmup)))


SCHEDULES = {"step(every=3, gamma=0.5)": _step_lr, "multistep(milestones=[2, 5], gamma=0.1)": _multistep_lr,
             "cosine(warmup=2)": _cosine_lr}


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["step", "multistep", "cosine_warmup"])
def test_schedule_sets_each_epochs_learning_rate_by_its_formula(tmp_path, schedule):
    text = DATA.format(n=32) + NET + f"train {{ minimize ce(a, y) wrt a; {SGD}; epochs {EPOCHS}; " \
        f"schedule {schedule} }}\n"
    out, steps = _run(tmp_path, text)
    formula = SCHEDULES[schedule]
    assert len(steps) == EPOCHS * 2  # 32 samples / batch 16
    for e in range(EPOCHS):
        want = formula(e)
        assert [s["lr"] for s in steps[2 * e: 2 * e + 2]] == pytest.approx([want, want], rel=1e-9), f"epoch {e + 1}"
    # metrics.jsonl logs the learning rate the epoch's steps used
    assert [r["lr"] for r in _rows(out)] == pytest.approx([formula(e) for e in range(EPOCHS)], rel=1e-9)


# ---- grad_clip: the step uses the gradient clipped to the given total norm ----

def test_grad_clip_scales_the_gradient_to_the_given_total_norm(tmp_path):
    spec = tmp_path / "clip.xspec"
    spec.write_text(DATA.format(n=32) + NET + f"train {{ minimize ce(a, y) wrt a; {SGD}; grad_clip 0.01 }}\n")
    exp = xdsl.load(spec)
    reference = copy.deepcopy(exp.networks["a"])
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    # by hand: the gradient of the batch-mean cross-entropy, scaled to total norm 0.01
    loss = F.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 0.1  # far above the clip, so the clip acts
    clipped = [g * (0.01 / (norm + 1e-6)) for g in grads]

    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kw: seen.append([p.grad.clone() for p in opt.param_groups[0]["params"]]))
    try:
        exp.train_step(x, y)
    finally:
        hook.remove()
    (used,) = seen
    assert torch.sqrt(sum((g ** 2).sum() for g in used)) == pytest.approx(0.01, rel=1e-4)
    for got, want in zip(used, clipped):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    for p, p0, g in zip(exp.networks["a"].parameters(), reference.parameters(), clipped):  # w - lr * clipped
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=1e-5, atol=1e-7)


# ---- adamw: torch.optim.AdamW's decoupled weight decay ----

def test_adamw_steps_like_torch_adamw(tmp_path):
    spec = tmp_path / "adamw.xspec"
    spec.write_text(DATA.format(n=32) + NET + "train { minimize ce(a, y) wrt a; "
                    "optimizer adamw(lr=0.01, weight_decay=0.5, beta1=0.8, beta2=0.99) }\n")
    exp = xdsl.load(spec)
    reference = copy.deepcopy(exp.networks["a"])
    opt = torch.optim.AdamW(reference.parameters(), lr=0.01, betas=(0.8, 0.99), weight_decay=0.5, eps=1e-8)
    adam = copy.deepcopy(reference)  # plain Adam with L2 decay: what adamw must not be
    adam_opt = torch.optim.Adam(adam.parameters(), lr=0.01, betas=(0.8, 0.99), weight_decay=0.5)
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
        exp.train_step(x, y)
        for model, o in ((reference, opt), (adam, adam_opt)):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
            o.step()
    for p, want in zip(exp.networks["a"].parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), want.detach(), rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(p, q, atol=1e-4) for p, q in zip(reference.parameters(), adam.parameters()))


# ---- max_steps and eval_every: how many steps and which epochs are evaluated ----

def test_max_steps_caps_the_optimisation_steps_of_each_epoch(tmp_path):
    out, steps = _run(tmp_path, DATA.format(n=96) + NET + f"train {{ minimize ce(a, y) wrt a; {SGD}; epochs 2; "
                                                          "max_steps 4 }\n")
    assert len(steps) == 2 * 4  # 6 batches an epoch, 4 trained
    assert [r["epoch"] for r in _rows(out)] == [1, 2]


def test_eval_every_evaluates_every_nth_epoch_and_the_last(tmp_path):
    out, steps = _run(tmp_path, DATA.format(n=32) + NET + f"train {{ minimize ce(a, y) wrt a; {SGD}; epochs 5; "
                                                          "eval_every 2 }\n")
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and len(steps) == 10
    assert [r["test_acc"] is not None for r in rows] == [False, True, False, True, True]


# ---- --set: overrides that succeed change what runs ----

def test_set_overrides_change_epochs_learning_rate_and_batch_size(tmp_path):
    text = DATA.format(n=64) + NET + "network b = builtin.mlp(num_classes=4, in_features=64, hidden=8)\n" \
        f"train first {{ minimize ce(a, y) wrt a; {SGD}; epochs 1 }}\n" \
        f"train second {{ minimize ce(b, y) wrt b; {SGD}; epochs 1 }}\n"
    out, steps = _run(tmp_path, text, "--set", "epochs=2", "--set", "second.epochs=3", "--set", "lr=0.05",
                      "--set", "data.batch_size=32")
    rows = [r for r in _rows(out) if r["trained"]]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("first", 1), ("first", 2), ("second", 1), ("second", 2),
                                                         ("second", 3)]
    assert len(steps) == (2 + 3) * 2  # 64 samples / batch 32
    assert {s["lr"] for s in steps} == {0.05}


def test_eval_train_logs_training_accuracy_equal_to_the_final_weights_on_the_plain_train_set(tmp_path):
    text = DATA.format(n=48) + NET + f"train t {{ minimize ce(a, y) wrt a; {SGD}; epochs 2; eval_train true }}\n"
    out, _ = _run(tmp_path, text)
    rows = _rows(out)
    assert all(r.get("train_acc") is not None and r.get("test_acc") is not None for r in rows)
    exp = xdsl.load(tmp_path / "s.xspec")
    exp.compiled.root.load_state_dict(torch.load(out / "checkpoints" / "t" / "final.pt")["modules"])
    bundle = build_data(exp.program.data.name, exp.program.data.kwargs)
    exp.networks["a"].eval()
    with torch.no_grad():
        xs, ys = zip(*bundle.plain_train_loader())
        acc = float((exp.networks["a"](torch.cat(xs)).argmax(1) == torch.cat(ys)).double().mean())
    assert rows[-1]["train_acc"] == pytest.approx(acc)
    # off by default; a non-boolean is a located error
    (tmp_path / "x").mkdir()
    out2, _ = _run(tmp_path / "x", DATA.format(n=32) + NET + f"train {{ minimize ce(a, y) wrt a; {SGD} }}\n")
    assert "train_acc" not in _rows(out2)[0]
    spec = tmp_path / "bad.xspec"
    spec.write_text(DATA.format(n=32) + NET + "train { minimize ce(a, y) wrt a; eval_train 1 }\n")
    result = CliRunner().invoke(app, ["check", str(spec)])
    assert result.exit_code == 2 and "bad.xspec:3:" in result.output and "eval_train is true or false" in result.output
