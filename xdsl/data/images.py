"""CIFAR-10/100 and Tiny ImageNet read from their standard on-disk layouts (never downloaded).

Both become uint8 image tensors: CIFAR as its pickles hold them, Tiny ImageNet decoded once into a
validated cache file (`cache.py`). Augmentation (`batch_augment.py`) draws each sample's crop and flip from a
hash of (run seed, epoch seed, index): results are identical for any num_workers, resumable per epoch,
the same in the per-sample and the batched pipeline (`pipeline.py`), and never consume the global RNG
the trainer uses for init and dropout.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from xdsl.data.batch_augment import Recipe, augment_one, draw_one, mix64
from xdsl.data.bundle import DataBundle
from xdsl.data.cache import cache_file, cached_images, decode_image
from xdsl.data.params import BuildContext, DataParamError, require

__all__ = ["AugmentedImages", "UInt8Images", "ImageFiles", "cifar10", "cifar100", "tiny_imagenet"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _mix(*values: int) -> int:
    """A 63-bit seed for a torch.Generator from (seed, epoch, index, ...): distinct tuples, unrelated seeds."""
    return mix64(*values) >> 1


class AugmentedImages(Dataset):
    """uint8 (3, H, W) images -> the training recipe (if `augment`) or normalisation; subclasses supply
    `_load`. Without an explicit `recipe`, training means pad `pad` pixels, random crop, random flip."""

    def __init__(
        self,
        labels: Tensor,
        *,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        pad: int = 4,
        pad_mode: str = "reflect",
        seed: int = 0,
        recipe: Recipe | None = None,
        eval_recipe: Recipe | None = None,
    ):
        self.labels = labels
        self.size = tuple(size)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.train_recipe = recipe or Recipe(tuple(mean), tuple(std), crop="pad", flip=True, pad=pad,
                                             pad_mode=pad_mode)
        self.eval_recipe = eval_recipe or Recipe(tuple(mean), tuple(std))
        self.sample_transform: Any = None  # an augment list beyond the Recipe: v2 per sample (data/augment.py)

    def use_augment(self, recipe: Recipe | None, sample_transform: Any = None) -> None:
        """Train with `recipe`, or else with `sample_transform(img, seed, epoch, index)` (an `augment=[...]`)."""
        self.augment = True
        if recipe is not None:
            self.train_recipe = recipe
        self.sample_transform = None if recipe is not None else sample_transform

    def set_epoch(self, epoch_seed: int) -> None:
        """Called by DataBundle.train_loader so augmentation differs per epoch but replays exactly."""
        self.epoch = int(epoch_seed)

    def eval_view(self) -> AugmentedImages:
        """The same samples without augmentation: what a validation split carved from them evaluates on."""
        view = copy.copy(self)
        view.augment = False
        return view

    def recipe(self) -> Recipe | None:
        """What `__getitem__` applies now: the training recipe, or normalisation when not augmenting; None when
        torchvision transforms run per sample (then the batched pipeline cannot take this dataset)."""
        if not self.augment:
            return self.eval_recipe
        return self.train_recipe if self.sample_transform is None else None

    @property
    def why_per_sample(self) -> str | None:
        """Why this dataset needs the per-sample pipeline (the run header says), or None."""
        if self.augment and self.sample_transform is not None:
            return f"augment runs torchvision.transforms.v2 per sample ({', '.join(self.sample_transform.names)})"
        return None

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, index: int) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self._load(index)
        recipe = self.recipe()
        if recipe is None:
            return self.sample_transform(img, self.seed, self.epoch, index), int(self.labels[index])
        box = draw_one(recipe, self.seed, self.epoch, index, tuple(img.shape[-2:]))
        return augment_one(img, box, recipe), int(self.labels[index])


class UInt8Images(AugmentedImages):
    """Images held as one uint8 tensor (N, 3, H, W): CIFAR as it ships, or a decoded image cache.

    This is the class the batched pipeline recognises (see `pipeline.batchable`)."""

    def __init__(self, images: Tensor, labels: Tensor, **kwargs):
        super().__init__(labels, size=(images.shape[-2], images.shape[-1]), **kwargs)
        self.images = images

    def _load(self, index: int) -> Tensor:
        return self.images[index]

    def select(self, indices: Tensor) -> UInt8Images:
        """The images at `indices` as a dataset of their own (a validation split keeps the batched path);
        augmentation draws are keyed by the position in the new dataset."""
        view = copy.copy(self)
        view.images, view.labels = self.images[indices], self.labels[indices]
        return view


class ImageFiles(AugmentedImages):
    """Images decoded lazily from files as RGB (for files not worth caching): `decode(path, size)`, by
    default `decode_image` (stretched to `size`); `cache.decode_native` keeps each file's own size."""

    def __init__(self, paths: list[str], labels: Tensor, decode: Callable[[str, tuple[int, int]], Tensor] | None = None,
                 **kwargs):
        super().__init__(labels, **kwargs)
        self.paths = paths
        self.decode = decode

    def _load(self, index: int) -> Tensor:
        return (self.decode or decode_image)(self.paths[index], self.size)


# ---------------------------------------------------------------------------------------------- CIFAR

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only numpy arrays and plain containers: a data file must not be able to run code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path, dataset: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a CIFAR pickle
        raise DataParamError(
            f"{path} is not a readable {dataset} python pickle: {e}", dataset=dataset, key="root"
        ) from None
    if not isinstance(obj, dict):
        raise DataParamError(
            f"{path} is not a {dataset} batch (expected a dict)", dataset=dataset, key="root"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batches(paths: list[Path], label_key: str, num_classes: int, dataset: str):
    images, labels = [], []
    for path in paths:
        batch = _load_pickle(path, dataset)
        data, lab = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or lab is None:
            raise DataParamError(
                f"{path} is not a {dataset} batch: expected b'data' of shape (N, 3072) and b'{label_key}'",
                dataset=dataset,
                key="root",
            )
        lab = np.asarray(lab, dtype=np.int64).reshape(-1)
        if len(lab) != len(data) or (len(lab) and (lab.min() < 0 or lab.max() >= num_classes)):
            raise DataParamError(
                f"{path}: {len(lab)} labels for {len(data)} images, or labels outside 0..{num_classes - 1}",
                dataset=dataset,
                key="root",
            )
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(lab)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _missing_error(
    ctx: BuildContext, root: str, path: Path, expected: str, missing: list[str], how: str
) -> DataParamError:
    if not path.is_dir():
        what = f"directory {path} does not exist"
    else:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        what = f"{path} is missing {shown}"
    return DataParamError(
        f"dataset '{ctx.name}' not found: {what}{ctx.where(root)}; expected {expected}",
        dataset=ctx.name,
        key="root",
        hint=how,
    )


def _cifar(
    ctx: BuildContext,
    *,
    root: str,
    batch_size: int,
    num_workers: int,
    augment: bool,
    hundred: bool,
) -> DataBundle:
    _check_loader_params(ctx, batch_size, num_workers)
    path = ctx.resolve(root)
    if hundred:
        train_files, test_files, meta_file, label_key, num_classes = (
            ["train"],
            ["test"],
            "meta",
            "fine_labels",
            100,
        )
        url, mean, std = CIFAR100_URL, CIFAR100_MEAN, CIFAR100_STD
        expected = f"the CIFAR-100 python version with {path / 'train'}, {path / 'test'} and meta"
    else:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, num_classes = ["test_batch"], "batches.meta", "labels", 10
        url, mean, std = CIFAR10_URL, CIFAR10_MEAN, CIFAR10_STD
        expected = (
            f"the CIFAR-10 python version with {path / 'data_batch_1'} .. data_batch_5, test_batch "
            "and batches.meta"
        )
    missing = [f for f in train_files + test_files if not (path / f).is_file()]
    if missing:
        archive = url.rsplit("/", 1)[1]
        top = "cifar-100-python" if hundred else "cifar-10-batches-py"
        how = f"download {url} and extract it so that {path / missing[0]} exists "
        if path.name == top:  # the archive's top directory lands exactly on `path`
            how += f"(e.g. `tar xzf {archive} -C {path.parent}`), "
        how += "or set root= to where it is"
        raise _missing_error(ctx, root, path, expected, missing, how)
    x_train, y_train = _read_cifar_batches([path / f for f in train_files], label_key, num_classes, ctx.name)
    x_test, y_test = _read_cifar_batches([path / f for f in test_files], label_key, num_classes, ctx.name)
    classes = _cifar_class_names(path / meta_file, "fine_label_names" if hundred else "label_names")
    common = {"mean": mean, "std": std, "pad": 4, "pad_mode": "reflect", "seed": ctx.seed}
    return DataBundle(
        train=UInt8Images(x_train, y_train, augment=augment, **common),
        test=UInt8Images(x_test, y_test, augment=False, **common),
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=ctx.device_is_cuda,
        name=ctx.name,
        classes=classes,
    )


def _cifar_class_names(meta: Path, key: str) -> list[str] | None:
    """Class names from the meta pickle when present; they are optional (only used for display)."""
    if not meta.is_file():
        return None
    try:
        names = _ArrayUnpickler(io.BytesIO(meta.read_bytes()), encoding="bytes").load()[key.encode()]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except Exception:  # noqa: BLE001 - a damaged meta file only costs the names
        return None


def _check_loader_params(ctx: BuildContext, batch_size: int, num_workers: int) -> None:
    require(batch_size >= 1, ctx, "batch_size", "a positive integer", batch_size)
    require(num_workers >= 0, ctx, "num_workers", "a non-negative integer", num_workers)


def cifar10(
    ctx: BuildContext,
    *,
    root: str = "data/cifar-10-batches-py",
    batch_size: int = 64,
    num_workers: int = 2,
    augment: bool = True,
) -> DataBundle:
    """CIFAR-10 (python pickle version); batch size 64 as in the DML paper."""
    return _cifar(
        ctx, root=root, batch_size=batch_size, num_workers=num_workers, augment=augment, hundred=False
    )


def cifar100(
    ctx: BuildContext,
    *,
    root: str = "data/cifar-100-python",
    batch_size: int = 64,
    num_workers: int = 2,
    augment: bool = True,
) -> DataBundle:
    """CIFAR-100 (python pickle version, fine labels); batch size 64 as in the DML paper."""
    return _cifar(
        ctx, root=root, batch_size=batch_size, num_workers=num_workers, augment=augment, hundred=True
    )


# -------------------------------------------------------------------------------------- Tiny ImageNet


def _image_files(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it if os.path.splitext(e.name)[1].lower() in _IMAGE_SUFFIXES]
    except OSError:
        return []
    return [str(directory / n) for n in sorted(names)]


def _word_names(path: Path, wnids: list[str]) -> list[str]:
    """Human-readable names from words.txt when present, else the wnids themselves."""
    words: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    return [words.get(w) or w for w in wnids]


def _tiny_imagenet_val(ctx: BuildContext, path: Path, index: dict[str, int]) -> tuple[list[str], list[int]]:
    """The validation images and labels listed in val/val_annotations.txt (Tiny ImageNet's test set).

    A listed image that is missing raises FileNotFoundError naming it relative to the root."""
    val_dir = path / "val" / "images"
    present = {os.path.basename(p) for p in _image_files(val_dir)}
    paths: list[str] = []
    labels: list[int] = []
    annotations = path / "val" / "val_annotations.txt"
    for lineno, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise DataParamError(
                f"{annotations}:{lineno}: expected 'filename<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h' "
                f"with a wnid from wnids.txt, got {line!r}",
                dataset=ctx.name,
                key="root",
            )
        name = fields[0].strip()
        if name not in present:
            raise FileNotFoundError(f"val/images/{name}")
        paths.append(str(val_dir / name))
        labels.append(index[fields[1].strip()])
    return paths, labels


def tiny_imagenet(
    ctx: BuildContext,
    *,
    root: str = "data/tiny-imagenet-200",
    batch_size: int = 128,
    num_workers: int = 4,
    augment: bool = True,
    cache_dir: str = "",
) -> DataBundle:
    """Tiny ImageNet 200 (64x64); the labelled `val` split serves as the test set.

    The JPEGs are decoded once into uint8 cache files (`<root>/.xdsl-cache/`, or `cache_dir`), reused
    while valid and newer than the images, rebuilt otherwise (see `cache.py`).
    """
    _check_loader_params(ctx, batch_size, num_workers)
    path = ctx.resolve(root)
    expected = (
        f"the tiny-imagenet-200 layout: {path / 'wnids.txt'}, train/<wnid>/images/*.JPEG, "
        "val/images/*.JPEG and val/val_annotations.txt"
    )
    how = f"download {TINY_IMAGENET_URL} and unzip it so that {path / 'wnids.txt'} exists "
    if path.name == "tiny-imagenet-200":  # the archive's top directory lands exactly on `path`
        how += f"(e.g. `unzip tiny-imagenet-200.zip -d {path.parent}`), "
    how += "or set root= to where it is"
    needed = ["wnids.txt", "train", "val/images", "val/val_annotations.txt"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise _missing_error(ctx, root, path, expected, missing, how)

    wnids = sorted({w.strip() for w in (path / "wnids.txt").read_text(encoding="utf-8").split() if w.strip()})
    if not wnids:
        raise DataParamError(f"{path / 'wnids.txt'} lists no classes", dataset=ctx.name, key="root", hint=how)
    index = {w: i for i, w in enumerate(wnids)}

    train_paths: list[str] = []
    train_labels: list[int] = []
    empty: list[str] = []
    for w in wnids:
        files = _image_files(path / "train" / w / "images")
        if not files:
            empty.append(f"train/{w}/images/*.JPEG")
        train_paths += files
        train_labels += [index[w]] * len(files)
    if empty:
        raise _missing_error(ctx, root, path, expected, empty, how)

    try:
        test_paths, test_labels = _tiny_imagenet_val(ctx, path, index)
    except FileNotFoundError as e:
        raise _missing_error(ctx, root, path, expected, [str(e)], how) from None

    size = (64, 64)
    cache_root = ctx.resolve(cache_dir) if cache_dir else None
    notes: list[str] = []
    x_train = cached_images(train_paths, size, cache_file(path, "train", size, cache_root), notes)
    x_test = cached_images(test_paths, size, cache_file(path, "val", size, cache_root), notes)
    common = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "pad": 4, "pad_mode": "constant", "seed": ctx.seed}
    return DataBundle(
        train=UInt8Images(x_train, torch.tensor(train_labels, dtype=torch.long), augment=augment, **common),
        test=UInt8Images(x_test, torch.tensor(test_labels, dtype=torch.long), augment=False, **common),
        num_classes=len(wnids),
        input_shape=(3, *size),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=ctx.device_is_cuda,
        name=ctx.name,
        classes=_word_names(path / "words.txt", wnids),
        notes=notes,
    )
