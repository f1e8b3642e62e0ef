"""Dataset registry and `build_data`: the one entry point the compiler and trainers use."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from xdsl.data.augment import apply_augment
from xdsl.data.bundle import DataBundle
from xdsl.data.folders import image_folder, imagenet
from xdsl.data.images import cifar10, cifar100, tiny_imagenet
from xdsl.data.params import BuildContext, DataParamError, check_kwargs, require
from xdsl.data.pipeline import DEFAULT_BUDGET, PIPELINES, batchable, parse_budget
from xdsl.data.reid import market1501, synthetic_reid
from xdsl.data.split import with_validation
from xdsl.data.torchvision_data import build_torchvision, is_torchvision, torchvision_params, torchvision_shape
from xdsl.data.transforms import normalise_items
from xdsl.data.user_data import USER_DEFAULTS as USER_KEYWORDS
from xdsl.data.user_data import build_user, is_user_ref, user_function, user_params, user_shape
from xdsl.registry import Registry, did_you_mean

__all__ = ["DATASETS", "RETRIEVAL_DATASETS", "VAL_FRACTION", "build_data", "dataset_params", "digits", "input_shape",
           "spec_params", "synthetic"]

VAL_FRACTION = "val_fraction"  # the parameter every dataset takes: share of the train set held out


def digits(ctx: BuildContext, *, train_fraction: float = 0.5, batch_size: int = 64) -> DataBundle:
    """scikit-learn's bundled 8x8 digits: real data that needs no download, for quickstart and tests."""
    require(
        0.0 < train_fraction < 1.0, ctx, "train_fraction", "a number strictly between 0 and 1", train_fraction
    )
    require(batch_size >= 1, ctx, "batch_size", "a positive integer", batch_size)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=train_fraction, stratify=y, random_state=0)
    except ValueError as e:
        raise DataParamError(
            f"parameter 'train_fraction' of dataset '{ctx.name}' = {train_fraction} gives an unusable "
            f"split: {e}",
            dataset=ctx.name,
            key="train_fraction",
        ) from None
    train = torch.tensor(x_tr, dtype=torch.float32) / 16.0
    test = torch.tensor(x_te, dtype=torch.float32) / 16.0
    mean, std = train.mean(), train.std().clamp_min(1e-6)
    return DataBundle(
        train=TensorDataset(((train - mean) / std).view(-1, 1, 8, 8), torch.tensor(y_tr, dtype=torch.long)),
        test=TensorDataset(((test - mean) / std).view(-1, 1, 8, 8), torch.tensor(y_te, dtype=torch.long)),
        num_classes=10,
        input_shape=(1, 8, 8),
        batch_size=batch_size,
        num_workers=0,
        pin_memory=ctx.device_is_cuda,
        name=ctx.name,
        classes=[str(i) for i in range(10)],
    )


def synthetic(
    ctx: BuildContext,
    *,
    num_classes: int = 10,
    shape: tuple[int, ...] = (3, 8, 8),
    train_size: int = 256,
    test_size: int = 128,
    batch_size: int = 32,
    seed: int = 0,
) -> DataBundle:
    """Gaussian blobs around random class means: learnable, tiny, and fully determined by `seed`."""
    require(num_classes >= 2, ctx, "num_classes", "an integer >= 2", num_classes)
    require(
        len(shape) >= 1 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape),
        ctx,
        "shape",
        "a non-empty list of positive integers",
        shape,
    )
    require(train_size >= 1, ctx, "train_size", "a positive integer", train_size)
    require(test_size >= 1, ctx, "test_size", "a positive integer", test_size)
    require(batch_size >= 1, ctx, "batch_size", "a positive integer", batch_size)
    shape = tuple(shape)
    gen = torch.Generator()
    gen.manual_seed(seed)
    means = torch.randn(num_classes, *shape, generator=gen)

    def split(n: int) -> TensorDataset:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        x = means[labels] + torch.randn(n, *shape, generator=gen)
        return TensorDataset(x, labels)

    train = split(train_size)
    test = split(test_size)
    return DataBundle(
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=shape,
        batch_size=batch_size,
        num_workers=0,
        pin_memory=ctx.device_is_cuda,
        name=ctx.name,
        classes=[str(i) for i in range(num_classes)],
    )


DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")
"""Dataset factories `f(ctx, *, keyword=default, ...) -> DataBundle`; their keywords are what a spec may pass."""
for _factory_fn in (digits, synthetic, cifar10, cifar100, tiny_imagenet, image_folder, imagenet, market1501,
                    synthetic_reid):
    DATASETS.register(_factory_fn.__name__, _factory_fn)
RETRIEVAL_DATASETS = frozenset({"market1501", "synthetic_reid"})
"""Re-id datasets: evaluated by `retrieval(...)` on their query/gallery split, not by test accuracy."""


# (C, H, W) of one sample, known without reading the data (for `xdsl check`)
_INPUT_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "tiny_imagenet": (3, 64, 64)}


def input_shape(name: str, kwargs: Mapping[str, Any], *, spec_dir: Path | None = None,
                allow_imports: bool = False) -> tuple[int, ...] | None:
    """The shape of one input sample from the data statement alone (None when it says nothing); a user
    function `"module:fn"` is called for it (its first sample's shape: see `user_data.py`)."""
    if is_torchvision(name):
        return torchvision_shape(name, kwargs)
    if is_user_ref(name):
        return user_shape(name, dict(kwargs), spec_dir, allow_imports)
    if name in ("synthetic", "synthetic_reid"):
        return tuple(kwargs.get("shape", dataset_params(name)["shape"]))
    if name == "market1501":
        return (3, int(kwargs.get("height", 224)), int(kwargs.get("width", 224)))
    if name in ("image_folder", "imagenet"):
        size = kwargs.get("size", 224)
        return (3, size, size) if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None
    return _INPUT_SHAPES.get(name)


def _factory(name: str, spec_dir: Path | None = None, allow_imports: bool = False) -> Callable[..., DataBundle]:
    if is_torchvision(name):
        return build_torchvision
    if is_user_ref(name):
        return functools.partial(build_user, fn=user_function(name, spec_dir, allow_imports))
    if name not in DATASETS:
        raise DataParamError(
            f"unknown dataset '{name}' (known: {', '.join(DATASETS)})",
            dataset=name,
            hint="the embedded 'digits' dataset needs no download",
        )
    return DATASETS[name]


# parameters every dataset accepts: which input pipeline runs (pipeline.py), set on the DataBundle
PIPELINE_PARAMS: dict[str, Any] = {"pipeline": "auto", "memory_budget": DEFAULT_BUDGET}


def dataset_params(name: str, spec_dir: Path | None = None, allow_imports: bool = False) -> dict[str, Any] | None:
    """Accepted parameters of dataset `name` with their defaults (lists as lists; `params.REQUIRED` where a
    keyword has none), for static checks; every dataset also takes `val_fraction` (0: no validation split
    carved out, see `xdsl.data.split`). None: a user function taking **kwargs, which accepts any keyword."""
    if is_torchvision(name):
        own: dict[str, Any] | None = torchvision_params(name)
    elif is_user_ref(name):  # imported (under the user-code rule) for its signature
        own = user_params(name, spec_dir, allow_imports)
    else:
        params = list(inspect.signature(_factory(name)).parameters.values())[1:]
        own = {p.name: list(p.default) if isinstance(p.default, tuple) else p.default for p in params}
    return None if own is None else {**own, VAL_FRACTION: 0.0, **PIPELINE_PARAMS}


def spec_params(name: str, spec_dir: Path | None = None, allow_imports: bool = False) -> dict[str, Any] | None:
    """What the checker accepts for `data <name>(...)`: the keywords with their defaults, or None when
    any keyword goes (a user function taking **kwargs). `torchvision.<Class>` and `"module:fn"` (imported
    from beside the spec, or anywhere with `allow_imports`) read their signatures.
    An unknown name is a DataParamError with a did-you-mean hint."""
    if name in DATASETS or is_torchvision(name) or is_user_ref(name):
        return dataset_params(name, spec_dir, allow_imports)
    guess = did_you_mean(name, list(DATASETS))
    raise DataParamError(f"unknown dataset '{name}'", dataset=name,
                         hint=f"did you mean '{guess}'?" if guess else f"known: {', '.join(DATASETS)}")


def _pipeline_settings(name: str, merged: dict[str, Any]) -> tuple[str, str]:
    """Take `pipeline` and `memory_budget` out of the parameters, checked."""
    pipeline, budget = merged.pop("pipeline"), merged.pop("memory_budget")
    if pipeline not in PIPELINES:
        raise DataParamError(f"parameter 'pipeline' of dataset '{name}' must be one of "
                             f"{', '.join(repr(p) for p in PIPELINES)}, got {pipeline!r}", dataset=name, key="pipeline")
    try:
        parse_budget(budget)
    except ValueError:
        raise DataParamError(f"parameter 'memory_budget' of dataset '{name}' must be a share of free memory "
                             f"like \"25%\" or a size like \"2GiB\" or \"500MB\", got {budget!r}",
                             dataset=name, key="memory_budget") from None
    return pipeline, budget


def _augment_items(name: str, kwargs: dict[str, Any], params: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], list | None]:
    """Take a list-valued `augment` out of `kwargs`, checked (see `transforms.py`); the factory gets `augment=true`."""
    items = kwargs.get("augment")
    if not isinstance(items, (list, tuple)):
        return kwargs, None
    if "augment" not in params:
        raise DataParamError(f"dataset '{name}' has no image augmentation, so it takes no augment list",
                             dataset=name, key="augment", hint="augment applies to image datasets: "
                             + ", ".join(n for n in DATASETS if "augment" in dataset_params(n)))
    try:
        checked = normalise_items(items)
    except ValueError as e:
        raise DataParamError(f"parameter 'augment' of dataset '{name}': {e}", dataset=name, key="augment") from None
    return {**kwargs, "augment": True}, checked


def build_data(
    name: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    spec_dir: Path | None = None,
    seed: int = 0,
    device_is_cuda: bool = False,
    allow_imports: bool = False,
) -> DataBundle:
    """Validate `kwargs` for dataset `name` and build its DataBundle.

    Relative `root` paths resolve against `spec_dir` (else the CWD); `seed` seeds augmentation (combined
    with each epoch seed) and the `val_fraction` split; `device_is_cuda` turns on pinned memory.
    `pipeline` and `memory_budget`, which every dataset accepts, are stored on the bundle;
    `DataBundle.use_device` acts on them. A user function `"module:fn"` is imported under the user-code
    rule (`allow_imports` for modules not beside the spec). Every failure is an XdslError (DataParamError,
    carrying `.dataset` and `.key`).
    """
    spec_dir = Path(spec_dir) if spec_dir is not None else None
    factory = _factory(name, spec_dir, allow_imports)
    params = dataset_params(name, spec_dir, allow_imports)
    if params is None:  # a user function taking **kwargs: xdsl's keywords are checked, the rest passed on
        ours = {**USER_KEYWORDS, VAL_FRACTION: 0.0, **PIPELINE_PARAMS}
        given = dict(kwargs or {})
        merged = {**{k: v for k, v in given.items() if k not in ours},
                  **check_kwargs(name, {k: v for k, v in given.items() if k in ours}, ours)}
        items = None
    else:
        kwargs, items = _augment_items(name, dict(kwargs or {}), params)
        merged = check_kwargs(name, kwargs, params)
    val_fraction = merged.pop(VAL_FRACTION)
    pipeline, budget = _pipeline_settings(name, merged)
    ctx = BuildContext(
        name=name,
        spec_dir=spec_dir,
        seed=int(seed),
        device_is_cuda=bool(device_is_cuda),
    )
    bundle = factory(ctx, **merged)
    if items is not None:
        apply_augment(bundle, items, ctx.seed)
    if val_fraction != 0:
        require(0.0 < val_fraction < 1.0, ctx, VAL_FRACTION, "a number in [0, 1)", val_fraction)
        bundle = with_validation(bundle, val_fraction, ctx.seed)
    why = getattr(bundle.train, "why_per_sample", None)
    if pipeline == "batched" and why:
        raise DataParamError(f"pipeline=\"batched\" cannot run dataset '{name}': {why}", dataset=name,
                             key="pipeline", hint="keep augment to random_crop / random_resized_crop, hflip and "
                             "normalize (the batchable recipe), or use pipeline=\"auto\"")
    if pipeline == "batched" and not (batchable(bundle.train) and batchable(bundle.test)):
        split = " once val_fraction has split its train set" if val_fraction else ""
        raise DataParamError(f"pipeline=\"batched\" needs uint8 images, which dataset '{name}' does not have{split}",
                             dataset=name, key="pipeline", hint='use pipeline="auto" or "per_sample"')
    bundle.pipeline, bundle.memory_budget = pipeline, budget
    return bundle
