"""VGG-16 for CIFAR as in the AOFP authors' code: 13 conv + BN + ReLU, then 512 -> 512 -> 10."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ConvBNReLU", "VGGCifar", "vgg16_cifar", "VGG16_CIFAR_WIDTHS"]

VGG16_CIFAR_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_POOL_AFTER = (1, 3, 6, 9, 12)  # 2x2 max-pool after these convs (0-based)


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()


class VGGCifar(nn.Module):
    def __init__(self, widths: tuple[int, ...] = VGG16_CIFAR_WIDTHS, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers.append(ConvBNReLU(cin, w))
            if i in _POOL_AFTER:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(cin, 512)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(self.flatten(self.features(x)))))


def vgg16_cifar(num_classes: int = 10) -> VGGCifar:
    """13 conv layers at the authors' CIFAR widths (input 32x32, 1x1 after the 5th pool)."""
    return VGGCifar(VGG16_CIFAR_WIDTHS, num_classes)
