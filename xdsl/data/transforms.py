"""The augmentation vocabulary of `data ...(augment=[...])`: spec names -> torchvision.transforms.v2 classes.

A name is the class's name in snake_case (`random_crop` -> RandomCrop, `color_jitter` -> ColorJitter), plus a
few short forms (`hflip`, `randaugment`, `trivial_augment`, `mixup`, `cutmix`). An item's keywords are the v2
class's constructor parameters, checked against its signature, and its values are checked by constructing
the class, so a spec that checks builds. Items are plain data, `(name, {keyword: value})`, with positional
arguments already named: what the checker stores, `--set` overrides and run directories round-trip.

`batch` items (`mixup`, `cutmix`) act on whole training batches and make the labels soft; every other item
acts on one image (see `xdsl.data.augment` for how a list runs).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from xdsl.registry import Registry, did_you_mean

__all__ = ["REQUIRED", "TRANSFORMS", "Problem", "TransformDef", "build_transform", "check_item", "name_args",
           "normalise_items"]

REQUIRED = inspect.Parameter.empty
"""Default of a constructor parameter that must be given."""


@dataclass(frozen=True)
class TransformDef:
    """One spec name: its v2 class, whether it acts on batches, and how its keywords map to the class's."""

    cls_name: str
    batch: bool = False
    hidden: tuple[str, ...] = ()                 # constructor parameters a spec may not set
    aliases: Mapping[str, str] = field(default_factory=dict)  # spec keyword -> constructor parameter
    defaults: Mapping[str, Any] = field(default_factory=dict)  # overrides of the signature's defaults

    @property
    def cls(self) -> type:
        from torchvision.transforms import v2

        return getattr(v2, self.cls_name)

    def params(self) -> dict[str, Any]:
        """Constructor parameters a spec may set, in order, with their defaults (REQUIRED when none)."""
        sig = inspect.signature(self.cls.__init__)
        out = {p.name: p.default for p in list(sig.parameters.values())[1:]
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in self.hidden}
        return {**out, **{k: v for k, v in self.defaults.items() if k in out}}

    def positional(self) -> list[str]:
        """Parameters an item may give without a keyword (v2's keyword-only ones may not)."""
        sig = inspect.signature(self.cls.__init__)
        return [p.name for p in list(sig.parameters.values())[1:]
                if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in self.hidden]


TRANSFORMS: Registry[TransformDef] = Registry("transform")
"""Spec name -> v2 class of every augmentation item."""

_SAMPLE = (
    "RandomCrop", "RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "ColorJitter", "RandAugment",
    "TrivialAugmentWide", "AutoAugment", "AugMix", "RandomErasing", "Resize", "CenterCrop", "Pad",
    "RandomRotation", "RandomAffine", "RandomPerspective", "GaussianBlur", "GaussianNoise", "Grayscale",
    "RandomGrayscale", "RandomInvert", "RandomPosterize", "RandomSolarize", "RandomAdjustSharpness",
    "RandomAutocontrast", "RandomEqualize", "RandomChannelPermutation", "RandomPhotometricDistort",
    "ElasticTransform", "RandomZoomOut", "JPEG",
)


def _snake(cls_name: str) -> str:
    """RandomResizedCrop -> random_resized_crop, JPEG -> jpeg, AugMix -> aug_mix."""
    out = []
    for i, ch in enumerate(cls_name):
        if ch.isupper() and i and (cls_name[i - 1].islower() or (i + 1 < len(cls_name) and cls_name[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


_RANDAUGMENT = TransformDef("RandAugment", aliases={"n": "num_ops", "m": "magnitude"})  # the paper's N and M
for _cls in _SAMPLE:
    TRANSFORMS.register(_snake(_cls), _RANDAUGMENT if _cls == "RandAugment" else
                        TransformDef(_cls, hidden=("inplace",)))
for _name, _def in {
    "hflip": TransformDef("RandomHorizontalFlip"),
    "vflip": TransformDef("RandomVerticalFlip"),
    "randaugment": _RANDAUGMENT,
    "trivial_augment": TransformDef("TrivialAugmentWide"),
    "augmix": TransformDef("AugMix"),
    # mean/std default to the dataset's own, so `normalize` alone marks where normalisation happens
    "normalize": TransformDef("Normalize", hidden=("inplace",), defaults={"mean": None, "std": None}),
    "mixup": TransformDef("MixUp", batch=True, hidden=("num_classes", "labels_getter")),
    "cutmix": TransformDef("CutMix", batch=True, hidden=("num_classes", "labels_getter")),
}.items():
    TRANSFORMS.register(_name, _def)


class Problem(NamedTuple):
    """What is wrong with an item: the keyword at fault (None: the item itself), a message, a hint."""

    keyword: str | None
    message: str
    hint: str | None = None


def _hint(name: str, pool: Sequence[str], fallback: str | None) -> str | None:
    guess = did_you_mean(name, pool)
    return f"did you mean '{guess}'?" if guess else fallback


def _unknown_hint(name: str) -> str:
    """Did-you-mean, or the transforms sharing the name's last word (`random_flip`: hflip, vflip, ...)."""
    word = name.rsplit("_", 1)[-1].lower()
    related = [n for n in TRANSFORMS.names() if len(word) >= 3 and word in n]
    guess = did_you_mean(name, TRANSFORMS.names())
    if guess and (not related or guess in related):
        return f"did you mean '{guess}'?"
    if related:
        return f"transforms with '{word}': {', '.join(related)}"
    return f"transforms: {', '.join(TRANSFORMS.names())}"


def _convert(key: str, value: Any) -> Any:
    """Spec values as the class takes them: lists as tuples, AutoAugment's policy by name."""
    if isinstance(value, list):
        return tuple(_convert(key, v) for v in value)
    if key == "policy" and isinstance(value, str):
        from torchvision.transforms import AutoAugmentPolicy

        return AutoAugmentPolicy(value.lower())
    return value


def build_transform(name: str, kwargs: Mapping[str, Any], mean: Sequence[float] = (), std: Sequence[float] = ()):
    """The v2 transform of a checked item; `normalize` without mean/std takes the given (dataset's) ones."""
    spec = TRANSFORMS[name]
    given = {k: _convert(k, v) for k, v in kwargs.items()}
    if spec.cls_name == "Normalize":
        given = {"mean": tuple(mean), "std": tuple(std), **{k: v for k, v in given.items() if v is not None}}
    return spec.cls(**given)


def name_args(name: str, args: Sequence[Any]) -> tuple[dict[str, Any], Problem | None]:
    """Positional arguments of item `name` under their parameter names (v2's order)."""
    spec = TRANSFORMS.get(name)
    names = spec.positional()
    if len(args) > len(names):
        only = f"at most {len(names)} positional argument(s) ({', '.join(names)})" if names else "keywords only"
        return {}, Problem(None, f"{name}() takes {only}, got {len(args)}",
                           f"e.g. {name}({', '.join(f'{k}=...' for k in list(spec.params())[:2])})")
    return dict(zip(names, args)), None


def check_item(name: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], Problem | None]:
    """Item `name` with `kwargs` (spec keywords): its canonical keywords, or the first problem found."""
    if name not in TRANSFORMS:
        return {}, Problem(None, f"unknown transform '{name}'", _unknown_hint(name))
    spec = TRANSFORMS[name]
    params = spec.params()
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        canonical = spec.aliases.get(key, key)
        if canonical not in params:
            return {}, Problem(key, f"transform '{name}' ({spec.cls_name}) has no parameter '{key}'",
                               _hint(key, [*params, *spec.aliases], f"its parameters are: {', '.join(params)}"))
        if canonical in out:
            return {}, Problem(key, f"'{key}' gives {name}()'s '{canonical}' a second time")
        out[canonical] = value
    missing = [k for k, v in params.items() if v is REQUIRED and k not in out]
    if missing:
        return {}, Problem(None, f"{name}() needs {' and '.join(f'{k}=' for k in missing)}",
                           f"e.g. {name}({', '.join(f'{k}=...' for k in missing)})")
    if spec.cls_name == "Normalize" and (out.get("mean") is None) != (out.get("std") is None):
        return {}, Problem(None, "normalize() takes both mean= and std=, or neither (the dataset's own)")
    problem = _constraint(name, spec, out) or _construct(name, out)
    return (out, None) if problem is None else ({}, problem)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_ints(v: Any) -> bool:
    """An int >= 1, or a list of one or two of them (a size)."""
    values = v if isinstance(v, (list, tuple)) and 1 <= len(v) <= 2 else [v]
    return all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in values)


def _interpolations() -> list[str]:
    from torchvision.transforms import InterpolationMode

    return [m.value for m in InterpolationMode]


def _constraint(name: str, spec: TransformDef, kwargs: Mapping[str, Any]) -> Problem | None:
    """Value rules v2's constructors leave to the first call (or to a warning)."""
    for key, value in kwargs.items():
        must = None
        if key in ("size", "kernel_size") and not (value is None and spec.cls_name == "Resize") \
                and not _positive_ints(value):
            must = "a positive integer or a list [height, width] of them"
        elif key == "p" and not (_is_number(value) and 0 <= value <= 1):
            must = "a probability in [0, 1]"
        elif key == "alpha" and spec.batch and not (_is_number(value) and value > 0):
            must = "a number > 0 (the Beta distribution's concentration)"
        elif key in ("scale", "ratio") and spec.cls_name in ("RandomResizedCrop", "RandomErasing") and not (
                isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) and v > 0 for v in value)
                and value[0] <= value[1]):
            must = "a list [min, max] of positive numbers with min <= max"
        elif key == "padding" and value is not None and not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for v in (value if isinstance(value, (list, tuple)) else [value])):
            must = "a non-negative integer or a list of them"
        elif key in ("mean", "std") and spec.cls_name == "Normalize" and value is not None and not (
                isinstance(value, (list, tuple)) and value and all(_is_number(v) and (key == "mean" or v > 0)
                                                                   for v in value)):
            must = "a list of numbers, one per channel" + (", each > 0 (it divides)" if key == "std" else "")
        elif key == "interpolation" and value not in _interpolations():
            return Problem(key, f"{name}(): unknown interpolation {value!r}",
                           _hint(str(value), _interpolations(), f"interpolations: {', '.join(_interpolations())}"))
        if must:
            return Problem(key, f"{name}(): '{key}' must be {must}, got {value!r}")
    return None


def _construct(name: str, kwargs: Mapping[str, Any]) -> Problem | None:
    """Build the transform to check the values; blame the first keyword that fails on its own."""
    dummy = {"mean": (0.5,), "std": (0.5,)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # v2 only warns about some bad values (a reversed scale=[max, min])
        try:
            build_transform(name, kwargs, **dummy)
            return None
        except Exception as e:  # noqa: BLE001 - any constructor error is a bad value
            error = e
        required = {k: v for k, v in kwargs.items() if TRANSFORMS[name].params()[k] is REQUIRED}
        culprit = None
        for key in kwargs:
            try:
                build_transform(name, {**required, key: kwargs[key]}, **dummy)
            except Exception:  # noqa: BLE001
                culprit = key
                break
    what = f"'{culprit}' = {kwargs[culprit]!r}" if culprit else "the arguments"
    return Problem(culprit, f"{name}(): bad value for {what}: {error}")


def normalise_items(items: Any) -> list[tuple[str, dict[str, Any]]]:
    """Plain-data items (`[name, {kw}]`, `(name, kw)` or a bare name), checked; ValueError names the problem.

    For callers that pass `augment` from Python (`build_data`); the spec checker locates the same problems.
    """
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"augment must be a list of transforms, got {items!r}")
    out = []
    for item in items:
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], Mapping):
            name, kwargs = item[0], dict(item[1])
        else:
            raise ValueError(f"an augment item is a name or [name, {{keyword: value}}], got {item!r}")
        canonical, problem = check_item(name, kwargs)
        if problem is not None:
            raise ValueError(problem.message + (f" ({problem.hint})" if problem.hint else ""))
        out.append((name, canonical))
    return out
