"""Any torchvision classification dataset already on disk: `data torchvision.SVHN(root="data/svhn")`.

The spec names the class and its root; xdsl builds the train and the test split itself, through the class's own
split keyword (`train=True/False` for the CIFAR and MNIST families, `split="train"/"test"` for SVHN, STL10,
Flowers102, ...: read from the signature, `_SPLITS` for the classes whose keyword or values differ), always with
`download=False`. The class's other keywords pass through, checked against its signature like any call.

Images of a fixed native size (`_NATIVE`: MNIST 1x28x28, CIFAR/SVHN 3x32x32, STL10 3x96x96, ...) are held as
uint8 (the batched pipeline applies), with the recipe `folders.recipes` gives that size (pad + crop + flip up to
64 px, RandomResizedCrop / Resize + CenterCrop above; no flip for digits and characters, `_NO_FLIP`) and the
training set's per-channel mean/std (CIFAR's standard constants). Every other class has images of any size:
like `image_folder(cache=false)` they are decoded per sample as RGB and shown at `size` (default 224) with
ImageNet's mean/std.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xdsl.data.bundle import DataBundle
from xdsl.data.cache import fit_cropped
from xdsl.data.folders import recipes
from xdsl.data.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentedImages,
    UInt8Images,
)
from xdsl.data.params import REQUIRED, BuildContext, DataParamError, require
from xdsl.registry import did_you_mean

__all__ = ["PREFIX", "build_torchvision", "is_torchvision", "split_keyword", "torchvision_names",
           "torchvision_params", "torchvision_shape"]

PREFIX = "torchvision."
# classes with a train/split keyword that are not (image, class) datasets, or whose test split has no labels
_NOT_CLASSIFICATION = frozenset({
    "MovingMNIST", "PhotoTour", "Cityscapes", "CelebA", "WIDERFace", "Kinetics", "HMDB51", "UCF101", "Kitti",
    "LFWPeople", "LFWPairs", "CLEVRClassification"})
# (keyword, train value, test value) where the signature alone does not say (EMNIST's `split` is its variant)
_SPLITS: dict[str, tuple[str, Any, Any]] = {
    "EMNIST": ("train", True, False), "QMNIST": ("what", "train", "test"),
    "OxfordIIITPet": ("split", "trainval", "test"), "FGVCAircraft": ("split", "trainval", "test"),
    "Places365": ("split", "train-standard", "val"), "ImageNet": ("split", "train", "val"),
    "Imagenette": ("split", "train", "val")}
# (C, H, W) of every sample, for the classes whose images all have one size
_NATIVE = {"MNIST": (1, 28, 28), "FashionMNIST": (1, 28, 28), "KMNIST": (1, 28, 28), "EMNIST": (1, 28, 28),
           "QMNIST": (1, 28, 28), "USPS": (1, 16, 16), "FER2013": (1, 48, 48), "CIFAR10": (3, 32, 32),
           "CIFAR100": (3, 32, 32), "SVHN": (3, 32, 32), "STL10": (3, 96, 96), "PCAM": (3, 96, 96)}
# digits and characters: a mirrored 2 or R is another symbol (or none), so their recipe crops without flipping
_NO_FLIP = frozenset({"MNIST", "KMNIST", "EMNIST", "QMNIST", "USPS", "SVHN"})
# class counts of the datasets that keep no `classes` list (else a subset on disk would decide the count)
_CLASS_COUNTS = {"SVHN": 10, "USPS": 10, "FER2013": 7, "PCAM": 2}
_STANDARD = {"CIFAR10": (CIFAR10_MEAN, CIFAR10_STD), "CIFAR100": (CIFAR100_MEAN, CIFAR100_STD)}
_HANDLED = frozenset({"root", "download", "transform", "target_transform", "transforms", "loader"})
_OURS: dict[str, Any] = {"batch_size": 64, "num_workers": 2, "augment": True, "mean": [], "std": []}


def is_torchvision(name: str) -> bool:
    return name.startswith(PREFIX)


def _signature(cls: type) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(cls).parameters.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def split_keyword(name: str, cls: type) -> tuple[str, Any, Any] | None:
    """(keyword, train value, test value) of a class, or None when it has no train/test split."""
    params = _signature(cls)
    if name in _SPLITS:
        return _SPLITS[name]
    if "train" in params:
        return "train", True, False
    return ("split", "train", "test") if "split" in params else None


@functools.cache
def _classes() -> dict[str, type]:
    import torchvision.datasets as tv

    found = {}
    for name in tv.__all__:
        cls = getattr(tv, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, tv.VisionDataset)) or name in _NOT_CLASSIFICATION:
            continue
        params = _signature(cls)
        joint_only = "transforms" in params and "transform" not in params  # optical flow, stereo: image pairs
        required = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k != "root"]
        if not joint_only and split_keyword(name, cls) is not None and (not required or name in _SPLITS):
            found[name] = cls
    return found


def torchvision_names() -> list[str]:
    """`torchvision.<Class>` for every classification dataset with a train/test split."""
    return [PREFIX + n for n in _classes()]


def _class(name: str) -> tuple[str, type]:
    short = name[len(PREFIX):]
    classes = _classes()
    if short not in classes:
        guess = did_you_mean(short, list(classes))
        raise DataParamError(f"unknown dataset '{name}': torchvision.datasets has no classification dataset "
                             f"'{short}' with a train/test split", dataset=name,
                             hint=f"did you mean '{PREFIX}{guess}'?" if guess else f"known: {', '.join(classes)}")
    return short, classes[short]


def _passed(short: str, cls: type) -> dict[str, Any]:
    """The class's own keywords a spec may give, with their defaults (REQUIRED where there is none)."""
    refused = {split_keyword(short, cls)[0], "train"}  # type: ignore[index]
    return {k: REQUIRED if p.default is inspect.Parameter.empty else p.default
            for k, p in _signature(cls).items() if k not in _HANDLED | refused}


def torchvision_params(name: str) -> dict[str, Any]:
    """What `data torchvision.<Class>(...)` accepts: root, the class's other keywords, then xdsl's."""
    short, cls = _class(name)
    own = _passed(short, cls)
    ours = dict(_OURS) if short in _NATIVE else {**_OURS, "size": 224, "resize": 0}
    return {"root": REQUIRED, **own, **{k: v for k, v in ours.items() if k not in own}}


def torchvision_shape(name: str, kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """(C, H, W) of a sample from the statement alone: the native size, or (3, size, size)."""
    short = name[len(PREFIX):]
    if short in _NATIVE:
        return _NATIVE[short]
    size = kwargs.get("size", 224)
    return (3, size, size) if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


def _how(short: str, cls: type, path: Any) -> str:
    keyword, train, test = split_keyword(short, cls)  # type: ignore[misc]
    import torchvision.datasets as tv

    if "download" not in _signature(cls) and not issubclass(cls, tv.MNIST):
        return (f"torchvision cannot download {short}: get its files as the documentation of "
                f"torchvision.datasets.{short} describes, put them under {path}, or set root= to where they are")
    values = ", ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in (train, test))
    call = f"torchvision.datasets.{short}(root=\"{path}\", {keyword}=s, download=True)"
    return (f"run once on a machine with network: python -c 'import torchvision; [{call} for s in ({values})]' "
            f"and copy the folder to {path} here, or set root= to where the data is")


def _open(ctx: BuildContext, short: str, cls: type, root: str, value: Any, passed: dict[str, Any]) -> Any:
    """The torchvision dataset of one split, never downloading; its failures are one DataParamError."""
    import torchvision.datasets as tv

    path = ctx.resolve(root)
    keyword = split_keyword(short, cls)[0]  # type: ignore[index]
    download = {"download": False} if "download" in _signature(cls) or issubclass(cls, tv.MNIST) else {}
    try:
        return cls(root=str(path), **{keyword: value}, **download, **passed)
    except Exception as e:  # noqa: BLE001 - torchvision's own check of the files, or of a passed keyword
        text = f"{type(e).__name__}: {e}"
        if isinstance(e, (FileNotFoundError, RuntimeError)) and ("not found" in str(e).lower()
                                                                 or isinstance(e, FileNotFoundError)):
            raise DataParamError(f"dataset '{ctx.name}': no {short} data under {path}{ctx.where(root)} "
                                 f"(torchvision: {text})", dataset=ctx.name, key="root",
                                 hint=_how(short, cls, path)) from None
        shown = ", ".join(f"{k}={v!r}" for k, v in {keyword: value, **passed}.items())
        raise DataParamError(f"dataset '{ctx.name}': torchvision.datasets.{short}(root=\"{path}\", {shown}) "
                             f"failed: {text}", dataset=ctx.name) from None


def _labels(ds: Any) -> Tensor:
    """The label of every sample, from the dataset's label list where it keeps one (no image is loaded)."""
    n = len(ds)
    for attr in ("targets", "labels", "_labels"):
        value = getattr(ds, attr, None)
        if value is not None:
            labels = torch.as_tensor(np.asarray(value))
            if labels.dim() == 1 and len(labels) == n and not labels.is_floating_point():
                return labels.long()
    for attr in ("_samples", "samples", "imgs"):
        value = getattr(ds, attr, None)
        if isinstance(value, list) and len(value) == n and all(isinstance(s, tuple) and len(s) == 2 for s in value):
            if all(isinstance(s[1], int) for s in value):
                return torch.tensor([s[1] for s in value], dtype=torch.long)
    return torch.tensor([int(ds[i][1]) for i in range(n)], dtype=torch.long)


def _as_uint8(img: Any, channels: int) -> Tensor:
    from torchvision.transforms.v2 import functional as F

    if hasattr(img, "convert"):  # a PIL image, as torchvision datasets return them
        return F.pil_to_tensor(img.convert("L" if channels == 1 else "RGB"))
    return torch.as_tensor(np.asarray(img))


def _fixed_images(ctx: BuildContext, ds: Any, shape: tuple[int, ...]) -> Tensor:
    """uint8 (N, C, H, W): the dataset's own array where it holds one, else each sample converted."""
    c, h, w = shape
    data = getattr(ds, "data", None)
    if isinstance(data, (np.ndarray, Tensor)) and len(data) == len(ds):
        arr = torch.as_tensor(np.asarray(data))
        if arr.dtype == torch.uint8 and tuple(arr.shape[1:]) == (h, w) and c == 1:
            return arr.unsqueeze(1).contiguous()
        if arr.dtype == torch.uint8 and tuple(arr.shape[1:]) == (c, h, w):
            return arr.contiguous()
        if arr.dtype == torch.uint8 and tuple(arr.shape[1:]) == (h, w, c):
            return arr.permute(0, 3, 1, 2).contiguous()
    out = torch.empty((len(ds), c, h, w), dtype=torch.uint8)
    for i in range(len(ds)):
        img = _as_uint8(ds[i][0], c)
        img = img.unsqueeze(0) if img.dim() == 2 else img
        if tuple(img.shape) != shape:
            raise DataParamError(f"dataset '{ctx.name}': sample {i} is {tuple(img.shape)}, expected {shape}",
                                 dataset=ctx.name, key="root")
        out[i] = img
    return out


def _mean_std(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, in chunks (no float copy of the whole set)."""
    c = images.shape[1]
    total, squares, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class TorchvisionImages(AugmentedImages):
    """A torchvision dataset of images of any size, each converted per sample to uint8 RGB (and, for a small
    `size`, resized and centre-cropped to it as image_folder's cache would)."""

    def __init__(self, dataset: Any, labels: Tensor, *, decoded: tuple[int, int], **kwargs):
        super().__init__(labels, **kwargs)
        self.dataset, self.decoded = dataset, decoded

    def _load(self, index: int) -> Tensor:
        img = _as_uint8(self.dataset[index][0], 3)
        return img if self.decoded == (0, 0) else fit_cropped(img, self.decoded)


def _class_names(ctx: BuildContext, short: str, train: Any, labels: list[Tensor]) -> list[str]:
    top = max(int(t.max()) for t in labels if len(t)) + 1 if any(len(t) for t in labels) else 0
    top = max(top, _CLASS_COUNTS.get(short, 0))
    if any(len(t) and int(t.min()) < 0 for t in labels):
        raise DataParamError(f"dataset '{ctx.name}' has negative labels", dataset=ctx.name, key="root")
    names = getattr(train, "classes", None)
    if isinstance(names, (list, tuple)) and len(names) >= top and names:
        return [str(n) for n in names]
    return [str(i) for i in range(top)]


def _normalisation(ctx: BuildContext, short: str, channels: int, mean: list, std: list, images: Tensor | None
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for key, values in (("mean", mean), ("std", std)):
        require(not values or (len(values) == channels and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in values)),
                ctx, key, f"a list of {channels} numbers (one per channel), or [] for the default", values)
    require(all(v > 0 for v in std), ctx, "std", "positive numbers", std)
    if short in _STANDARD:
        auto = _STANDARD[short]
    elif images is not None:
        auto = _mean_std(images)
    else:
        auto = (IMAGENET_MEAN, IMAGENET_STD)
    return tuple(mean) or auto[0], tuple(std) or auto[1]


def build_torchvision(ctx: BuildContext, **settings: Any) -> DataBundle:
    """The factory of `data torchvision.<Class>(...)`: `settings` are `torchvision_params`' keywords, merged."""
    short, cls = _class(ctx.name)
    passed = {k: settings.pop(k) for k in _passed(short, cls) if k in settings}  # the class's own (a `size` too)
    root, batch_size, num_workers, augment = (settings[k] for k in ("root", "batch_size", "num_workers", "augment"))
    mean, std, size, resize = settings["mean"], settings["std"], settings.get("size", 224), settings.get("resize", 0)
    require(batch_size >= 1, ctx, "batch_size", "a positive integer", batch_size)
    require(num_workers >= 0, ctx, "num_workers", "a non-negative integer", num_workers)
    _, train_value, test_value = split_keyword(short, cls)  # type: ignore[misc]
    train_ds, test_ds = (_open(ctx, short, cls, root, v, passed) for v in (train_value, test_value))
    labels = [_labels(train_ds), _labels(test_ds)]
    classes = _class_names(ctx, short, train_ds, labels)
    if short in _NATIVE:
        shape = _NATIVE[short]
        images = [_fixed_images(ctx, ds, shape) for ds in (train_ds, test_ds)]
        mean_t, std_t = _normalisation(ctx, short, shape[0], mean, std, images[0])
        train_recipe, eval_recipe, _ = recipes(shape[-1], 0, mean_t, std_t, cached=False)
        if short in _NO_FLIP:
            train_recipe = dataclasses.replace(train_recipe, flip=False)
        common = {"mean": mean_t, "std": std_t, "seed": ctx.seed, "recipe": train_recipe, "eval_recipe": eval_recipe}
        train = UInt8Images(images[0], labels[0], augment=augment, **common)
        test = UInt8Images(images[1], labels[1], augment=False, **common)
    else:
        require(size >= 1, ctx, "size", "a positive integer", size)
        require(resize == 0 or resize >= size, ctx, "resize", f"0 (automatic) or at least size={size}", resize)
        shape = (3, size, size)
        mean_t, std_t = _normalisation(ctx, short, 3, mean, std, None)
        train_recipe, eval_recipe, decoded = recipes(size, resize, mean_t, std_t, cached=False)
        common = {"mean": mean_t, "std": std_t, "seed": ctx.seed, "recipe": train_recipe, "eval_recipe": eval_recipe,
                  "decoded": decoded, "size": decoded if decoded != (0, 0) else (size, size)}
        train = TorchvisionImages(train_ds, labels[0], augment=augment, **common)
        test = TorchvisionImages(test_ds, labels[1], augment=False, **common)
    return DataBundle(train=train, test=test, num_classes=len(classes), input_shape=shape, batch_size=batch_size,
                      num_workers=num_workers, pin_memory=ctx.device_is_cuda, name=ctx.name, classes=classes)
