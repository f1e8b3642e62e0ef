"""Adapters: small trainable modules placed between parts whose shapes differ, sized from inferred shapes.

A spec names only the kind and its options (`adapter a12 = conv1x1(relu=true)`); channel counts come
from the shapes on both ends of the edge (`in_shape`: what the previous part gives, `out_shape`: what
the next part expects), so the same spec line fits ResNet-18 (128 channels) to ResNeXt-50 (512).
Conv adapters also bridge an integer spatial downsampling (56x56 -> 28x28) with a strided conv;
anything else is an error naming both shapes. `head` is a BYOT auxiliary classifier; `bottleneck` (or
`sepconv`, the authors' code's head) and `classifier` are its two halves, so that its features can be a
path of their own.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from xdsl.errors import XdslError
from xdsl.registry import Registry, did_you_mean
from xdsl.shapes import infer_shape

__all__ = ["ADAPTERS", "make_adapter", "adapter_params", "joinable"]

Shape = Sequence[int]
AdapterFactory = Callable[..., nn.Module]

ADAPTERS: Registry[AdapterFactory] = Registry("adapter")
"""Adapter factories `f(in_shape, out_shape, n_classes, **options) -> nn.Module`; options are keyword-only."""


def joinable(out_shape: Shape, in_shape: Shape) -> bool:
    """Whether a part giving `out_shape` can feed a part expecting `in_shape` directly (batch size aside)."""
    return tuple(out_shape[1:]) == tuple(in_shape[1:])


def _fmt(shape: Shape | None) -> str:
    return "?" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def _need_out(kind: str, out_shape: Shape | None) -> Shape:
    if out_shape is None:
        raise XdslError(f"adapter {kind} needs the shape of what follows it, and nothing follows it")
    return out_shape


def _conv_geometry(kind: str, in_shape: Shape, out_shape: Shape | None) -> tuple[int, int, int]:
    """(in channels, out channels, stride) for a conv adapter between two (B, C, H, W) maps."""
    out = _need_out(kind, out_shape)
    if len(in_shape) != 4 or len(out) != 4:
        raise XdslError(
            f"adapter {kind} maps (B, C, H, W) feature maps, but the edge is {_fmt(in_shape)} -> {_fmt(out)}",
            hint="use linear(...) between flat (B, D) features",
        )
    (h, w), (oh, ow) = in_shape[2:], out[2:]
    if (h, w) == (oh, ow):
        return in_shape[1], out[1], 1
    if oh and ow and h % oh == 0 and w % ow == 0 and h // oh == w // ow:
        return in_shape[1], out[1], h // oh
    raise XdslError(
        f"adapter {kind} cannot map {_fmt(in_shape)} to {_fmt(out)}: "
        f"spatial size {h}x{w} -> {oh}x{ow} is not an integer downsampling",
        hint="cut the networks where their feature maps have the same size, or use a head",
    )


def _with_channels(kind: str, in_shape: Shape, out_shape: Shape | None, channels: int | None) -> Shape | None:
    """`channels=N` gives the output width where nothing after the adapter fixes it (adapter chains)."""
    if channels is None:
        return out_shape
    if channels < 1:
        raise XdslError(f"adapter {kind}: channels must be >= 1, got {channels}")
    if out_shape is None:
        return torch.Size((in_shape[0], channels, *in_shape[2:]))
    if out_shape[1] != channels:
        raise XdslError(f"adapter {kind}: channels={channels}, but what follows it has {out_shape[1]} channels")
    return out_shape


def _conv_stack(cin: int, cout: int, kernel: int, stride: int, relu: bool, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@ADAPTERS.register("identity")
def identity(in_shape: Shape, out_shape: Shape | None, n_classes: int | None) -> nn.Module:
    """No-op; only valid where the shapes already agree."""
    if out_shape is not None and not joinable(in_shape, out_shape):
        raise XdslError(f"adapter identity cannot map {_fmt(in_shape)} to {_fmt(out_shape)}")
    return nn.Identity()


def _conv_adapter(kind: str, kernel: int, doc: str) -> Callable[..., nn.Module]:
    """Register a conv adapter of one kernel size (+ BatchNorm, + ReLU); channels from the shapes."""

    def factory(in_shape: Shape, out_shape: Shape | None, n_classes: int | None, *, relu: bool = False,
                bn: bool = False, channels: int | None = None) -> nn.Module:
        cin, cout, stride = _conv_geometry(kind, in_shape, _with_channels(kind, in_shape, out_shape, channels))
        return _conv_stack(cin, cout, kernel, stride, relu, bn)

    factory.__name__, factory.__doc__ = kind, doc
    return ADAPTERS.register(kind, factory)


conv1x1 = _conv_adapter("conv1x1", 1, "1x1 convolution (+ BatchNorm, + ReLU): the XML paper's channel link-up "
                                      "(128 <-> 512).")
conv3x3 = _conv_adapter("conv3x3", 3, "3x3 convolution (padding 1) (+ BatchNorm, + ReLU).")


@ADAPTERS.register("regressor")
def regressor(
    in_shape: Shape,
    out_shape: Shape | None,
    n_classes: int | None,
    *,
    kernel: int = 3,
    relu: bool = False,
    bn: bool = False,
) -> nn.Module:
    """FitNets hint regressor: a conv mapping the student's guided layer to the teacher's hint channels."""
    if kernel not in (1, 3, 5):
        raise XdslError(f"adapter regressor: kernel must be 1, 3 or 5, got {kernel}")
    cin, cout, stride = _conv_geometry("regressor", in_shape, out_shape)
    return _conv_stack(cin, cout, kernel, stride, relu, bn)


@ADAPTERS.register("linear")
def linear(in_shape: Shape, out_shape: Shape | None, n_classes: int | None, *, relu: bool = False) -> nn.Module:
    """Fully connected map between any two feature shapes (flattened; reshaped back if needed)."""
    out = _need_out("linear", out_shape)
    din, dout = math.prod(in_shape[1:]), math.prod(out[1:])
    layers: list[nn.Module] = []
    if len(in_shape) != 2:
        layers.append(nn.Flatten(1))
    layers.append(nn.Linear(din, dout))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    if len(out) != 2:
        layers.append(nn.Unflatten(1, tuple(out[1:])))
    return nn.Sequential(*layers)


@ADAPTERS.register("head")
def head(
    in_shape: Shape,
    out_shape: Shape | None,
    n_classes: int | None,
    *,
    reduction: int = 4,
    out_channels: int | None = None,
    stride: int = 1,
    num_classes: int | None = None,
) -> nn.Module:
    """BYOT auxiliary classifier: bottleneck (1x1 reduce, 3x3, 1x1 expand; BN + ReLU each), pool, linear.

    Children are named `bottleneck`, `pool` and `fc`, so `head.bottleneck` gives the features for
    BYOT's L2 hint. `out_channels` (default: the input's) sets the bottleneck's output width, e.g. to
    the deepest stage's channels; `num_classes` overrides the network's class count.
    """
    n = num_classes if num_classes is not None else n_classes
    if n is None and out_shape is not None and len(out_shape) == 2:
        n = out_shape[1]
    if n is None:
        raise XdslError("adapter head needs the number of classes", hint="pass head(num_classes=N)")
    if len(in_shape) == 2:
        return nn.Sequential(nn.Linear(in_shape[1], n))
    if len(in_shape) != 4:
        raise XdslError(f"adapter head takes (B, C, H, W) or (B, D) features, got {_fmt(in_shape)}")
    if reduction < 1 or stride < 1:
        raise XdslError("adapter head: reduction and stride must be positive")
    cin = in_shape[1]
    cout = out_channels if out_channels is not None else cin
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return nn.Sequential(OrderedDict(bottleneck=_bottleneck_convs(cin, cout, reduction, stride), pool=pool,
                                     fc=nn.Linear(cout, n)))


@ADAPTERS.register("bottleneck")
def bottleneck(
    in_shape: Shape,
    out_shape: Shape | None,
    n_classes: int | None,
    *,
    reduction: int = 4,
    out_channels: int | None = None,
    stride: int = 1,
) -> nn.Module:
    """A head's feature half (BYOT): the head's bottleneck convs, then average pooling to what follows.

    `net.p1 >> b1 >> c1` with `c1 = classifier()` is a `head` whose features `net.p1 >> b1` are a path of
    their own, so BYOT's L2 hint `l2(net.p1 >> b1, net.p3)` and the head's logits share one computation.
    Channels and size come from what follows (the hint's other side): a flat (B, D) target gives D channels,
    globally pooled; a (B, C, H, W) target gives C channels pooled to H x W. With nothing to match, the
    output is `out_channels` (default: the input's) channels, globally pooled.
    """
    if len(in_shape) != 4:
        raise XdslError(f"adapter bottleneck takes (B, C, H, W) feature maps, got {_fmt(in_shape)}")
    if reduction < 1 or stride < 1:
        raise XdslError("adapter bottleneck: reduction and stride must be positive")
    target = out_shape if out_shape is not None and len(out_shape) in (2, 4) else None
    if out_shape is not None and target is None:
        raise XdslError(f"adapter bottleneck maps to (B, D) or (B, C, H, W) features, not to {_fmt(out_shape)}")
    cout = target[1] if target is not None else (out_channels if out_channels is not None else in_shape[1])
    if out_channels is not None and out_channels != cout:
        raise XdslError(f"adapter bottleneck: out_channels={out_channels}, but what follows has {cout} channels")
    layers: list[nn.Module] = [_bottleneck_convs(in_shape[1], cout, reduction, stride)]
    if target is not None and len(target) == 4:
        layers.append(nn.AdaptiveAvgPool2d(tuple(target[2:])))
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers)


def _sep_conv(cin: int, cout: int) -> nn.Sequential:
    """BYOT's SepConv (its released code): depthwise 3x3 stride 2, 1x1, BN, ReLU, depthwise 3x3, 1x1 to cout,
    BN, ReLU: halves the map and changes the width with few parameters."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
        nn.Conv2d(cin, cin, 1, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=False),
        nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    )


@ADAPTERS.register("sepconv")
def sepconv(in_shape: Shape, out_shape: Shape | None, n_classes: int | None) -> nn.Module:
    """A BYOT head's feature half as the authors' code builds it: SepConv blocks, each doubling the channels
    and halving the map, from a stage's width up to the deepest features' (64 -> 128 -> 256 -> 512 after
    ResNet-18's first stage: three blocks), then average pooling to what follows (a (B, D) target: global).

    The widths must differ by a power of two (what the released heads do); the attention modules that
    code also puts on the heads are not part of it.
    """
    if len(in_shape) != 4:
        raise XdslError(f"adapter sepconv takes (B, C, H, W) feature maps, got {_fmt(in_shape)}")
    target = _need_out("sepconv", out_shape)
    if len(target) not in (2, 4):
        raise XdslError(f"adapter sepconv maps to (B, D) or (B, C, H, W) features, not to {_fmt(target)}")
    cin, cout = in_shape[1], target[1]
    blocks = math.log2(cout / cin) if cout >= cin else -1.0
    if blocks < 0 or blocks != int(blocks):
        raise XdslError(f"adapter sepconv doubles the channels per block: it cannot map {cin} to {cout} channels",
                        hint="use bottleneck() between widths that are not a power of two apart")
    layers: list[nn.Module] = [_sep_conv(cin * 2**i, cin * 2 ** (i + 1)) for i in range(int(blocks))]
    if len(target) == 4:
        layers.append(nn.AdaptiveAvgPool2d(tuple(target[2:])))
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers)


@ADAPTERS.register("classifier")
def classifier(
    in_shape: Shape, out_shape: Shape | None, n_classes: int | None, *, num_classes: int | None = None
) -> nn.Module:
    """A head's classifier half: global average pooling (of (B, C, H, W) maps) and a linear layer to logits."""
    n = num_classes if num_classes is not None else n_classes
    if n is None and out_shape is not None and len(out_shape) == 2:
        n = out_shape[1]
    if n is None:
        raise XdslError("adapter classifier needs the number of classes", hint="pass classifier(num_classes=N)")
    if len(in_shape) == 4:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_shape[1], n))
    if len(in_shape) == 2:
        return nn.Sequential(nn.Linear(in_shape[1], n))
    raise XdslError(f"adapter classifier takes (B, C, H, W) or (B, D) features, got {_fmt(in_shape)}")


def _bottleneck_convs(cin: int, cout: int, reduction: int, stride: int) -> nn.Sequential:
    """BYOT's bottleneck: 1x1 reduce to cout / reduction, 3x3 (stride), 1x1 expand to cout; BN + ReLU each."""
    mid = max(1, cout // reduction)
    return nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, stride, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def adapter_params(kind: str) -> dict[str, Any]:
    """The options an adapter kind accepts, with their defaults (for the checker)."""
    factory = ADAPTERS.get(kind)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values() if p.kind == p.KEYWORD_ONLY}


def _check_options(kind: str, options: Mapping[str, Any]) -> None:
    accepted = adapter_params(kind)
    for key, value in options.items():
        if key not in accepted:
            guess = did_you_mean(key, accepted)
            listed = ", ".join(accepted) or "no options"
            raise XdslError(
                f"adapter {kind} got an unknown keyword argument '{key}'",
                hint=f"did you mean '{guess}'?" if guess else f"{kind} accepts: {listed}",
            )
        default = accepted[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise XdslError(f"adapter {kind}: {key} must be true or false, got {value!r}")
        if (default is None or isinstance(default, int)) and not isinstance(default, bool):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise XdslError(f"adapter {kind}: {key} must be an integer, got {value!r}")


def make_adapter(
    kind: str,
    kwargs: Mapping[str, Any],
    in_shape: Shape,
    out_shape: Shape | None,
    num_classes: int | None,
) -> nn.Module:
    """Build adapter `kind` for the edge `in_shape` -> `out_shape` (None after the last part).

    The result is checked to produce `out_shape` (or (B, num_classes) for a head).
    """
    factory = ADAPTERS.get(kind)
    _check_options(kind, kwargs)
    out = None if out_shape is None else torch.Size(out_shape)
    module = factory(torch.Size(in_shape), out, num_classes, **kwargs)
    if out_shape is not None and kind != "head":
        got = infer_shape(module, in_shape)
        if not joinable(got, out_shape):
            raise XdslError(f"adapter {kind} maps {_fmt(in_shape)} to {_fmt(got)}, not to {_fmt(out_shape)}")
    return module
