"""The CIFAR networks of the papers the shipped specs reproduce, at the papers' configurations.

    builtin.resnet18_cifar / resnet34_cifar / resnet50_cifar   torchvision's ResNets with the CIFAR stem
    builtin.wrn(depth=28, widen=10, dropout=0.3)              pre-activation wide ResNet (WRN-28-10)
    builtin.densenet(depth=100, growth=12)                    DenseNet-BC (the Born-Again DenseNets)

(The CIFAR ResNet-20/32/56/110 of He et al. are `builtin.resnet(depth=32, shortcut="pad")`.)
Parameter counts are tested against the papers' tables (tests/test_cifar_models.py).
Module names are the ones cut points refer to: torchvision's for the ResNets (`layer1`..`layer4`,
`avgpool`, `fc`), `stem`, `layer1`..`layer3`, `norm`, `pool`, `fc` for the wide ResNet and
`stem`, `block1`, `trans1`, ..., `block3`, `norm`, `pool`, `fc` for the DenseNet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from xdsl.errors import XdslError
from xdsl.models import MODELS

__all__ = ["resnet18_cifar", "resnet34_cifar", "resnet50_cifar", "WideResNet", "wrn", "DenseNet", "densenet"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise XdslError(message)


def _cifar_stem(model: tv_resnet.ResNet, in_channels: int) -> tv_resnet.ResNet:
    """torchvision's ResNet with a 3x3 stride-1 stem and no max-pool: 32x32 inputs keep 32x32 maps in
    layer1 (the ImageNet stem would leave 8x8 there and 1x1 before pooling)."""
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


@MODELS.register("builtin.resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> tv_resnet.ResNet:
    """ResNet-18 with the CIFAR stem (BYOT's CIFAR-100 backbone; 11.2M parameters with 100 classes)."""
    return _cifar_stem(tv_resnet.resnet18(num_classes=num_classes), in_channels)


@MODELS.register("builtin.resnet34_cifar")
def resnet34_cifar(num_classes: int = 10, in_channels: int = 3) -> tv_resnet.ResNet:
    """ResNet-34 with the CIFAR stem."""
    return _cifar_stem(tv_resnet.resnet34(num_classes=num_classes), in_channels)


@MODELS.register("builtin.resnet50_cifar")
def resnet50_cifar(num_classes: int = 10, in_channels: int = 3) -> tv_resnet.ResNet:
    """ResNet-50 with the CIFAR stem."""
    return _cifar_stem(tv_resnet.resnet50(num_classes=num_classes), in_channels)


class _PreActBlock(nn.Module):
    """Wide ResNet block: BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3; a 1x1 conv shortcut on the
    pre-activated input where the shape changes (Zagoruyko & Komodakis' reference code)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.dropout(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-d-k: a 3x3 stem of 16 channels, three groups of (d-4)/6 pre-activation blocks of 16k, 32k,
    64k channels (strides 1, 2, 2), final BN-ReLU, global average pool, fc (Zagoruyko & Komodakis 2016)."""

    def __init__(self, depth: int = 28, widen: int = 10, dropout: float = 0.0, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        _check(depth >= 10 and (depth - 4) % 6 == 0, f"wrn depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
        _check(widen >= 1, f"wrn widen must be >= 1, got {widen}")
        _check(0.0 <= dropout < 1.0, f"wrn dropout must be in [0, 1), got {dropout}")
        n, widths = (depth - 4) // 6, [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        cin, groups = 16, []
        for width, stride in zip(widths, (1, 2, 2)):
            groups.append(nn.Sequential(*[_PreActBlock(cin if i == 0 else width, width, stride if i == 0 else 1,
                                                       dropout) for i in range(n)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = groups
        self.norm = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.norm(x)))


@MODELS.register("builtin.wrn")
def wrn(depth: int = 28, widen: int = 10, dropout: float = 0.0, num_classes: int = 10,
        in_channels: int = 3) -> WideResNet:
    """Pre-activation wide ResNet WRN-depth-widen (WRN-28-10: 36.5M parameters; the DML paper trains it
    on CIFAR-100, the wide-ResNet paper with dropout 0.3)."""
    return WideResNet(depth=depth, widen=widen, dropout=dropout, num_classes=num_classes, in_channels=in_channels)


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k channels)-BN-ReLU-conv3x3 (k channels), concatenated to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
        return torch.cat([x, out], 1)


def _transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs (Huang et al. 2017): a 3x3 stem of 2k channels, three dense blocks of
    (depth-4)/6 bottleneck layers with growth k, transitions compressing by `compression` and halving the
    size, final BN-ReLU, global average pool, fc.

    The Born-Again paper's depths 90 and 80 are not 6n+4; (depth-4)/6 is rounded down for them (14 and
    12 layers per block), as the common PyTorch DenseNet code does. Its Table 1 parameter counts are not
    reproduced by this (or any standard) DenseNet-BC layout: 6.9/15.1/20.9/47.0M here for DenseNet-112-33,
    90-60, 80-80, 80-120 against its 6.3/16.1/22.4/50.4M (its Table 4 gives 22.4M for 90-60 as well).
    """

    def __init__(self, depth: int = 100, growth: int = 12, compression: float = 0.5, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        _check(depth >= 10, f"densenet depth must be >= 10, got {depth}")
        _check(growth >= 1, f"densenet growth must be >= 1, got {growth}")
        _check(0.0 < compression <= 1.0, f"densenet compression must be in (0, 1], got {compression}")
        n, c = (depth - 4) // 6, 2 * growth
        self.stem = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        for b in (1, 2, 3):
            layers = []
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            setattr(self, f"block{b}", nn.Sequential(*layers))
            if b < 3:
                out = int(math.floor(c * compression))
                setattr(self, f"trans{b}", _transition(c, out))
                c = out
        self.norm = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trans1(self.block1(self.stem(x)))
        x = self.block3(self.trans2(self.block2(x)))
        return self.fc(self.pool(self.norm(x)))


@MODELS.register("builtin.densenet")
def densenet(depth: int = 100, growth: int = 12, compression: float = 0.5, num_classes: int = 10,
             in_channels: int = 3) -> DenseNet:
    """DenseNet-BC-depth-growth (the Born-Again paper's DenseNet-<depth>-<growth>)."""
    return DenseNet(depth=depth, growth=growth, compression=compression, num_classes=num_classes,
                    in_channels=in_channels)
