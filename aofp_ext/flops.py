"""MACs and parameter counts."""

from __future__ import annotations

from math import prod

import torch
import torch.nn as nn

from .graph import Inputs, _as_tuple, run_quietly

__all__ = ["count_flops"]


def count_flops(model: nn.Module, example_inputs: Inputs) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``example_inputs``, and the parameter count.

    MACs count the convolutions and Linear layers only (``nn.Conv1d/2d/3d``, ``nn.Linear``; no
    bias, BN or activation terms): the convention of the AOFP authors and of Torch-Pruning. They
    scale with the batch size of ``example_inputs``: pass a batch of one for per-image MACs.
    ``params`` counts every parameter of ``model`` (BN included). The forward pass runs on fake
    tensors in eval mode: no compute (unless an op needs real data), and the model (BN statistics
    included) is not changed.
    """
    macs = 0

    def conv(m: nn.modules.conv._ConvNd, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * (m.in_channels // m.groups) * prod(m.kernel_size)

    def linear(m: nn.Linear, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * m.in_features

    def forward(*inputs: torch.Tensor) -> None:
        nonlocal macs
        macs = 0  # a failed attempt on fake tensors may have counted some layers
        model(*inputs)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
    try:
        run_quietly(model, forward, _as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return int(macs), int(params)
