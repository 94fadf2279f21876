"""MACs and parameter counts."""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .graph import Inputs, _as_tuple, run_quietly

__all__ = ["count_flops", "forward_macs", "layer_macs"]


def layer_macs(m: nn.Module, out: torch.Tensor) -> int:
    """MACs of one call of a conv or Linear module with output ``out`` (no bias term)."""
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    return out.numel() * (m.in_channels // m.groups) * prod(m.kernel_size)


def forward_macs(model: nn.Module, example_inputs: Inputs,
                 hooks: dict[nn.Module, Callable[..., Any]] | None = None) -> int:
    """MACs of one forward of ``model`` on ``example_inputs`` (fake tensors, eval mode, see
    :func:`count_flops`), with forward ``hooks`` (module -> hook) attached during the pass."""
    macs = 0

    def forward(*inputs: torch.Tensor) -> None:
        nonlocal macs
        # autograd on and the math attention kernel: attention then runs as matrix products
        # that the counter sees (the inference fast path of nn.MultiheadAttention and the fused
        # attention kernels are ops it does not count on every device)
        with FlopCounterMode(display=False) as counter, torch.enable_grad(), \
                sdpa_kernel(SDPBackend.MATH):
            model(*inputs)
        macs = counter.get_total_flops() // 2

    handles = [m.register_forward_hook(h) for m, h in (hooks or {}).items()]
    try:
        run_quietly(model, forward, _as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return int(macs)


def count_flops(model: nn.Module, example_inputs: Inputs) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``example_inputs``, and the parameter count.

    MACs count the convolutions, Linear layers and other matrix products (attention included;
    counted by ``torch.utils.flop_counter``), no bias, BN or activation terms: the convention of
    the AOFP authors and of Torch-Pruning. They scale with the batch size of ``example_inputs``:
    pass a batch of one for per-image MACs. ``params`` counts every parameter of ``model`` (BN
    included). The forward pass runs on fake tensors in eval mode: no compute (unless an op
    needs real data), and the model (BN statistics included) is not changed.
    """
    macs = forward_macs(model, example_inputs)
    params = sum(p.numel() for p in model.parameters())
    return macs, int(params)
