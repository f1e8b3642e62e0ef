"""How an `augment=[...]` list runs: as a batched `Recipe`, or torchvision v2 per sample; mixup/cutmix per batch.

Three parts, each reproducible from (run seed, epoch seed, sample or batch index) alone:

- `to_recipe`: a list of at most one `random_crop`/`random_resized_crop`, a `hflip` with p=0.5 and a final
  `normalize` is exactly what a `batch_augment.Recipe` does, so it runs as one, on the batched pipeline
  (`pipeline.py`) when the images fit, with its counter-based draws.
- `SampleTransform`: any other list runs as a v2 Compose on each uint8 image, its torch RNG seeded from
  `mix64(seed, epoch, index)` inside `fork_rng`, so a sample's augmentation does not depend on the worker,
  the batch or the process that loads it, and the trainer's own RNG stream is untouched.
- `BatchMix` / `MixedLoader`: `mixup(...)` and `cutmix(...)` items (v2.MixUp / v2.CutMix; one chosen per batch
  like v2.RandomChoice when both are listed) applied to each training batch after loading, seeded from
  (seed, epoch, batch index) so a resumed epoch replays them exactly. Labels become soft (B, C) rows
  that sum to 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from xdsl.data.batch_augment import PAD_MODES, Recipe, mix64
from xdsl.data.transforms import TRANSFORMS, build_transform

__all__ = ["BatchMix", "MixedLoader", "SampleTransform", "apply_augment", "describe", "split_items", "to_recipe"]

Item = tuple[str, dict[str, Any]]
_MIX_STREAM = 0x6D6978  # separates batch draws from per-sample ones that share (seed, epoch, index)


def split_items(items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """(per-sample items, batch items) of a checked list, each in the order given."""
    sample = [i for i in items if not TRANSFORMS[i[0]].batch]
    return sample, [i for i in items if TRANSFORMS[i[0]].batch]


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return (int(value[0]), int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


def _crop(name: str, kw: dict[str, Any], in_size: tuple[int, int]) -> dict[str, Any] | None:
    """The Recipe fields of a crop item, or None when the Recipe cannot do what it asks."""
    if name == "RandomCrop":
        padding, mode = kw.get("padding") or 0, kw.get("padding_mode", "constant")
        if not isinstance(padding, int) or kw.get("pad_if_needed") or mode not in PAD_MODES or kw.get("fill", 0) != 0:
            return None
        size = _size(kw["size"])
        if size[0] > in_size[0] + 2 * padding or size[1] > in_size[1] + 2 * padding:
            return None  # v2 fails on it; the per-sample path says so with v2's own message
        return {"crop": "pad", "pad": padding, "pad_mode": mode, "size": None if size == tuple(in_size) else size}
    if name == "RandomResizedCrop":
        if kw.get("interpolation", "bilinear") != "bilinear" or kw.get("antialias", True) is not True:
            return None
        return {"crop": "resized", "size": _size(kw["size"]), "scale": tuple(kw.get("scale", (0.08, 1.0))),
                "ratio": tuple(kw.get("ratio", (3 / 4, 4 / 3)))}
    return None


def to_recipe(items: Sequence[Item], mean: Sequence[float], std: Sequence[float],
              in_size: tuple[int, int]) -> Recipe | None:
    """The Recipe doing exactly what the per-sample `items` ask, or None when one is beyond it.

    Crop and flip commute in distribution (both are symmetric), so they may come in either order;
    `normalize`, if listed, must come last (the Recipe normalises at the end).
    """
    fields: dict[str, Any] = {}
    for k, (name, kw) in enumerate(items):
        cls = TRANSFORMS[name].cls_name
        if cls == "Normalize" and k == len(items) - 1:
            mean, std = kw.get("mean") or mean, kw.get("std") or std
        elif cls in ("RandomCrop", "RandomResizedCrop") and "crop" not in fields:
            crop = _crop(cls, kw, in_size)
            if crop is None:
                return None
            fields.update(crop)
        elif cls == "RandomHorizontalFlip" and "flip" not in fields and kw.get("p", 0.5) == 0.5:
            fields["flip"] = True
        else:
            return None
    return Recipe(tuple(mean), tuple(std), **fields)


class SampleTransform:
    """A v2 Compose on one uint8 (C, H, W) image, seeded per sample; normalisation where `normalize` stands
    (items before it see uint8 images, items after it floats), else at the end with the dataset's mean/std."""

    def __init__(self, items: Sequence[Item], mean: Sequence[float], std: Sequence[float]):
        names = [TRANSFORMS[n].cls_name for n, _ in items]
        cut = names.index("Normalize") if "Normalize" in names else len(items)
        if cut < len(items):
            kw = items[cut][1]
            mean, std = kw.get("mean") or mean, kw.get("std") or std
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.before = [build_transform(n, kw) for n, kw in items[:cut]]
        self.after = [build_transform(n, kw) for n, kw in items[cut + 1:]]
        self.names = names

    def __call__(self, img: Tensor, seed: int, epoch: int, index: int) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix64(seed, epoch, index) >> 1)
            for t in self.before:
                img = t(img)
            x = F.normalize(F.to_dtype(img, torch.float32, scale=True), self.mean, self.std)
            for t in self.after:
                x = t(x)
            return x


class BatchMix:
    """mixup/cutmix on a (B, C, H, W) float batch and its labels: (x mixed, soft labels (B, num_classes))."""

    def __init__(self, items: Sequence[Item], num_classes: int, seed: int):
        from torchvision.transforms import v2

        self.items = [(n, dict(kw)) for n, kw in items]
        mixes = [TRANSFORMS[n].cls(**kw, num_classes=num_classes) for n, kw in items]
        self.transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.num_classes, self.seed = int(num_classes), int(seed)

    def __call__(self, x: Tensor, y: Tensor, epoch_seed: int, batch: int) -> tuple[Tensor, Tensor]:
        with torch.random.fork_rng(devices=[]):  # every draw is on the CPU generator, whatever x's device
            torch.default_generator.manual_seed(mix64(self.seed, epoch_seed, batch, _MIX_STREAM) >> 1)
            return self.transform(x, y)


class MixedLoader:
    """A train loader whose batches go through a `BatchMix`; batch k of an epoch is mixed the same way on every
    replay (a resumed epoch iterates, and mixes, the batches it skips)."""

    def __init__(self, loader: Any, mix: BatchMix, epoch_seed: int):
        self.loader, self.mix, self.epoch_seed = loader, mix, int(epoch_seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for k, (x, y, *index) in enumerate(self.loader):  # (x, y, i) batches keep their sample indices
            yield (*self.mix(x, y, self.epoch_seed, k), *index)


def _call(name: str, kw: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})" if kw else name


def describe(recipe: Recipe | None, sample: Sequence[Item], batch: Sequence[Item]) -> str:
    """The run header's line about augmentation: which path runs the list."""
    if recipe is not None:
        what = "no per-sample augmentation" if not recipe.random else \
            f"{', '.join(_call(n, kw) for n, kw in sample)} compiled to the batchable recipe"
    else:
        what = f"{', '.join(_call(n, kw) for n, kw in sample)} by torchvision.transforms.v2, seeded per sample"
    if batch:
        what += f"; {' or '.join(_call(n, kw) for n, kw in batch)} on each training batch (soft labels)"
    return "augment: " + what


def _eval_datasets(bundle: Any) -> list[Any]:
    """Every dataset a run evaluates on (test, a re-id query/gallery), to share an explicit normalize."""
    out = [bundle.test]
    if bundle.retrieval is not None:
        out += [getattr(bundle.retrieval, k, None) for k in ("query", "gallery")]
    return [d for d in out if d is not None and hasattr(d, "eval_recipe")]


def apply_augment(bundle: Any, items: Sequence[Item], seed: int) -> None:
    """Make `bundle`'s training set augment as `items` say (checked plain data), mixup/cutmix its batches,
    and note which path runs. An explicit `normalize(mean=, std=)` normalises evaluation images too."""
    from xdsl.data.params import DataParamError

    train = bundle.train
    if not callable(getattr(train, "use_augment", None)):
        raise DataParamError(f"dataset '{bundle.name}' has no image augmentation, so it takes no augment list",
                             dataset=bundle.name, key="augment")
    sample, batch = split_items(items)
    mean, std = train.train_recipe.mean, train.train_recipe.std
    recipe = to_recipe(sample, mean, std, tuple(train.size))
    train.use_augment(recipe, None if recipe is not None else SampleTransform(sample, mean, std))
    norm = [kw for n, kw in sample if TRANSFORMS[n].cls_name == "Normalize" and kw.get("mean") is not None]
    if norm:
        for ds in [train, *_eval_datasets(bundle)]:
            ds.eval_recipe = dataclasses.replace(ds.eval_recipe, mean=tuple(norm[0]["mean"]),  # keeps a centre crop
                                                 std=tuple(norm[0]["std"]))
    _dry_run(bundle, train)
    bundle.batch_mix = BatchMix(batch, bundle.num_classes, seed) if batch else None
    bundle.notes.append(describe(recipe, sample, batch))


def _dry_run(bundle: Any, train: Any) -> None:
    """Augment the first training image once: a transform that fails, or images of another size than the test
    images, is a DataParamError now rather than a traceback in a DataLoader worker."""
    from xdsl.data.params import DataParamError

    if len(train) == 0:
        return
    try:
        x, _ = train[0]
    except Exception as e:  # noqa: BLE001 - any failure of a v2 transform on a real image
        raise DataParamError(f"augment fails on dataset '{bundle.name}''s first training image: {e}",
                             dataset=bundle.name, key="augment") from None
    want = tuple(bundle.input_shape)
    if tuple(x.shape) != want:
        raise DataParamError(
            f"augment makes {'x'.join(map(str, x.shape))} training images, but dataset '{bundle.name}' evaluates "
            f"{'x'.join(map(str, want))} images", dataset=bundle.name, key="augment",
            hint=f"crop or resize to {want[-2]}x{want[-1]} (e.g. random_resized_crop({want[-1]})), or change "
                 "the dataset's image size")
