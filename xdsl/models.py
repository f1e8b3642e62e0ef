"""Small builtin networks (`builtin.cnn`, `builtin.resnet`, `builtin.mlp`) for CPU tests and small inputs.

Each has named top-level stages (`stem`, `layer1`.., `pool`, `fc`) so specs can cut them the same way
as torchvision ResNets, and a plain forward that torch.fx can trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from xdsl.errors import XdslError
from xdsl.registry import Registry

__all__ = ["MODELS", "BasicBlock", "PadShortcut", "CNN", "ResNet", "MLP", "cnn", "resnet", "mlp", "mobilenet_v1",
           "inception_v1"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
"""Model constructors by full spec reference (`builtin.cnn`, ...); `build_model` looks here first."""


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise XdslError(f"{key} must be a positive integer, got {value!r}")


class CNN(nn.Module):
    """Plain conv-bn-relu network: stem, three stages (stages 2 and 3 halve the size), pool, fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        w = width
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, w))
        self.layer1 = nn.Sequential(*_conv_bn_relu(w, w), *_conv_bn_relu(w, w))
        self.layer2 = nn.Sequential(*_conv_bn_relu(w, 2 * w, 2), *_conv_bn_relu(2 * w, 2 * w))
        self.layer3 = nn.Sequential(*_conv_bn_relu(2 * w, 4 * w, 2), *_conv_bn_relu(4 * w, 4 * w))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


class PadShortcut(nn.Module):
    """He et al.'s option A shortcut: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, extra: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, half, self.extra - half))


SHORTCUTS = ("projection", "pad")


class BasicBlock(nn.Module):
    """ResNet basic block; where the shape changes a 1x1 projection shortcut, or with shortcut="pad"
    He et al.'s parameter-free option A (the CIFAR ResNets of their sec. 4.2)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if (stride != 1 or cin != cout) and shortcut == "pad":
            self.downsample = PadShortcut(cout - cin, stride)
        elif stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): depth = 6n + 2, three stages of n blocks.

    shortcut="pad" is the paper's option A (ResNet-20/32/56/110 of its Table 6: 0.27/0.46/0.85/1.7M
    parameters); "projection" (the default here, option B) adds a 1x1 conv + BN where the shape changes.
    """

    def __init__(self, depth: int = 8, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 shortcut: str = "projection"):
        super().__init__()
        _check_positive(depth=depth, num_classes=num_classes, in_channels=in_channels, width=width)
        if depth < 8 or (depth - 2) % 6:
            raise XdslError(f"resnet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        if shortcut not in SHORTCUTS:
            raise XdslError(f"resnet shortcut is {' or '.join(map(repr, SHORTCUTS))}, got {shortcut!r}")
        n = (depth - 2) // 6
        w = width
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, w))
        self.layer1 = self._stage(w, w, n, 1, shortcut)
        self.layer2 = self._stage(w, 2 * w, n, 2, shortcut)
        self.layer3 = self._stage(2 * w, 4 * w, n, 2, shortcut)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(4 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride, shortcut)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


class MLP(nn.Module):
    """Two hidden layers; `layer1` flattens, so it takes images as well as vectors."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128):
        super().__init__()
        _check_positive(num_classes=num_classes, in_features=in_features, hidden=hidden)
        self.layer1 = nn.Sequential(nn.Flatten(1), nn.Linear(in_features, hidden), nn.ReLU(inplace=True))
        self.layer2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layer2(self.layer1(x)))


@MODELS.register("builtin.cnn")
def cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> CNN:
    """Small CNN; on 8x8 digits the stages give 8x8, 8x8, 4x4, 2x2 maps of width, width, 2w, 4w."""
    return CNN(num_classes=num_classes, in_channels=in_channels, width=width)


@MODELS.register("builtin.resnet")
def resnet(depth: int = 8, num_classes: int = 10, in_channels: int = 3, width: int = 16,
           shortcut: str = "projection") -> ResNet:
    """CIFAR ResNet-8/14/20/...; on 32x32 inputs the stages give 32, 16 and 8 pixel maps."""
    return ResNet(depth=depth, num_classes=num_classes, in_channels=in_channels, width=width, shortcut=shortcut)


@MODELS.register("builtin.mlp")
def mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 128) -> MLP:
    """MLP for flattened inputs (64 features = 8x8 digits)."""
    return MLP(num_classes=num_classes, in_features=in_features, hidden=hidden)


@MODELS.register("builtin.mobilenet_v1")
def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> nn.Module:
    """MobileNet v1, the DML paper's compact student (3.3M parameters with 100 classes, as its Table 1)."""
    from xdsl.mobilenet import MobileNetV1

    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, width=width, dropout=dropout)


@MODELS.register("builtin.inception_v1")
def inception_v1(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    """InceptionV1: torchvision's GoogLeNet with its auxiliary heads off (the DML paper's large network)."""
    from xdsl.mobilenet import inception_v1 as make

    return make(num_classes=num_classes, dropout=dropout)
