"""A MobileNetV2-style network for 32x32 inputs: inverted residuals with depthwise convs."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["InvertedResidual", "MobileNetV2Cifar", "mobilenet_v2_cifar"]

# (expansion t, output channels c, blocks n, first stride s); strides adapted to CIFAR.
MOBILENET_V2_CIFAR_CFG = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
    (6, 160, 3, 2), (6, 320, 1, 1),
)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """[1x1 expand -> BN -> ReLU6] -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project -> BN (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def _width(c: float, divisor: int = 8) -> int:
    return max(divisor, int(c + divisor / 2) // divisor * divisor)


class MobileNetV2Cifar(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0,
                 cfg: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_CIFAR_CFG):
        super().__init__()
        cin = _width(32 * width_mult)
        self.stem = nn.Sequential(*_conv_bn(3, cin, 3), nn.ReLU6())
        blocks = []
        for t, c, n, s in cfg:
            cout = _width(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        last = _width(1280 * max(1.0, width_mult))
        self.head = nn.Sequential(*_conv_bn(cin, last, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.linear(self.dropout(self.flatten(self.pool(x))))


def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2Cifar:
    """MobileNetV2 (Sandler et al.) with CIFAR strides: 32x32 in, 4x4 before the pool."""
    return MobileNetV2Cifar(num_classes, width_mult)
