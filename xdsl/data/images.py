"""CIFAR-10/100 and Tiny ImageNet read from their standard on-disk layouts (never downloaded).

Augmentation uses torchvision.transforms.v2 functional ops with a per-sample torch.Generator seeded
from (run seed, epoch seed, index): results are identical for any num_workers, resumable per epoch,
and never consume the global RNG the trainer uses for init and dropout.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from xdsl.data.bundle import DataBundle
from xdsl.data.params import BuildContext, DataParamError, require
from xdsl.errors import XdslError

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

_MASK64 = (1 << 64) - 1
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _mix(*values: int) -> int:
    """splitmix64-style mixing: distinct (seed, epoch, index) give unrelated 63-bit seeds."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state >> 1


class AugmentedImages(Dataset):
    """uint8 (3, H, W) images -> optional pad/crop/flip -> float normalised; subclasses supply `_load`."""

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
    ):
        self.labels = labels
        self.size = size
        self.mean = list(mean)
        self.std = list(std)
        self.augment = augment
        self.pad = pad
        self.pad_mode = pad_mode
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch_seed: int) -> None:
        """Called by DataBundle.train_loader so augmentation differs per epoch but replays exactly."""
        self.epoch = int(epoch_seed)

    def eval_view(self) -> AugmentedImages:
        """The same samples without augmentation: what a validation split carved from them evaluates on."""
        view = copy.copy(self)
        view.augment = False
        return view

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, index: int) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self._load(index)
        if self.augment:
            img = self._random_crop_flip(img, index)
        img = F.to_dtype(img, torch.float32, scale=True)
        return F.normalize(img, self.mean, self.std), int(self.labels[index])

    def _random_crop_flip(self, img: Tensor, index: int) -> Tensor:
        gen = torch.Generator()
        gen.manual_seed(_mix(self.seed, self.epoch, index))
        span = 2 * self.pad + 1
        k = int(torch.randint(0, 2 * span * span, (1,), generator=gen))
        flip, k = k % 2, k // 2
        top, left = divmod(k, span)
        if self.pad:
            img = F.pad(img, [self.pad], padding_mode=self.pad_mode)
        img = F.crop(img, top, left, self.size[0], self.size[1])
        return F.horizontal_flip(img) if flip else img


class UInt8Images(AugmentedImages):
    """In-memory images (N, 3, H, W) uint8, as CIFAR ships them."""

    def __init__(self, images: Tensor, labels: Tensor, **kwargs):
        super().__init__(labels, size=(images.shape[-2], images.shape[-1]), **kwargs)
        self.images = images

    def _load(self, index: int) -> Tensor:
        return self.images[index]


class ImageFiles(AugmentedImages):
    """Images decoded lazily from files (Tiny ImageNet), forced to RGB and `size`."""

    def __init__(self, paths: list[str], labels: Tensor, **kwargs):
        super().__init__(labels, **kwargs)
        self.paths = paths

    def _load(self, index: int) -> Tensor:
        # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
        from PIL import Image, UnidentifiedImageError

        path = self.paths[index]
        try:
            with Image.open(path) as pil:
                img = F.pil_to_tensor(pil.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise XdslError(f"cannot decode image {path}: {e}") from None
        if tuple(img.shape[-2:]) != self.size:
            img = F.resize(img, list(self.size), antialias=True)
        return img


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


def tiny_imagenet(
    ctx: BuildContext,
    *,
    root: str = "data/tiny-imagenet-200",
    batch_size: int = 128,
    num_workers: int = 4,
    augment: bool = True,
) -> DataBundle:
    """Tiny ImageNet 200 (64x64); the labelled `val` split serves as the test set."""
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

    val_dir = path / "val" / "images"
    present = {os.path.basename(p) for p in _image_files(val_dir)}
    test_paths: list[str] = []
    test_labels: list[int] = []
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
            raise _missing_error(ctx, root, path, expected, [f"val/images/{name}"], how)
        test_paths.append(str(val_dir / name))
        test_labels.append(index[fields[1].strip()])

    common = {
        "size": (64, 64),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "pad": 4,
        "pad_mode": "constant",
        "seed": ctx.seed,
    }
    return DataBundle(
        train=ImageFiles(
            train_paths, torch.tensor(train_labels, dtype=torch.long), augment=augment, **common
        ),
        test=ImageFiles(test_paths, torch.tensor(test_labels, dtype=torch.long), augment=False, **common),
        num_classes=len(wnids),
        input_shape=(3, 64, 64),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=ctx.device_is_cuda,
        name=ctx.name,
        classes=_word_names(path / "words.txt", wnids),
    )
