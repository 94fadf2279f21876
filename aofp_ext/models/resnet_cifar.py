"""The CIFAR ResNet of He et al. with parameter-free "option A" shortcuts.

Module names and shapes match the pretrained weights in ``shared/data/weights`` (public repo
akamaster/pytorch_resnet_cifar10), so :func:`aofp_ext.models.load_pretrained` loads them as they are.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "ResNetCifar", "resnet_cifar", "resnet20", "resnet56"]


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad ``pad`` channels on each side (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """conv3x3(16) -> BN -> ReLU -> 3 stages of ``n`` blocks (16, 32, 64) -> avg pool -> Linear."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


def resnet_cifar(depth: int, num_classes: int = 10) -> ResNetCifar:
    """The CIFAR ResNet of ``depth`` = 6n + 2 layers (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet_cifar: depth must be 6n + 2 with n >= 1, got {depth}")
    return ResNetCifar((depth - 2) // 6, num_classes)


def resnet20(num_classes: int = 10) -> ResNetCifar:
    return resnet_cifar(20, num_classes)


def resnet56(num_classes: int = 10) -> ResNetCifar:
    return resnet_cifar(56, num_classes)
