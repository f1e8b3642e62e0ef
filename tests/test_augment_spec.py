"""`augment=[...]` in the data statement: checked in the spec, compiled to the batched Recipe where it can be,
torchvision v2 per sample otherwise (reproducible for any worker count), mixup/cutmix with soft labels."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from xdsl.data import DataParamError, build_data
from xdsl.data.augment import BatchMix, SampleTransform, to_recipe
from xdsl.data.batch_augment import Recipe
from xdsl.errors import SpecError, XdslError
from xdsl.lang.check import check
from xdsl.lang.format import format_spec
from xdsl.lang.parser import parse
from xdsl.losses import SOFT_LABELS, ce, cwtm, kd, loss_signature
from xdsl.overrides import apply_overrides

TRAIN = "network s = builtin.mlp(hidden=8)\ntrain {{\n    minimize {loss} wrt s\n    epochs 1\n}}\n"


def _spec(augment: str, loss: str = "ce(s, y)", dataset: str = "cifar10") -> str:
    return f"data {dataset}(augment={augment})\n" + TRAIN.format(loss=loss)


def _error(text: str) -> SpecError:
    with pytest.raises(XdslError) as info:
        check(parse(text, "t.xspec"))
    errors = getattr(info.value, "errors", [info.value])
    return errors[0]


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    """A CIFAR-10 python-pickle directory with 40 random training and 8 test images."""
    root = tmp_path / "cifar"
    root.mkdir()
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        return {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                b"labels": [int(v) for v in rng.integers(0, 10, size=n)]}

    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(8), protocol=2))
    (root / "test_batch").write_bytes(pickle.dumps(batch(8), protocol=2))
    return root


# ------------------------------------------------------------------------------------------ checking


def test_checked_items_are_plain_data_with_positional_arguments_named():
    program = check(parse(_spec("[random_resized_crop(32, scale=[0.5, 1.0]), hflip, randaugment(n=2, m=9), "
                                "mixup(alpha=0.2)]"), "t.xspec"))
    assert program.data.kwargs["augment"] == [
        ["random_resized_crop", {"size": 32, "scale": [0.5, 1.0]}], ["hflip", {}],
        ["randaugment", {"num_ops": 2, "magnitude": 9}], ["mixup", {"alpha": 0.2}]]
    assert json.loads(json.dumps(program.data.kwargs)) == program.data.kwargs


@pytest.mark.parametrize("augment, message, at, hint", [
    ("[random_crop(32), hflipp]", "unknown transform 'hflipp'", "hflipp", "did you mean 'hflip'?"),
    ("[random_crop(32, paddding=4)]", "has no parameter 'paddding'", "paddding", "did you mean 'padding'?"),
    ("[randaugment(num_op=2)]", "has no parameter 'num_op'", "num_op", "did you mean 'num_ops'?"),
    ("[random_crop(-32)]", "'size' must be a positive integer", "-32", None),
    ("[hflip(p=1.5)]", "'p' must be a probability in [0, 1]", "p=", None),
    ("[color_jitter(brightness=-1)]", "bad value for 'brightness'", "brightness", None),
    ("[random_resized_crop(32, scale=[1.0, 0.5])]", "'scale' must be a list [min, max]", "scale", None),
    ("[mixup(0.2)]", "mixup() takes keywords only", "mixup", "mixup(alpha=...)"),
    ("[random_crop]", "random_crop() needs size=", "random_crop", None),
    ("[3]", "not a transform", "3", None),
    ("[random_flip]", "unknown transform 'random_flip'", "random_flip", "transforms with 'flip': random_horiz"),
    ("[random_rotation(10, interpolation=bicubick)]", "unknown interpolation 'bicubick'", "interpolation",
     "did you mean 'bicubic'?"),
    # a zero std divides by zero (the batched recipe too): NaN at the first step, reported as a learning-rate problem
    ("[normalize(mean=[0.5, 0.5, 0.5], std=[0, 1, 1])]", "'std' must be a list of numbers, one per channel, each > 0",
     "std", None),
    ("[normalize(mean=0.5, std=0.5)]", "'mean' must be a list of numbers", "mean", None),
    ("[hflip, normalize, normalize]", "augment lists normalize twice", "normalize]", "keep one normalize"),
])
def test_mistakes_are_located_with_a_hint(augment, message, at, hint):
    text = _spec(augment)
    err = _error(text)
    assert message in err.message and (err.pos.line, err.pos.col) == (1, text.index(at) + 1)
    assert hint is None or hint in (err.hint or "")


def test_non_image_dataset_says_it_has_no_augmentation():
    err = _error(_spec("[hflip]", dataset="digits"))
    assert "has no image augmentation" in err.message and err.pos.line == 1 and "cifar10" in err.hint


def test_mixup_rejects_primitives_that_need_hard_labels_and_accepts_soft_ones():
    err = _error("data cifar10(augment=[cutmix(alpha=1.0)])\nnetwork s, t = builtin.mlp(hidden=8)\n"
                 "train {\n    minimize ce(s, y) + dkd(t, s, y) wrt s\n    epochs 1\n}\n")
    assert "cutmix makes y soft" in err.message and "dkd() needs hard labels" in err.message
    assert (err.pos.line, err.pos.col) == (4, 25)
    check(parse(_spec("[mixup(alpha=0.2)]", "kd(s, s, y) + cwtm(s, s, y) + ce(s, y, label_smoothing=0.1)"), "t"))
    check(parse(_spec("[hflip]", "dkd(s, s, y)"), "t.xspec"))  # no mixup: hard labels, fine
    takes_labels = {n for n in ("ce", "kd", "cwtm", "dkd", "dkpp", "crd") if loss_signature(n).param("y")}
    assert SOFT_LABELS <= takes_labels and takes_labels - SOFT_LABELS == {"dkd", "dkpp"}


def test_expand_and_set_round_trip_the_list():
    spec = parse(_spec("[random_crop(32, padding=4), hflip, mixup(alpha=0.2)]"), "t.xspec")
    again = parse(format_spec(spec), "u.xspec")
    assert again == spec and check(again).data.kwargs == check(spec).data.kwargs
    changed = apply_overrides(spec, {"data.augment": "[trivial_augment, cutmix(alpha=1.0)]"})
    assert check(changed).data.kwargs["augment"] == [["trivial_augment", {}], ["cutmix", {"alpha": 1.0}]]
    with pytest.raises(XdslError, match="unknown transform 'trivial'"):
        check(apply_overrides(spec, {"data.augment": "[trivial]"}))


# ------------------------------------------------------------------------------------------- execution


def test_recipe_compilation():
    mean, std = (0.5,) * 3, (0.25,) * 3
    crop = ["random_crop", {"size": 32, "padding": 4, "padding_mode": "reflect"}]
    assert to_recipe([crop, ["hflip", {}]], mean, std, (32, 32)) == Recipe(mean, std, crop="pad", flip=True)
    assert to_recipe([["hflip", {}], crop], mean, std, (32, 32)) == Recipe(mean, std, crop="pad", flip=True)
    assert to_recipe([], mean, std, (32, 32)) == Recipe(mean, std)
    resized = to_recipe([["random_resized_crop", {"size": 24, "scale": [0.5, 1.0]}],
                         ["normalize", {"mean": [0.1] * 3, "std": [0.2] * 3}]], mean, std, (32, 32))
    assert resized == Recipe((0.1,) * 3, (0.2,) * 3, crop="resized", size=(24, 24), scale=(0.5, 1.0))
    for beyond in ([["hflip", {"p": 0.3}]], [["randaugment", {}]], [crop, crop],
                   [["random_crop", {"size": 32, "padding": 4, "padding_mode": "symmetric"}]],
                   [["normalize", {}], ["hflip", {}]]):
        assert to_recipe(beyond, mean, std, (32, 32)) is None


def test_listed_default_recipe_gives_bit_identical_batches(cifar: Path):
    kw = {"root": str(cifar), "batch_size": 16, "num_workers": 0}
    default = build_data("cifar10", kw, seed=3)
    listed = build_data("cifar10", {**kw, "augment": [["random_crop", {"size": 32, "padding": 4,
                                                                       "padding_mode": "reflect"}], ["hflip", {}]]},
                        seed=3)
    for bundle in (default, listed):
        assert "batched pipeline" in bundle.use_device(torch.device("cpu"))
    for epoch in (0, 1):
        for (x0, y0), (x1, y1) in zip(default.train_loader(epoch), listed.train_loader(epoch), strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert "compiled to the batchable recipe" in listed.notes[-1]
    none = build_data("cifar10", {**kw, "augment": []}, seed=3)
    assert not none.train.recipe().random and torch.equal(none.train[5][0], none.train.eval_view()[5][0])


def test_v2_fallback_is_reproducible_for_any_worker_count(cifar: Path):
    items = [["random_crop", {"size": 32, "padding": 4}], ["randaugment", {"num_ops": 2, "magnitude": 9}],
             ["normalize", {}], ["random_erasing", {"p": 0.5}]]
    kw = {"root": str(cifar), "batch_size": 10, "augment": items}
    batches = []
    for workers in (0, 2):
        bundle = build_data("cifar10", {**kw, "num_workers": workers}, seed=1)
        line = bundle.use_device(torch.device("cpu"))
        assert "per-sample pipeline (augment runs torchvision.transforms.v2 per sample" in line
        torch.manual_seed(workers)  # the global RNG must not matter
        batches.append([b for b in bundle.train_loader(7)])
    for (x0, y0), (x1, y1) in zip(*batches, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    with pytest.raises(DataParamError, match="cannot run dataset 'cifar10': augment runs torchvision.transforms.v2"):
        build_data("cifar10", {**kw, "pipeline": "batched"})
    other_epoch = torch.cat([x for x, _ in bundle.train_loader(8)])
    assert not torch.equal(torch.cat([x for x, _ in batches[0]]), other_epoch)
    state = torch.get_rng_state()
    img = bundle.train.images[0]
    SampleTransform(items, (0.5,) * 3, (0.5,) * 3)(img, 1, 2, 3)
    assert torch.equal(state, torch.get_rng_state())  # the trainer's stream is untouched
    for only in ([["trivial_augment", {}]], [["normalize", {}]], []):  # nothing before or after normalize
        out = SampleTransform(only, (0.5,) * 3, (0.5,) * 3)(img, 1, 2, 3)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    plain = SampleTransform([], (0.5,) * 3, (0.5,) * 3)(img, 1, 2, 3)
    assert torch.allclose(plain, (img.float() / 255 - 0.5) / 0.5, atol=1e-6)


def test_bad_output_size_is_a_data_error(cifar: Path):
    with pytest.raises(DataParamError, match="augment makes 3x64x64 training images"):
        build_data("cifar10", {"root": str(cifar), "augment": [["random_resized_crop", {"size": 64}]]})
    with pytest.raises(DataParamError, match="unknown transform 'hfilp'"):
        build_data("cifar10", {"root": str(cifar), "augment": ["hfilp"]})


def test_mixup_soft_labels_and_exact_replay(cifar: Path):
    kw = {"root": str(cifar), "batch_size": 8, "num_workers": 0,
          "augment": [["hflip", {}], ["mixup", {"alpha": 0.2}], ["cutmix", {"alpha": 1.0}]]}
    bundle = build_data("cifar10", kw, seed=4)
    bundle.use_device(torch.device("cpu"))
    first = list(bundle.train_loader(2))
    for _, y in first:
        assert y.shape == (8, 10) and y.dtype == torch.float32
        assert torch.allclose(y.sum(1), torch.ones(8)) and (y >= 0).all()
    assert any((y.max(1).values < 1).any() for _, y in first)  # some rows really are mixed
    resumed = build_data("cifar10", kw, seed=4)  # a fresh process resuming epoch 2
    resumed.use_device(torch.device("cpu"))
    for (x0, y0), (x1, y1) in zip(first, resumed.train_loader(2), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_batch_mix_is_v2_mixup_seeded_per_batch():
    from torchvision.transforms import v2

    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 4
    mix = BatchMix([("mixup", {"alpha": 0.4})], 4, seed=9)
    got = mix(x.clone(), y, 1, 5)
    with torch.random.fork_rng(devices=[]):
        from xdsl.data.batch_augment import mix64

        torch.default_generator.manual_seed(mix64(9, 1, 5, 0x6D6978) >> 1)
        want = v2.MixUp(alpha=0.4, num_classes=4)(x.clone(), y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    lam = want[1][0, 0].item()  # sample 0 is class 0, mixed with sample 5 (class 1)
    assert torch.allclose(got[0][0], lam * x[0] + (1 - lam) * x[5], atol=1e-6)


def test_soft_label_primitives_match_hand_formulas():
    p, t = torch.randn(5, 4), torch.randn(5, 4)
    q = torch.softmax(torch.randn(5, 4), 1)  # soft labels
    hand_ce = -(q * torch.log_softmax(p, 1)).sum(1)
    assert torch.allclose(ce(p, q), hand_ce.mean(), atol=1e-6)
    smooth = q * 0.9 + 0.1 / 4
    assert torch.allclose(ce(p, q, label_smoothing=0.1), -(smooth * torch.log_softmax(p, 1)).sum(1).mean(), atol=1e-6)
    conf = torch.softmax(t, 1).amax(1)
    assert torch.allclose(cwtm(t, p, q), (conf / conf.sum() * hand_ce).sum(), atol=1e-6)
    kl = F.kl_div(torch.log_softmax(p / 4, 1), torch.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(kd(t, p, q, T=4.0, alpha=0.9), 0.9 * kl + 0.1 * hand_ce.mean(), atol=1e-5)


def test_run_with_augment_and_mixup_end_to_end(cifar: Path, tmp_path: Path):
    from xdsl.cli import app

    spec = tmp_path / "mix.xspec"
    spec.write_text(f'data cifar10(root="{cifar}", batch_size=16, num_workers=0, '
                    'augment=[random_crop(32, padding=4), hflip, mixup(alpha=0.2)])\n'
                    'network s = builtin.mlp(in_features=3072, hidden=16)\n'
                    'train {\n    minimize ce(s, y) wrt s\n    epochs 1\n    eval_train true\n}\n')
    out = tmp_path / "run"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "batched pipeline" in result.output and "mixup(alpha=0.2) on each training batch" in result.output
    rows = [json.loads(line) for line in next(out.rglob("metrics.jsonl")).read_text().splitlines()]
    assert 0 <= rows[-1]["train_acc"] <= 1 and 0 <= rows[-1]["test_acc"] <= 1  # hard labels, unaugmented
    recorded = (next(out.rglob("spec.xspec"))).read_text()
    assert "augment=[random_crop(32, padding=4), hflip, mixup(alpha=0.2)]" in recorded
    assert check(parse(recorded, "spec.xspec")).data.kwargs["augment"][2] == ["mixup", {"alpha": 0.2}]


def test_interrupted_run_with_v2_augment_and_mixup_resumes_bit_identical(cifar: Path, tmp_path: Path):
    """Ctrl-C mid-epoch, then --resume: the final weights equal an uninterrupted run's (per-sample v2 path)."""
    from xdsl.checkpoint import load_checkpoint
    from xdsl.train.runner import RunOptions, run

    spec = tmp_path / "resume.xspec"
    spec.write_text(f'data cifar10(root="{cifar}", batch_size=8, num_workers=0, '
                    'augment=[random_crop(32, padding=4), trivial_augment, mixup(alpha=0.4), cutmix(alpha=1.0)])\n'
                    'network s = builtin.mlp(in_features=3072, hidden=8)\n'
                    'train {\n    minimize ce(s, y, label_smoothing=0.1) wrt s\n    epochs 2\n}\n')
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    run(spec, RunOptions(out=reference, quiet=True, device="cpu"))
    with pytest.raises(KeyboardInterrupt):
        run(spec, RunOptions(out=out, quiet=True, device="cpu", stop_after_steps=7))  # epoch 2, batch 2 of 5
    run(spec, RunOptions(out=out, quiet=True, device="cpu", resume=True))
    got, want = (load_checkpoint(d / "checkpoints" / "train1" / "final.pt")["modules"] for d in (out, reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_xdsl_check_reports_an_augment_mistake_without_building_data(tmp_path: Path):
    from xdsl.cli import app

    spec = tmp_path / "bad.xspec"
    spec.write_text(_spec('[random_crop(32, padding=4), color_jiter(brightness=0.4)]', dataset="cifar100"))
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["check", str(spec)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "bad.xspec:1:52:" in result.output and "unknown transform 'color_jiter'" in result.output
    assert "did you mean 'color_jitter'?" in result.output
