"""MobileNet v1 (Howard et al. 2017), the DML paper's compact student; InceptionV1 as torchvision's GoogLeNet.

MobileNet v1 is a 3x3 convolution followed by 13 depthwise-separable blocks (depthwise 3x3 + pointwise
1x1, each with batch norm and ReLU), global average pooling and a fully connected classifier. The
blocks are grouped by output resolution into named stages so specs can cut it like a ResNet:

    stem    conv 3x3/2 (32) + block 64          1/2 resolution
    layer1  blocks 128/2, 128                   1/4
    layer2  blocks 256/2, 256                   1/8
    layer3  blocks 512/2, 512 x 5               1/16
    layer4  blocks 1024/2, 1024                 1/32
    pool    global average pooling + flatten    (the re-id feature: 1024-d)
    fc      linear classifier

    network net1, net2 = builtin.mobilenet_v1(num_classes=751)
"""

from __future__ import annotations

from torch import Tensor, nn

from xdsl.errors import XdslError

__all__ = ["MobileNetV1", "inception_v1"]

# (output channels, stride) of the 13 depthwise-separable blocks, grouped by stage
_STAGES: dict[str, list[tuple[int, int]]] = {
    "stem": [(64, 1)],
    "layer1": [(128, 2), (128, 1)],
    "layer2": [(256, 2), (256, 1)],
    "layer3": [(512, 2)] + [(512, 1)] * 5,
    "layer4": [(1024, 2), (1024, 1)],
}


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (one filter per channel) then pointwise 1x1: MobileNet's factorised convolution."""
    return nn.Sequential(*_conv_bn_relu(cin, cin, 3, stride, groups=cin), *_conv_bn_relu(cin, cout, 1, 1))


class MobileNetV1(nn.Module):
    """MobileNet v1 with a width multiplier (`width=0.5` halves every layer's channels)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise XdslError(f"{key} must be a positive integer, got {value!r}")
        if not width > 0:
            raise XdslError(f"width must be > 0, got {width!r}")

        def ch(c: int) -> int:
            return max(8, int(c * width))

        cin = ch(32)
        stages: dict[str, nn.Sequential] = {}
        for name, blocks in _STAGES.items():
            layers: list[nn.Module] = _conv_bn_relu(in_channels, cin, 3, 2) if name == "stem" else []
            for cout, stride in blocks:
                layers.append(_separable(cin, ch(cout), stride))
                cin = ch(cout)
            stages[name] = nn.Sequential(*layers)
        self.stem, self.layer1, self.layer2 = stages["stem"], stages["layer1"], stages["layer2"]
        self.layer3, self.layer4 = stages["layer3"], stages["layer4"]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))  # (B, 1024, H/32, W/32)
        return self.fc(self.dropout(self.pool(x)))                           # (B, num_classes)


def inception_v1(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    """InceptionV1 (Szegedy et al. 2015) as torchvision's GoogLeNet without its auxiliary heads.

    Auxiliary classifiers change the training output to a tuple, and the DML paper trains and matches the
    main head only; `transform_input` (an ImageNet-weights convenience) is off; weights are initialised
    as torchvision does for a fresh GoogLeNet. The re-id feature is `avgpool` (1024-d).
    """
    from torchvision.models import GoogLeNet

    return GoogLeNet(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=True,
                     dropout=dropout)
