"""LeNet-5 (Caffe widths 20-50-500) with BatchNorm, for 28x28 MNIST."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["LeNet5BN", "lenet5_bn"]


class LeNet5BN(nn.Module):
    """conv5x5(20) BN ReLU pool -> conv5x5(50) BN ReLU pool -> flatten (800) -> 500 -> ReLU -> 10.

    Each of conv2's 50 channels owns a block of 16 inputs of ``fc1``.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, bias=False)
        self.bn1 = nn.BatchNorm2d(20)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(50)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def lenet5_bn(num_classes: int = 10) -> LeNet5BN:
    return LeNet5BN(num_classes)
