"""Dataset layer: embedded datasets, real on-disk formats (fabricated tiny copies), loaders, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from xdsl.data import DATASETS, DataBundle, DataParamError, build_data, dataset_params
from xdsl.errors import XdslError

# ----------------------------------------------------------------------------------------- fixtures


def _write_pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict:
    return {
        b"batch_label": b"fabricated",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_pickle(root / f"data_batch_{i}", _cifar_batch(rng, 4, b"labels", 10))
    _write_pickle(root / "test_batch", _cifar_batch(rng, 6, b"labels", 10))
    _write_pickle(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return root


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(1)
    _write_pickle(root / "train", _cifar_batch(rng, 10, b"fine_labels", 100))
    _write_pickle(root / "test", _cifar_batch(rng, 5, b"fine_labels", 100))
    _write_pickle(root / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return root


WNIDS = ["n02", "n01"]  # deliberately unsorted: class index follows sorted order


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    rng = np.random.default_rng(0)

    def image(path: Path, channels: int = 3, size: int = 64) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path, format="JPEG")

    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tshark\n")
    for w in WNIDS:
        for i in range(3):
            image(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    (root / "train" / "n01" / "n01_boxes.txt").write_text("ignored\n")
    lines = []
    for i, w in enumerate(["n01", "n02", "n02", "n01"]):
        # one grayscale and one odd-sized image: both must come out as (3, 64, 64)
        image(
            root / "val" / "images" / f"val_{i}.JPEG", channels=1 if i == 1 else 3, size=56 if i == 2 else 64
        )
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def _order(bundle: DataBundle, epoch_seed: int) -> torch.Tensor:
    return torch.cat([y for _, y in bundle.train_loader(epoch_seed)])


# ------------------------------------------------------------------------------------------- digits


def test_registry_and_params():
    assert set(DATASETS) == {"digits", "synthetic", "cifar10", "cifar100", "tiny_imagenet", "image_folder",
                             "imagenet", "market1501",
                             "synthetic_reid"}
    pipeline = {"pipeline": "auto", "memory_budget": "25%"}  # every dataset accepts these
    assert dataset_params("digits") == {"train_fraction": 0.5, "batch_size": 64, "val_fraction": 0.0, **pipeline}
    assert dataset_params("synthetic")["shape"] == [3, 8, 8]
    assert dataset_params("cifar10") == {
        "root": "data/cifar-10-batches-py",
        "batch_size": 64,
        "num_workers": 2,
        "augment": True,
        "val_fraction": 0.0,
        **pipeline,
    }
    assert dataset_params("cifar100")["root"] == "data/cifar-100-python"
    assert dataset_params("tiny_imagenet") == {
        "root": "data/tiny-imagenet-200",
        "batch_size": 128,
        "num_workers": 4,
        "augment": True,
        "cache_dir": "",
        "val_fraction": 0.0,
        **pipeline,
    }


def test_digits_shapes_split_and_normalisation():
    b = build_data("digits", {})
    assert (b.num_classes, b.input_shape, b.batch_size, b.num_workers) == (10, (1, 8, 8), 64, 0)
    xtr, ytr = b.train.tensors
    xte, yte = b.test.tensors
    assert len(b.train) + len(b.test) == 1797
    assert len(b.train) == 898
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert abs(float(xtr.mean())) < 1e-4 and abs(float(xtr.std()) - 1) < 1e-3
    # stratified: every class in both splits, in proportions close to the whole set
    ctr, cte = torch.bincount(ytr, minlength=10), torch.bincount(yte, minlength=10)
    assert (ctr > 0).all() and (cte > 0).all()
    assert ((ctr - cte).abs() <= 1).all()
    x, y = b.sample_batch(3)
    assert x.shape == (3, 1, 8, 8) and torch.equal(y, yte[:3])


def test_digits_deterministic_and_train_fraction():
    a, b = build_data("digits", {"batch_size": 16}), build_data("digits", {"batch_size": 16})
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    small = build_data("digits", {"train_fraction": 0.2})
    assert len(small.train) == 359  # floor(0.2 * 1797), sklearn's rule
    assert torch.bincount(small.train.tensors[1], minlength=10).min() > 0


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable():
    kw = {"num_classes": 4, "shape": [2, 4, 4], "train_size": 64, "test_size": 32, "seed": 3}
    a, b = build_data("synthetic", kw), build_data("synthetic", kw)
    assert a.input_shape == (2, 4, 4) and a.num_classes == 4 and a.batch_size == 32
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    c = build_data("synthetic", {**kw, "seed": 4})
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    # nearest class centroid (fit on train) beats chance by far on test
    xtr, ytr = a.train.tensors
    xte, yte = a.test.tensors
    cent = torch.stack([xtr[ytr == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(xte.flatten(1), cent).argmin(1)
    assert (pred == yte).float().mean() > 0.6


def test_synthetic_flat_shape_and_tuple_accepted():
    b = build_data("synthetic", {"shape": (16,), "num_classes": 3})
    assert b.input_shape == (16,) and b.sample_batch(2)[0].shape == (2, 16)


# ------------------------------------------------------------------------------------------ loaders


def test_train_loader_order_depends_only_on_epoch_seed():
    b = build_data("digits", {"batch_size": 100})
    first = _order(b, 7)
    assert len(first) == len(b.train)  # drop_last=False
    assert torch.equal(first, _order(b, 7))
    assert not torch.equal(first, _order(b, 8))
    assert sorted(first.tolist()) == sorted(b.train.tensors[1].tolist())
    test = torch.cat([y for _, y in b.test_loader()])
    assert torch.equal(test, b.test.tensors[1])  # no shuffle
    assert b.test_loader() is b.test_loader()


def test_train_loader_with_sampler():
    b = build_data("synthetic", {"train_size": 40})
    sampler = DistributedSampler(b.train, num_replicas=2, rank=0, shuffle=True, seed=0)
    labels = [torch.cat([y for _, y in b.train_loader(e, sampler=sampler)]) for e in (1, 1, 2)]
    assert len(labels[0]) == 20
    assert torch.equal(labels[0], labels[1]) and not torch.equal(labels[0], labels[2])


def test_pin_memory_follows_device():
    assert build_data("digits", {}, device_is_cuda=True).train_loader(0).pin_memory
    assert not build_data("digits", {}).test_loader().pin_memory


# ------------------------------------------------------------------------------------ CIFAR formats


def test_cifar10_reads_pickles_and_augments(cifar10_dir: Path):
    b = build_data("cifar10", {"root": str(cifar10_dir), "num_workers": 0, "batch_size": 8})
    assert (b.num_classes, b.input_shape, len(b.train), len(b.test)) == (10, (3, 32, 32), 20, 6)
    assert b.classes == [f"c{i}" for i in range(10)]
    raw = pickle.loads((cifar10_dir / "test_batch").read_bytes(), encoding="bytes")
    x, y = b.sample_batch(2)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == raw[b"labels"][:2]
    # test transform is exactly "normalise with the CIFAR-10 statistics"
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expect = (torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255 - mean) / std
    assert torch.allclose(x[0], expect, atol=1e-5)
    # augmentation: deterministic per epoch seed, differs across epochs, not the identity
    epoch = [torch.cat([xb for xb, _ in b.train_loader(s)]) for s in (5, 5, 6)]
    assert epoch[0].shape == (20, 3, 32, 32)
    assert torch.equal(epoch[0], epoch[1]) and not torch.equal(epoch[0], epoch[2])
    b.train.augment = False
    plain = b.train[0][0]
    b.train.augment = True
    crops = []
    for e in range(8):
        b.train.set_epoch(e)
        crops.append(b.train[0][0])
    assert any(not torch.equal(c, plain) for c in crops)


def test_cifar_augmentation_independent_of_workers(cifar10_dir: Path):
    kw = {"root": str(cifar10_dir), "batch_size": 5}
    single = build_data("cifar10", {**kw, "num_workers": 0}, seed=1)
    multi = build_data("cifar10", {**kw, "num_workers": 2}, seed=1)
    a = [(x, y) for x, y in single.train_loader(3)]
    m = [(x, y) for x, y in multi.train_loader(3)]
    assert all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in zip(a, m, strict=True))
    other = build_data("cifar10", {**kw, "num_workers": 0}, seed=2)
    assert not torch.equal(torch.cat([x for x, _ in other.train_loader(3)]), torch.cat([x for x, _ in a]))


def test_cifar10_no_augment(cifar10_dir: Path):
    b = build_data("cifar10", {"root": str(cifar10_dir), "augment": False, "num_workers": 0})
    assert torch.equal(b.train[3][0], b.train[3][0])
    assert b.train.augment is False


def test_cifar100_fine_labels_and_relative_root(cifar100_dir: Path):
    b = build_data("cifar100", {"root": "cifar-100-python", "num_workers": 0}, spec_dir=cifar100_dir.parent)
    assert (b.num_classes, len(b.train), len(b.test)) == (100, 10, 5)
    raw = pickle.loads((cifar100_dir / "train").read_bytes(), encoding="bytes")
    assert b.train.labels.tolist() == raw[b"fine_labels"]
    assert b.classes is not None and b.classes[99] == "f99"
    assert b.sample_batch()[0].shape == (2, 3, 32, 32)


def test_cifar_rejects_non_array_pickles(cifar10_dir: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (cifar10_dir / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(XdslError, match="data_batch_3.*refusing"):
        build_data("cifar10", {"root": str(cifar10_dir)})


# ------------------------------------------------------------------------------------ Tiny ImageNet


def test_tiny_imagenet_layout(tiny_dir: Path):
    b = build_data("tiny_imagenet", {"root": str(tiny_dir), "num_workers": 0, "batch_size": 4})
    assert (b.num_classes, b.input_shape, len(b.train), len(b.test)) == (2, (3, 64, 64), 6, 4)
    assert b.classes == ["goldfish", "shark"]
    assert b.train.labels.tolist() == [0, 0, 0, 1, 1, 1]  # n01 first: sorted wnids
    x, y = next(iter(b.test_loader()))
    assert x.shape == (4, 3, 64, 64) and y.tolist() == [0, 1, 1, 0]
    a1 = torch.cat([x for x, _ in b.train_loader(1)])
    a2 = torch.cat([x for x, _ in b.train_loader(1)])
    assert a1.shape == (6, 3, 64, 64) and torch.equal(a1, a2)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "url", "first_file"),
    [
        ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "data_batch_1"),
        ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "train"),
        ("tiny_imagenet", "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "wnids.txt"),
    ],
)
def test_missing_directory_error(tmp_path: Path, name: str, url: str, first_file: str):
    with pytest.raises(DataParamError) as info:
        build_data(name, {"root": "nowhere/ds"}, spec_dir=tmp_path)
    err = info.value
    expected = tmp_path.resolve() / "nowhere" / "ds"
    assert isinstance(err, XdslError) and err.key == "root" and err.dataset == name
    assert f"directory {expected} does not exist" in err.message
    assert "spec file's directory" in err.message
    assert url in err.hint and str(expected / first_file) in err.hint
    assert "Traceback" not in err.render()


def test_partially_missing_cifar_lists_files(cifar10_dir: Path):
    (cifar10_dir / "data_batch_4").unlink()
    (cifar10_dir / "test_batch").unlink()
    with pytest.raises(XdslError, match="missing data_batch_4, test_batch"):
        build_data("cifar10", {"root": str(cifar10_dir)})


def test_tiny_imagenet_missing_val_image(tiny_dir: Path):
    (tiny_dir / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(XdslError, match="val/images/val_2.JPEG"):
        build_data("tiny_imagenet", {"root": str(tiny_dir)})


def test_unknown_kwarg_and_bad_values():
    with pytest.raises(DataParamError) as info:
        build_data("digits", {"batch_sise": 3})
    err = info.value
    assert err.dataset == "digits" and err.key == "batch_sise"
    assert "'digits'" in err.message and "'batch_sise'" in err.message
    assert "batch_size" in err.message and "train_fraction" in err.message
    assert err.hint == "did you mean 'batch_size'?"
    with pytest.raises(XdslError, match="unknown dataset 'mnist'.*digits"):
        build_data("mnist", {})
    with pytest.raises(XdslError, match="unknown dataset"):
        dataset_params("mnist")
    with pytest.raises(DataParamError, match="'batch_size' of dataset 'digits' must be an integer"):
        build_data("digits", {"batch_size": "8"})
    with pytest.raises(DataParamError, match="between 0 and 1"):
        build_data("digits", {"train_fraction": 1.5})
    with pytest.raises(DataParamError, match="'augment'.*boolean"):
        build_data("cifar10", {"augment": 1})
    with pytest.raises(DataParamError, match="'shape'"):
        build_data("synthetic", {"shape": [3, 0]})
    assert len(build_data("digits", {"train_fraction": 0.25}).train) == 449
