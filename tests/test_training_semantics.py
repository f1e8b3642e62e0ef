"""Training semantics a paper needs: gradient accumulation, fp16 loss scaling, per-term metrics,
determinism and the recorded environment (each against an independent computation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl.train.runner import RunOptions, run

# BatchNorm-free networks: accumulation is then exactly one step on the concatenated batch
SPEC = """
data digits(batch_size={bs}, train_fraction=0.2)
network a, b = builtin.mlp(num_classes=10, in_features=64, hidden=32)
loss dml(s, T) = ce(s, y) + mean(kl(t, s) for t in T)
train mutual {{
    minimize dml(s, peers(s)) wrt s for s in [a, b]
    optimizer sgd(lr=0.05, momentum=0.9)
    epochs {epochs}
    order {order}
    accumulate {accumulate}
}}
"""


def _write(tmp_path: Path, name: str = "s.xspec", *, bs: int = 32, epochs: int = 1, order: str = "alternating",
           accumulate: int = 1) -> Path:
    spec = tmp_path / name
    spec.write_text(SPEC.format(bs=bs, epochs=epochs, order=order, accumulate=accumulate))
    return spec


def _batch(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _weights(exp: xdsl.experiment.Experiment) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in exp.compiled.root.state_dict().items()}


@pytest.mark.parametrize("order", ["alternating", "simultaneous"])
def test_accumulated_step_equals_one_step_on_the_concatenated_batch(tmp_path: Path, order: str) -> None:
    spec = _write(tmp_path, order=order, accumulate=3)
    torch.manual_seed(0)
    big = xdsl.load(spec)
    small = xdsl.load(spec)
    small.compiled.root.load_state_dict(big.compiled.root.state_dict())
    small.use_stage("mutual")  # fresh optimisers over the loaded weights
    start = _weights(big)
    x, y = _batch(24)
    for _ in range(2):  # two steps: momentum buffers too
        big.train_step(x, y)
        # unequal micro-batches (10 + 8 + 6): weighted by their sample counts, still exact
        small.accumulate_step([(x[:10], y[:10]), (x[10:18], y[10:18]), (x[18:], y[18:])])
    a, b = _weights(big), _weights(small)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the steps did move the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_accumulate_reaches_the_runner_and_counts_steps(tmp_path: Path) -> None:
    """`accumulate 2` with batch 16 trains like batch 32: half as many optimiser steps per epoch."""
    out1, out2 = tmp_path / "one", tmp_path / "two"
    torch.manual_seed(0)
    run(_write(tmp_path, "a.xspec", bs=32), RunOptions(out=out1, quiet=True, device="cpu"))
    torch.manual_seed(0)
    run(_write(tmp_path, "b.xspec", bs=16, accumulate=2), RunOptions(out=out2, quiet=True, device="cpu"))
    s1 = torch.load(out1 / "checkpoints/mutual/last.pt", weights_only=True)
    s2 = torch.load(out2 / "checkpoints/mutual/last.pt", weights_only=True)
    assert s1["step_count"] == s2["step_count"]  # 360 training samples: ceil(360/32) == ceil(ceil(360/16)/2)


def test_an_accumulate_setting_is_checked_like_any_other(tmp_path: Path) -> None:
    spec = tmp_path / "bad.xspec"
    spec.write_text(SPEC.format(bs=32, epochs=1, order="alternating", accumulate=0))
    with pytest.raises(xdsl.SpecError) as err:
        xdsl.load(spec)
    assert "accumulate" in str(err.value)


def test_fp16_scaler_skips_an_overflowing_step_and_counts_it(tmp_path: Path) -> None:
    exp = xdsl.load(_write(tmp_path))
    exp.amp = torch.float16
    exp.use_stage("mutual")  # builds one GradScaler per optimiser
    assert set(exp.scalers) == {"a", "b"}
    exp.scalers["a"] = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the scaled loss overflows to inf
    before = _weights(exp)
    exp.train_step(*_batch())
    after = _weights(exp)
    a_keys = [k for k in before if ".a." in k]
    b_keys = [k for k in before if ".b." in k]
    assert a_keys and b_keys
    assert all(torch.equal(before[k], after[k]) for k in a_keys)   # skipped
    assert any(not torch.equal(before[k], after[k]) for k in b_keys)  # b stepped normally
    assert exp.skipped_steps == {"a": 1, "b": 0}
    assert exp.scalers["a"].get_scale() < 2.0 ** 127  # backed off


def test_fp16_run_logs_skipped_steps_and_learns(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(_write(tmp_path, epochs=5), RunOptions(out=out, quiet=True, device="cpu", amp="fp16"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("skipped_steps" in r for r in rows)
    assert max(r["test_acc"] for r in rows[-2:]) > 0.6  # measured 79% (fp32: 89%); chance is 10%
    last = torch.load(out / "checkpoints/mutual/last.pt", weights_only=True)
    assert set(last["scalers"]) == {"a", "b"}  # resumable: the scale is part of the checkpoint
    assert json.loads((out / "environment.json").read_text())["amp"] == "float16"


def test_per_term_metrics_are_each_terms_epoch_mean(tmp_path: Path) -> None:
    """Every term of each network's objective is logged under its text; ce + kl = the objective."""
    out = tmp_path / "run"
    run(_write(tmp_path, epochs=2), RunOptions(out=out, quiet=True, device="cpu"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        terms = r["terms"]
        assert len(terms) == 2, terms  # ce(s, y) and kl(t, s)
        assert any(k.startswith("ce(") for k in terms) and any(k.startswith("kl(") for k in terms)
        assert sum(terms.values()) == pytest.approx(r["train_loss"], rel=1e-5)
    csv_header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "term ce(" in csv_header and "term kl(" in csv_header


def test_term_means_match_a_hand_written_computation(tmp_path: Path) -> None:
    exp = xdsl.load(_write(tmp_path))
    exp.reset_term_sums()
    batches = [_batch(16, seed) for seed in range(3)]
    expected_ce = []
    for x, y in batches:
        with torch.no_grad():
            expected_ce.append(float(F.cross_entropy(exp.networks["a"](x), y)))  # a steps first (alternating)
        exp.train_step(x, y)
    means = exp.term_means()["a"]
    ce = next(v for k, v in means.items() if k.startswith("ce("))
    assert ce == pytest.approx(sum(expected_ce) / 3, rel=1e-5)


def test_deterministic_runs_are_bit_identical_and_recorded(tmp_path: Path) -> None:
    outs = []
    try:
        for i in range(2):
            out = tmp_path / f"run{i}"
            run(_write(tmp_path, order="simultaneous"), RunOptions(out=out, quiet=True, device="cpu",
                                                                  deterministic=True))
            outs.append(torch.load(out / "checkpoints/mutual/final.pt", weights_only=True)["modules"])
        env = json.loads((tmp_path / "run0" / "environment.json").read_text())
    finally:
        torch.use_deterministic_algorithms(False)
    assert env["deterministic"] is True and env["torch"] == torch.__version__
    assert {"xdsl", "torchvision", "device", "git_commit", "command", "seed"} <= set(env)
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
