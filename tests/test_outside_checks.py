"""Outside checks: a user's mistakes found by attacking features from outside, each a located error."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.compile.data_fit import check_data_fit
from xdsl.data.bundle import DataBundle
from xdsl.errors import SpecError
from xdsl.experiment import compile_program


def test_a_network_with_fewer_outputs_than_the_data_has_classes_fails_before_training(tmp_path: Path):
    spec = tmp_path / "few.xspec"
    spec.write_text("data digits(batch_size=32)\nnetwork s = builtin.cnn(num_classes=5, in_channels=1, width=4)\n"
                    "train { minimize ce(s, y) wrt s; epochs 1 }\n")
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 2, result.output
    assert "few.xspec:3:18: error: ce(): s has 5 class outputs, but data digits has 10 classes" in result.output
    assert "num_classes=10" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "run").rglob("metrics.jsonl"))


def test_mixup_needs_exactly_one_output_per_class(tmp_path: Path):
    spec = tmp_path / "mix.xspec"
    spec.write_text("data cifar10(augment=[mixup(alpha=0.2)])\n"
                    "network a = builtin.mlp(in_features=3072, hidden=8, num_classes=100)\n"
                    "network b = builtin.mlp(in_features=3072, hidden=8, num_classes=10)\n"
                    "network t = builtin.mlp(in_features=3072, hidden=8, num_classes=5)\n"  # features only: free
                    "cut t at \"layer1\" into body, head\n"
                    "train { minimize ce(s, y) + l2(t.body, t.body) wrt s for s in [a, b]; epochs 1 }\n")
    compiled = compile_program(spec, device="meta")
    bundle = DataBundle(train=None, test=None, num_classes=10, input_shape=(3, 32, 32), batch_size=8,
                        num_workers=0, name="cifar10", batch_mix=object())
    with pytest.raises(SpecError) as info:
        check_data_fit(compiled, bundle)
    assert (info.value.pos.line, info.value.message) == (
        6, "ce(): a has 100 class outputs, but data cifar10 has 10 classes "
           "(mixup/cutmix labels have one column per class)")
    bundle.batch_mix = None  # hard labels: more outputs than classes is the user's choice (ce takes it)
    check_data_fit(compiled, bundle)


RANKED = ("data digits(batch_size=64, train_fraction=0.2)\n"
          "network n1, n2 = builtin.cnn(num_classes=10, in_channels=1, width=4)\ncut n1, n2 at \"pool\" into up, down\n"
          "train t {{ minimize ce(s, y) wrt s for s in [n1, n2]; epochs 1; max_steps 1 }}\n"
          "evaluate {}\n")


def test_each_ranked_item_reports_its_own_k_though_they_share_one_pass(tmp_path: Path):
    import json

    spec = tmp_path / "r.xspec"
    spec.write_text(RANKED.format("ranked(n1, k=3), ranked(n1.up >> n2.down, k=5), accuracy(n1), ranked(n2, k=10)"))
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    items = json.loads((tmp_path / "run" / "results.json").read_text())["stages"]["t"]["evaluate"]["items"]
    assert [[len(r.get("ranked") or []) for r in i["rows"]] for i in items] == [[3], [5], [0], [10]]


def test_ranked_k_beyond_the_class_outputs_is_a_located_error(tmp_path: Path):
    spec = tmp_path / "r.xspec"
    spec.write_text(RANKED.format("accuracy, ranked(n2, k=12)"))
    with pytest.raises(SpecError) as info:
        compile_program(spec, device="meta")
    assert (info.value.pos.line, info.value.pos.col) == (5, 20)
    assert info.value.message == "ranked(): k=12 is more than the 10 classes the networks output"


def test_xdsl_eval_scores_the_training_set_of_the_seed_that_wrote_the_checkpoint(tmp_path: Path):
    """With val_fraction each seed holds out other samples: `xdsl eval` of seed 1's weights must rebuild
    seed 1's split, so `accuracy(split="train")` equals what the run itself reported."""
    import json

    import torch

    from xdsl.train.eval_checkpoint import _run_seed, evaluate_checkpoint

    spec = tmp_path / "v.xspec"
    spec.write_text("data digits(batch_size=64, train_fraction=0.3, val_fraction=0.5)\n"
                    "network n = builtin.cnn(num_classes=10, in_channels=1, width=4)\n"
                    "train t { minimize ce(n, y) wrt n; epochs 1; max_steps 2 }\n"
                    'evaluate accuracy(split="train")\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu", "-q", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    ran = json.loads((out / "seed1" / "results.json").read_text())["stages"]["t"]["evaluate"]["items"][0]["rows"][0]
    final = out / "seed1" / "checkpoints" / "t" / "final.pt"
    again = evaluate_checkpoint(spec, final, device="cpu")["items"][0]["rows"][0]
    assert again["loss"] == pytest.approx(ran["loss"], rel=1e-6)
    state = torch.load(final, weights_only=False)
    assert state["seed"] == 1 and _run_seed({"modules": {}}, final) == 1  # older checkpoints: environment.json


def test_split_train_items_share_one_pass_over_the_training_set(tmp_path: Path, monkeypatch):
    import xdsl
    from xdsl.data import build_data
    from xdsl.eval.engine import Engine
    from xdsl.eval.evaluate import evaluate_items

    spec = tmp_path / "r.xspec"
    spec.write_text(RANKED.format('accuracy(n1, split="train"), entropy(n1.up >> n2.down, split="train"), '
                                  'ranked(n2, k=3, split="train"), accuracy'))
    exp = xdsl.load(spec)
    bundle = build_data("digits", {"batch_size": 64, "train_fraction": 0.2})
    passes = []
    original = Engine.run_paths

    def counted(self, loader, paths, ranked=0):
        passes.append((sorted(paths), ranked))
        return original(self, loader, paths, ranked)

    monkeypatch.setattr(Engine, "run_paths", counted)
    items = evaluate_items(exp, bundle.test_loader(), exp.program.evaluate, device="cpu", data=bundle)["items"]
    assert passes[0] == (["n1.up >> n1.down", "n1.up >> n2.down", "n2.up >> n2.down"], 3)  # then the shared test pass
    assert len([p for p in passes if p[1] == 3]) == 1
    assert [len(r.get("ranked") or []) for i in items for r in i["rows"]] == [0, 0, 3, 0, 0]


def test_eval_train_on_reid_data_measures_the_training_identities(tmp_path: Path):
    """Re-id test identities are not classes (no test accuracy), but its training identities are: eval_train
    was silently ignored there."""
    import json

    spec = tmp_path / "re.xspec"
    spec.write_text("data synthetic_reid(identities=8, test_identities=8, cameras=2, images_per_camera=2)\n"
                    "network n = builtin.cnn(num_classes=8, in_channels=3, width=4)\n"
                    "train t { minimize ce(n, y) wrt n; epochs 2; eval_train true }\nevaluate retrieval(n)\n")
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [0 <= r["train_acc"] <= 1 for r in rows] == [True, True] and all(r["test_acc"] is None for r in rows)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1", '"0.1"'])
def test_a_val_fraction_out_of_range_is_a_check_time_error_at_the_value(tmp_path: Path, value: str):
    from xdsl.lang.check import check
    from xdsl.lang.parser import parse

    text = f"data digits(val_fraction={value})\n"
    with pytest.raises(SpecError) as info:
        check(parse(text, str(tmp_path / "v.xspec")))
    assert info.value.message.startswith("val_fraction must be a number in [0, 1)")
    assert (info.value.pos.line, info.value.pos.col) == (1, text.index(value) + 1)
