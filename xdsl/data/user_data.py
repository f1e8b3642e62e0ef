"""A user's own data: `data "mydata:load"(n=100)` calls `load(n=100)` from `mydata.py` beside the spec.

The function returns `(train, test)`: torch Datasets, or anything indexable with a length, of `(x, label)` pairs,
`x` a floating-point tensor of one shape, `label` a non-negative integer (an int, or an integer tensor or numpy
scalar). Its keywords are read from its signature (the import rule of `xdsl/user_code.py`); `batch_size`,
`num_workers`, `val_fraction`, `pipeline` and `memory_budget` are xdsl's, as for every dataset, and are not
passed on. Both sets are read once when the data is built: every sample is checked, the input shape is the first
sample's, the class count is a `num_classes` attribute of the train set or else its largest label + 1. The call
and its checks are kept for the process (one entry), so `xdsl run` calls the function once for the shape the
networks are checked with and the data they train on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from xdsl.data.bundle import DataBundle
from xdsl.data.params import REQUIRED, BuildContext, DataParamError, require
from xdsl.errors import XdslError
from xdsl.user_code import USER_REF, local_module_file, user_callable

__all__ = ["USER_DEFAULTS", "UserSamples", "build_user", "is_user_ref", "user_function", "user_params", "user_shape"]

USER_DEFAULTS: dict[str, Any] = {"batch_size": 64, "num_workers": 0}
_RETURNS = "(train, test) datasets of (tensor, label) pairs"
_XDSL_KEYS = frozenset({"val_fraction", "pipeline", "memory_budget"})  # taken out by build_data before the factory
_LAST: dict[tuple, tuple] = {}  # the last call's key -> its checked result (one entry: datasets can be large)


def is_user_ref(name: str) -> bool:
    return ":" in name


def user_function(name: str, spec_dir: Path | None, allow_imports: bool) -> Callable[..., Any]:
    """The function a `"module:fn"` data name refers to, under the user-code import rule; errors are DataParamErrors."""
    try:
        return user_callable(name, spec_dir, allow_imports, what="dataset", returns=_RETURNS)
    except DataParamError:
        raise
    except XdslError as e:
        raise DataParamError(e.message, dataset=name, hint=e.hint) from None


def user_params(name: str, spec_dir: Path | None, allow_imports: bool) -> dict[str, Any] | None:
    """The function's keywords with their defaults (REQUIRED where it has none), then xdsl's; None when it takes
    **kwargs (any keyword is then passed on)."""
    fn = user_function(name, spec_dir, allow_imports)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    own = {p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default for p in params
           if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)}
    return {**own, **USER_DEFAULTS}


class UserSamples(Dataset):
    """A user's set with its labels as Python ints (so batches collate to (B,) long), `labels` read once."""

    def __init__(self, data: Any, labels: Tensor):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.data[index][0], int(self.labels[index])


def _label(split: str, i: int, y: Any) -> int:
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point() and y.dtype is not torch.bool:
        y = y.item()
    elif isinstance(y, np.integer):
        y = int(y)
    if not isinstance(y, int) or isinstance(y, bool) or y < 0:
        raise XdslError(f"sample {i} of the {split} set has label {y!r}; labels must be non-negative integers "
                        "(class indices)")
    return y


def _pair(split: str, i: int, sample: Any) -> tuple[Any, Any]:
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise XdslError(f"sample {i} of the {split} set is {type(sample).__name__}, not an (x, label) pair")
    return sample[0], sample[1]


def _check_x(split: str, i: int, x: Any, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if not isinstance(x, Tensor):
        raise XdslError(f"x of sample {i} of the {split} set is a {type(x).__name__}, not a torch tensor")
    if not x.is_floating_point():
        raise XdslError(f"x of sample {i} of the {split} set is a {x.dtype} tensor; networks take floating-point "
                        "inputs (e.g. x.float() / 255)")
    if shape is not None and tuple(x.shape) != shape:
        raise XdslError(f"x of sample {i} of the {split} set has shape {tuple(x.shape)}, but sample 0 of the train "
                        f"set has {shape}")
    return tuple(x.shape)


def _read(ref: str, split: str, data: Any, shape: tuple[int, ...] | None) -> tuple[Tensor, tuple[int, ...]]:
    """(labels, sample shape) of one set, every sample checked; TensorDatasets are checked as whole tensors."""
    try:
        n = len(data)
        data[0] if n else None  # noqa: B018 - indexable?
    except Exception as e:  # noqa: BLE001
        raise XdslError(f"the {split} set ({type(data).__name__}) is not indexable with a length: "
                        f"{type(e).__name__}: {e}") from None
    if n == 0:
        raise XdslError(f"the {split} set is empty")
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        xs, ys = data.tensors
        shape = _check_x(split, 0, xs[0], shape)
        if ys.dim() != 1 or ys.is_floating_point() or ys.dtype is torch.bool or int(ys.min()) < 0:
            raise XdslError(f"the {split} set's labels are a {ys.dtype} tensor of shape {tuple(ys.shape)}; labels "
                            "must be non-negative integers, one per sample")
        return ys.long(), shape
    labels = []
    for i in range(n):
        x, y = _pair(split, i, data[i])
        shape = _check_x(split, i, x, shape)
        labels.append(_label(split, i, y))
    return torch.tensor(labels, dtype=torch.long), shape  # type: ignore[return-value]


def _call(ref: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple:
    shown = f"{ref}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        out = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's function failing is a user error, in one line
        raise XdslError(f"{shown} raised {type(e).__name__}: {e}") from None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise XdslError(f"{shown} returned {type(out).__name__}; it must return {_RETURNS}")
    train, test = out
    y_train, shape = _read(ref, "train", train, None)
    y_test, _ = _read(ref, "test", test, shape)
    declared = getattr(train, "num_classes", None)
    classes = int(declared) if isinstance(declared, int) and not isinstance(declared, bool) else int(y_train.max()) + 1
    top = int(max(y_train.max(), y_test.max()))
    if top >= classes:
        raise XdslError(f"label {top} is outside the {classes} classes "
                        f"({'num_classes' if declared is not None else 'the train set largest label + 1'})")
    return train, test, y_train, y_test, shape, classes


def _checked(ref: str, fn: Callable[..., Any], kwargs: dict[str, Any], spec_dir: Path | None) -> tuple:
    module_file = local_module_file(ref.split(":")[0], spec_dir)
    stamp = module_file.stat().st_mtime_ns if module_file is not None else None
    try:  # the same call whether its defaults were filled in (build_data) or not (user_shape)
        bound = inspect.signature(fn).bind(**kwargs)
        bound.apply_defaults()
        canonical = dict(bound.arguments)
    except (TypeError, ValueError):
        canonical = kwargs
    key = (ref, str(spec_dir), stamp, repr(sorted(canonical.items())))
    if key not in _LAST:
        result = _call(ref, fn, kwargs)
        _LAST.clear()
        _LAST[key] = result
    return _LAST[key]


def _fail(ctx: BuildContext, e: XdslError) -> DataParamError:
    return DataParamError(f"dataset '{ctx.name}': {e.message}", dataset=ctx.name, hint=e.hint)


def user_shape(name: str, kwargs: dict[str, Any], spec_dir: Path | None, allow_imports: bool) -> tuple[int, ...]:
    """The shape of one sample: the function is called (and its sets checked) once for this and `build_user`."""
    ctx = BuildContext(name=name, spec_dir=spec_dir)
    own = {k: v for k, v in kwargs.items() if k not in USER_DEFAULTS and k not in _XDSL_KEYS}
    try:
        return _checked(name, user_function(name, spec_dir, allow_imports), own, spec_dir)[4]
    except DataParamError:
        raise
    except XdslError as e:
        raise _fail(ctx, e) from None



def build_user(ctx: BuildContext, *, fn: Callable[..., Any], batch_size: int, num_workers: int,
               **kwargs: Any) -> DataBundle:
    """The factory of `data "module:fn"(...)`: the function's sets, checked, as a DataBundle."""
    require(batch_size >= 1, ctx, "batch_size", "a positive integer", batch_size)
    require(num_workers >= 0, ctx, "num_workers", "a non-negative integer", num_workers)
    if not USER_REF.match(ctx.name):
        raise DataParamError(f"bad dataset reference '{ctx.name}'", dataset=ctx.name)
    try:
        train, test, y_train, y_test, shape, classes = _checked(ctx.name, fn, kwargs, ctx.spec_dir)
    except XdslError as e:
        raise _fail(ctx, e) from None
    return DataBundle(train=UserSamples(train, y_train), test=UserSamples(test, y_test), num_classes=classes,
                      input_shape=shape, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=ctx.device_is_cuda, name=ctx.name, classes=[str(i) for i in range(classes)])
