"""`data torchvision.<Class>(root=...)` and `data "module:fn"(...)`: datasets on disk and the user's own.

The torchvision datasets are fabricated in their real on-disk formats (MNIST's idx files, CIFAR's pickled
batches, SVHN's .mat files) and read back through torchvision's own classes; the files' MD5 sums, which
torchvision checks against the official release, are the only thing patched.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.data import DataParamError, build_data
from xdsl.data.images import CIFAR10_MEAN, CIFAR10_STD
from xdsl.errors import SpecError, SpecErrors
from xdsl.lang.check import check
from xdsl.lang.parser import parse_file

RNG = np.random.default_rng(0)


def _fashion_mnist(root: Path, n_train: int = 30, n_test: int = 12, folder: str = "FashionMNIST") -> Path:
    """root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, as torchvision's MNIST family reads them."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def _cifar10(root: Path, per_batch: int = 6) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}: CIFAR-10's python release."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {"data": data, "labels": [int(v) for v in RNG.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def _svhn(root: Path) -> Path:
    """root/{train,test}_32x32.mat: SVHN's cropped-digits release (X is H, W, C, N; label 10 means digit 0)."""
    from scipy.io import savemat

    root.mkdir(parents=True)
    for split, n in (("train", 8), ("test", 4)):
        savemat(root / f"{split}_32x32.mat", {"X": RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                               "y": np.array([10, 1, 2, 3, 4, 5, 6, 7][:n]).reshape(n, 1)})
    return root


@pytest.fixture
def no_md5(monkeypatch):
    """The fabricated files are in the real format but not the real bytes, so their MD5 sums differ."""
    import torchvision.datasets as tv

    monkeypatch.setattr(tv.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    monkeypatch.setattr(tv.SVHN, "_check_integrity", lambda self: True)


def _spec(tmp_path: Path, text: str, name: str = "s.xspec") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ torchvision datasets


def test_fashion_mnist_on_disk_is_read_through_torchvision_as_uint8(tmp_path):
    import torchvision.datasets as tv

    root = _fashion_mnist(tmp_path)
    bundle = build_data("torchvision.FashionMNIST", {"root": str(root), "num_workers": 0, "batch_size": 5})
    reference = tv.FashionMNIST(str(root), train=False, download=False)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10 and bundle.classes == reference.classes
    assert len(bundle.train) == 30 and len(bundle.test) == 12
    assert torch.equal(bundle.test.images[:, 0], reference.data) and torch.equal(bundle.test.labels, reference.targets)
    # the mean/std are the training images' own (no standard constants for FashionMNIST)
    train_pixels = tv.FashionMNIST(str(root), train=True).data.double() / 255
    assert bundle.test.eval_recipe.mean == pytest.approx((float(train_pixels.mean()),))
    assert bundle.test.eval_recipe.std == pytest.approx((float(train_pixels.std(unbiased=False)),))
    x, y = next(iter(bundle.test_loader()))
    expected = (reference.data[:5].double() / 255 - bundle.test.eval_recipe.mean[0]) / bundle.test.eval_recipe.std[0]
    assert torch.allclose(x[:, 0].double(), expected, atol=1e-5) and torch.equal(y, reference.targets[:5])
    assert bundle.train.train_recipe.flip  # clothes mirror; digits do not:


def test_digit_datasets_are_not_flipped(tmp_path, no_md5):
    mnist = build_data("torchvision.MNIST", {"root": str(_fashion_mnist(tmp_path / "m", folder="MNIST")),
                                             "num_workers": 0})
    svhn = build_data("torchvision.SVHN", {"root": str(_svhn(tmp_path / "s")), "num_workers": 0})
    assert not mnist.train.train_recipe.flip and not svhn.train.train_recipe.flip
    assert mnist.train.train_recipe.crop == svhn.train.train_recipe.crop == "pad"


def test_cifar10_uses_its_split_keyword_and_standard_constants(tmp_path, no_md5):
    import torchvision.datasets as tv

    root = _cifar10(tmp_path)
    bundle = build_data("torchvision.CIFAR10", {"root": str(root), "num_workers": 0})
    reference = tv.CIFAR10(str(root), train=True)
    assert bundle.input_shape == (3, 32, 32) and len(bundle.train) == 30 and len(bundle.test) == 6
    assert torch.equal(bundle.train.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert bundle.train.labels.tolist() == reference.targets and bundle.classes[0] == "airplane"
    assert (bundle.train.eval_recipe.mean, bundle.train.eval_recipe.std) == (tuple(CIFAR10_MEAN), tuple(CIFAR10_STD))


def test_svhn_reads_split_train_and_test_and_maps_label_10_to_0(tmp_path, no_md5):
    bundle = build_data("torchvision.SVHN", {"root": str(_svhn(tmp_path / "svhn")), "num_workers": 0})
    assert len(bundle.train) == 8 and len(bundle.test) == 4 and bundle.num_classes == 10
    assert bundle.test.labels.tolist() == [0, 1, 2, 3]  # torchvision's own mapping of the .mat labels
    assert bundle.classes == [str(i) for i in range(10)]  # SVHN's ten digits, though the files hold eight


def test_a_missing_dataset_is_one_located_error_saying_how_to_get_it(tmp_path):
    spec = _spec(tmp_path, 'data torchvision.FashionMNIST(root="nowhere", num_workers=0)\n'
                           'network a = builtin.mlp(in_features=784)\nindependent(a, epochs=1)\n')
    assert CliRunner().invoke(app, ["check", str(spec)]).exit_code == 0  # check reads no data
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "s.xspec:1:1: error: dataset 'torchvision.FashionMNIST': no FashionMNIST data under" in result.output
    assert str(tmp_path / "nowhere") in result.output and "download=True" in result.output
    assert not (tmp_path / "nowhere").exists()  # nothing downloaded, nothing created


@pytest.mark.parametrize("text, match", [
    ('data torchvision.FashionMnist(root="x")\n', r"1:1: error: unknown dataset 'torchvision.FashionMnist'.*"
                                                  r"did you mean 'torchvision.FashionMNIST'"),
    ('data torchvision.SVHN(batch_size=8)\n', r"1:1: error: dataset 'torchvision.SVHN' needs root="),
    ('data torchvision.EMNIST(root="x")\n', r"needs split="),  # EMNIST's split is its variant, with no default
    ('data torchvision.SVHN(root="x", split="test")\n', r"1:\d+: error: dataset 'torchvision.SVHN' has no "
                                                        r"parameter 'split'"),  # xdsl builds both splits
    ('data torchvision.CIFAR10(root="x", batch_sise=8)\n', r"has no parameter 'batch_sise'.*did you mean"),
    ('data torchvision.CIFAR10(root="x", download=true)\n', r"has no parameter 'download'"),
])
def test_torchvision_statements_are_checked_like_any_call(tmp_path, text, match):
    result = CliRunner().invoke(app, ["check", str(_spec(tmp_path, text))])
    assert result.exit_code != 0 and "Traceback" not in result.output
    import re

    assert re.search(match, " ".join(result.output.split())), result.output


def test_a_torchvision_spec_trains_end_to_end(tmp_path):
    _fashion_mnist(tmp_path / "data")
    spec = _spec(tmp_path, 'data torchvision.FashionMNIST(root="data", batch_size=10, num_workers=0)\n'
                           'network a, b = builtin.mlp(in_features=784, hidden=16)\n'
                           'dml(a, b, epochs=1, optimizer=sgd(lr=0.1))\n')
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "results.json").is_file()


# ------------------------------------------------------------------------------------ user datasets

_MODULE = '''
import torch
from torch.utils.data import Dataset, TensorDataset

CALLS = []


def load(n: int = 40, dim: int = 6, *, classes: int = 3):
    CALLS.append((n, dim, classes))
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g)
    y = torch.arange(n) % classes
    return TensorDataset(x, y), TensorDataset(x[: n // 4], y[: n // 4])


class Pairs(Dataset):
    num_classes = 5

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pairs(bad: str = ""):
    one = torch.ones(2, 3)
    train = [(one * i, i % 2) for i in range(6)]
    if bad == "int_x":
        train[3] = (torch.ones(2, 3, dtype=torch.long), 1)
    elif bad == "shape":
        train[4] = (torch.ones(3, 2), 1)
    elif bad == "label":
        train[2] = (one, -1)
    elif bad == "beyond":
        train[1] = (one, 5)
    elif bad == "single":
        return train
    elif bad == "raise":
        raise ValueError("no such file data.csv")
    return Pairs(train), Pairs(train[:2])


def needs(path):
    return pairs()


def anything(**kwargs):
    return pairs()
'''


@pytest.fixture
def user_dir(tmp_path):
    (tmp_path / "mydata.py").write_text(_MODULE)
    return tmp_path


def _user_spec(tmp_path: Path, call: str, net: str = "builtin.mlp(in_features=6, num_classes=3)") -> Path:
    return _spec(tmp_path, f"data {call}\nnetwork a, b = {net}\ndml(a, b, epochs=1, optimizer=sgd(lr=0.1))\n")


def test_a_user_function_gives_shape_classes_and_samples_and_is_called_once(user_dir):
    spec = _user_spec(user_dir, '"mydata:load"(n=64, classes=3, batch_size=16)')
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(user_dir / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    import sys

    assert sys.modules["mydata"].CALLS == [(64, 6, 3)]  # the shape check and the training data: one call
    bundle = build_data("mydata:load", {"n": 64, "classes": 3}, spec_dir=user_dir)
    assert bundle.input_shape == (6,) and bundle.num_classes == 3 and len(bundle.train) == 64
    assert len(bundle.test) == 16 and bundle.train[5][1] == 2 and isinstance(bundle.train[5][1], int)
    x, y = next(iter(bundle.train_loader(0)))
    assert x.dtype == torch.float32 and y.dtype == torch.long


def test_a_declared_num_classes_counts_and_any_dataset_of_pairs_works(user_dir):
    bundle = build_data("mydata:pairs", {}, spec_dir=user_dir)
    assert bundle.num_classes == 5 and bundle.input_shape == (2, 3) and len(bundle.train) == 6


@pytest.mark.parametrize("bad, match", [
    ("int_x", r"x of sample 3 of the train set is a torch.int64 tensor"),
    ("shape", r"sample 4 of the train set has shape \(3, 2\), but sample 0 of the train set has \(2, 3\)"),
    ("label", r"sample 2 of the train set has label -1"),
    ("beyond", r"label 5 is outside the 5 classes \(num_classes\)"),
    ("single", r"returned list; it must return \(train, test\)"),
    ("raise", r"mydata:pairs\(bad='raise'\) raised ValueError: no such file data.csv"),
])
def test_what_a_user_function_returns_is_checked(user_dir, bad, match):
    with pytest.raises(DataParamError, match=match):
        build_data("mydata:pairs", {"bad": bad}, spec_dir=user_dir)


@pytest.mark.parametrize("call, match", [
    ('"mydata:load"(m=3)', r"s.xspec:1:20: error: dataset 'mydata:load' has no parameter 'm'"),
    ('"mydata:load"(n="many")', r"s.xspec:1:\d+: error: .*n"),
    ('"mydata:needs"()', r"s.xspec:1:1: error: dataset 'mydata:needs' needs path="),
    ('"mydata:nothing"()', r"s.xspec:1:1: error: .*nothing"),
    ('"elsewhere:load"()', r"s.xspec:1:1: error: dataset 'elsewhere:load' needs Python module 'elsewhere', which is "
                           r"not beside the spec file.*--allow-imports"),
])
def test_user_data_statements_are_checked_at_their_place(user_dir, call, match):
    import re

    result = CliRunner().invoke(app, ["check", str(_user_spec(user_dir, call))])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert re.search(match, " ".join(result.output.split())), result.output


def test_a_user_function_taking_kwargs_gets_every_keyword_but_xdsls(user_dir):
    spec = _user_spec(user_dir, '"mydata:anything"(colour="red", batch_size=2)', "builtin.mlp(in_features=6)")
    program = check(parse_file(spec))
    assert program.data.kwargs == {"colour": "red", "batch_size": 2}
    bundle = build_data("mydata:anything", {"colour": "red", "batch_size": 2}, spec_dir=user_dir)
    assert bundle.batch_size == 2 and bundle.num_classes == 5


def test_the_class_count_of_user_data_reaches_the_fit_check(user_dir):
    spec = _user_spec(user_dir, '"mydata:load"(classes=4)', "builtin.mlp(in_features=6, num_classes=3)")
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(user_dir / "run"), "--device", "cpu", "-q"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "a has 3 class outputs, but data mydata:load has 4 classes" in " ".join(result.output.split())


def test_user_shapes_reach_the_checker(user_dir):
    spec = _user_spec(user_dir, '"mydata:load"(dim=5)')
    with pytest.raises((SpecError, SpecErrors), match=r"cannot take a tensor of shape \(2, 5\)"):
        from xdsl.experiment import load

        load(spec)


def test_more_class_outputs_than_the_data_has_classes_is_a_located_warning(user_dir):
    spec = _user_spec(user_dir, '"mydata:load"(classes=3)', "builtin.mlp(in_features=6)")  # mlp's 10 outputs
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(user_dir / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output  # it trains, but says what it trains
    text = " ".join(result.output.split())
    assert "s.xspec:3:1: warning: ce(): a has 10 class outputs, but data mydata:load has 3 classes: 7 of them " \
           "never see a label" in text and "build a with num_classes=3" in text
