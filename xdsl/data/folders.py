"""Image folders in torchvision's ImageFolder layout, and ILSVRC-2012 (ImageNet) laid out the same way.

    data image_folder(root="data/flowers", size=64, batch_size=128)
    data imagenet(root="/datasets/ILSVRC2012")

The layout is `root/train/<class>/**/*.jpg` and `root/val/<class>/**/*.jpg` (the extensions torchvision's
ImageFolder accepts, in any case); the label of a class is its rank among the sorted folder names, as in
ImageFolder, and train and val must have the same class folders. Images become RGB.

Recipes by output `size`: small images (<= 64 px) are padded by 4 and randomly cropped back, and
flipped (the CIFAR recipe); larger ones get RandomResizedCrop(size) + flip for training and
Resize(resize) + CenterCrop(size) for evaluation (resize = size * 256/224: 256 for 224). With
`cache=true` (image_folder's default) the images are decoded once into a uint8 cache (`cache.py`) at
`size` (small) or `resize` x `resize` (large: shorter side resized, centre square kept), so the batched
pipeline applies; the random-resized crop then draws from that square rather than the whole file.
With `cache=false` (imagenet's default: 1.28M images do not fit in memory as uint8) each image is
decoded per sample at its own size and the recipe runs on it, exactly as torchvision's would.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from xdsl.data.batch_augment import Recipe
from xdsl.data.bundle import DataBundle
from xdsl.data.cache import cache_file, cached_images, decode_cropped, decode_native
from xdsl.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, UInt8Images
from xdsl.data.params import BuildContext, DataParamError, require
from xdsl.errors import XdslError

__all__ = ["IMG_EXTENSIONS", "SMALL_IMAGE", "find_classes", "image_folder", "imagenet", "scan_split"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
SMALL_IMAGE = 64  # at most this many pixels a side: the CIFAR recipe (pad, crop, flip)
IMAGENET_HOW = ("ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                "from https://image-net.org, extract the train archive into train/<wnid>/ and sort the val images "
                "into val/<wnid>/ (e.g. with the widely used valprep.sh), then set root= to that folder")


def _fail(ctx: BuildContext, message: str, hint: str | None = None) -> DataParamError:
    return DataParamError(f"dataset '{ctx.name}': {message}", dataset=ctx.name, key="root", hint=hint)


def find_classes(ctx: BuildContext, directory: Path, root: str, how: str) -> list[str]:
    """The sorted class folder names of `directory` (torchvision's `find_classes`), or a located error."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise _fail(ctx, f"{directory} {what}{ctx.where(root)}; expected class folders such as "
                         f"{directory / 'cat'}/*.jpg", how)
    with os.scandir(directory) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise _fail(ctx, f"{directory} has no class folders; expected {directory / '<class>'}/*.jpg", how)
    return classes


def _images_of(directory: Path) -> list[str]:
    """Every image file under `directory`, in torchvision's make_dataset order (sorted walk, links followed)."""
    found: list[str] = []
    for base, _, names in sorted(os.walk(directory, followlinks=True)):
        found += [os.path.join(base, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return found


def scan_split(ctx: BuildContext, directory: Path, classes: list[str], how: str) -> tuple[list[str], list[int]]:
    """Paths and labels of one split; a class folder with no image is an error naming it."""
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = _images_of(directory / name)
        if not files:
            empty.append(str(directory / name))
        paths += files
        labels += [label] * len(files)
    if empty:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise _fail(ctx, f"class folder {', '.join(empty[:3])}{more} has no image "
                         f"({', '.join(IMG_EXTENSIONS)})", how)
    return paths, labels


def _same_classes(ctx: BuildContext, train_dir: Path, val_dir: Path, train: list[str], val: list[str]) -> None:
    if train == val:
        return
    lacks_val = [c for c in train if c not in set(val)]
    lacks_train = [c for c in val if c not in set(train)]
    parts = [f"{d} lacks {', '.join(c[:5])}{' ...' if len(c) > 5 else ''}"
             for d, c in ((val_dir, lacks_val), (train_dir, lacks_train)) if c]
    raise _fail(ctx, f"the class folders of {train_dir} and {val_dir} differ: {'; '.join(parts)}",
                "train and val need the same class folders: a class's label is its rank among the sorted names")


def _check_numbers(ctx: BuildContext, *, size: int, resize: int, batch_size: int, num_workers: int,
                   mean: list, std: list) -> None:
    require(size >= 1, ctx, "size", "a positive integer", size)
    require(resize == 0 or resize >= size, ctx, "resize", f"0 (automatic) or at least size={size}", resize)
    require(batch_size >= 1, ctx, "batch_size", "a positive integer", batch_size)
    require(num_workers >= 0, ctx, "num_workers", "a non-negative integer", num_workers)
    for key, values in (("mean", mean), ("std", std)):
        require(len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
                ctx, key, "a list of 3 numbers (one per RGB channel)", values)
    require(all(v > 0 for v in std), ctx, "std", "positive numbers", std)


def recipes(size: int, resize: int, mean: tuple[float, ...], std: tuple[float, ...], *, cached: bool
            ) -> tuple[Recipe, Recipe, tuple[int, int]]:
    """(train recipe, eval recipe, decoded size) for images shown at `size`; decoded size (0, 0) means
    each file at its own size. Shared by image_folder, imagenet and torchvision datasets of any size."""
    if size <= SMALL_IMAGE:
        decoded = (size, size)
        return (Recipe(mean, std, crop="pad", flip=True, pad=4, pad_mode="reflect"), Recipe(mean, std), decoded)
    big = resize or round(size * 256 / 224)
    out = (size, size)
    train = Recipe(mean, std, crop="resized", flip=True, size=out)
    if cached:
        return train, Recipe(mean, std, crop="center", size=out), (big, big)
    return train, Recipe(mean, std, crop="center", size=out, resize=big), (0, 0)


def _split_images(ctx: BuildContext, paths: list[str], decoded: tuple[int, int], split_cache: Path, notes: list[str],
                  size: int) -> torch.Tensor:
    """The uint8 images of one split from the cache; an unreadable file is an error naming it."""
    try:
        inner = size if decoded[0] > size else None  # the evaluation crop is then Resize + CenterCrop exactly
        return cached_images(paths, decoded, split_cache, notes, decode=functools.partial(decode_cropped, inner=inner))
    except DataParamError:
        raise
    except XdslError as e:
        raise _fail(ctx, e.message, "replace or delete the file (every image of the folders is decoded)") from None


def _folder_bundle(ctx: BuildContext, *, root: str, size: int, resize: int, batch_size: int, num_workers: int,
                   augment: bool, mean: list, std: list, cache: bool, cache_dir: str, train_dir: str,
                   val_dir: str, how: str) -> DataBundle:
    """What image_folder and imagenet share: scan, check, decode (cached or per sample), recipes."""
    _check_numbers(ctx, size=size, resize=resize, batch_size=batch_size, num_workers=num_workers, mean=mean, std=std)
    path = ctx.resolve(root)
    if not path.is_dir():
        raise _fail(ctx, f"{path} does not exist{ctx.where(root)}; expected {path / train_dir}/<class>/*.jpg "
                         f"and {path / val_dir}/<class>/*.jpg", how)
    tr, va = path / train_dir, path / val_dir
    classes = find_classes(ctx, tr, root, how)
    _same_classes(ctx, tr, va, classes, find_classes(ctx, va, root, how))
    (train_paths, train_labels), (val_paths, val_labels) = (scan_split(ctx, d, classes, how) for d in (tr, va))
    train_recipe, eval_recipe, decoded = recipes(size, resize, tuple(mean), tuple(std), cached=cache)
    common = {"mean": mean, "std": std, "seed": ctx.seed, "recipe": train_recipe, "eval_recipe": eval_recipe}
    notes: list[str] = []
    cache_root = ctx.resolve(cache_dir) if cache_dir else None
    splits = []
    for paths, labels, name, augmenting in ((train_paths, train_labels, train_dir, augment),
                                            (val_paths, val_labels, val_dir, False)):
        target = torch.tensor(labels, dtype=torch.long)
        if cache:
            where = cache_file(path, f"folder-{name}-{size}", decoded, cache_root)
            images = _split_images(ctx, paths, decoded, where, notes, size)
            splits.append(UInt8Images(images, target, augment=augmenting, **common))
        else:
            splits.append(ImageFiles(paths, target, decode=decode_native if decoded == (0, 0) else decode_cropped,
                                     size=decoded if decoded != (0, 0) else (size, size), augment=augmenting,
                                     **common))
    return DataBundle(train=splits[0], test=splits[1], num_classes=len(classes), input_shape=(3, size, size),
                      batch_size=batch_size, num_workers=num_workers, pin_memory=ctx.device_is_cuda, name=ctx.name,
                      classes=classes, notes=notes)


def image_folder(
    ctx: BuildContext,
    *,
    root: str = "",
    size: int = 224,
    resize: int = 0,
    batch_size: int = 64,
    num_workers: int = 2,
    augment: bool = True,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    cache: bool = True,
    cache_dir: str = "",
    train_dir: str = "train",
    val_dir: str = "val",
) -> DataBundle:
    """Your own images in torchvision's ImageFolder layout; `val` is the test set (see the module docstring)."""
    how = (f"put the images in <root>/{train_dir}/<class>/ and <root>/{val_dir}/<class>/ (one folder per class, "
           "the same classes in both) and set root= to that folder")
    require(bool(root), ctx, "root", "the folder holding train/ and val/ (root= is required)", root)
    return _folder_bundle(ctx, root=root, size=size, resize=resize, batch_size=batch_size, num_workers=num_workers,
                          augment=augment, mean=list(mean), std=list(std), cache=cache, cache_dir=cache_dir,
                          train_dir=train_dir, val_dir=val_dir, how=how)


def imagenet(
    ctx: BuildContext,
    *,
    root: str = "data/imagenet",
    size: int = 224,
    resize: int = 256,
    batch_size: int = 256,
    num_workers: int = 8,
    augment: bool = True,
    cache: bool = False,
    cache_dir: str = "",
) -> DataBundle:
    """ILSVRC-2012 in the ImageFolder layout (train/<wnid>/, val/<wnid>/), the standard recipes:
    RandomResizedCrop(224) + flip, Resize(256) + CenterCrop(224), ImageNet mean/std; decoded per sample."""
    return _folder_bundle(ctx, root=root, size=size, resize=resize, batch_size=batch_size, num_workers=num_workers,
                          augment=augment, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), cache=cache,
                          cache_dir=cache_dir, train_dir="train", val_dir="val", how=IMAGENET_HOW)
