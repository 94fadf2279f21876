"""``aofp demo --pricing``: price filter masks of a pretrained ResNet-56 layer on shipped CIFAR-10
images with the fused kernel (:func:`aofp_ext.ops.masked_damage`) and with the authors' loop of
masked forwards, side by side."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["pricing_demo"]


def _loop_damage(x, conv, bn, masks):
    """The authors' way: one masked follower forward per mask (BN on batch statistics), in
    channels-last layout (PyTorch's faster CPU path for these convolutions)."""
    x = x.contiguous(memory_format=torch.channels_last)

    def f(inp):
        y = conv(inp)
        return F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)

    base = f(x)
    return torch.stack([((f(x * m.view(1, -1, 1, 1)) - base) ** 2).sum()
                        for m in masks.to(x.dtype)]), base


def pricing_demo(args: argparse.Namespace) -> int:
    """Price filter masks of a pretrained ResNet-56 layer on real CIFAR-10 images."""
    from ..data import cifar10, default_data_dir
    from ..models import load_pretrained, resnet56

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    weights = data_dir / "weights" / "resnet56-4bfd9763.th"
    if not weights.is_file():
        print(f"aofp demo: {weights} not found; pass --data-dir (or set AOFP_DATA_DIR) to the "
              "folder that holds weights/ and cifar10-subset/", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = load_pretrained(resnet56(), weights).eval()
    images = cifar10(data_dir / "cifar10-subset", split="test").tensors[0][: args.batch]
    stage, index = args.block
    block = getattr(model, f"layer{stage}")[index]
    x = _follower_input(model, block, images)
    conv, bn = block.conv2, block.bn2
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, norm="batch",
              scale=bn.weight.detach(), shift=bn.bias.detach(), eps=bn.eps, post="none")
    print(f"ResNet-56 layer{stage}[{index}]: target conv1 ({x.shape[1]} filters) -> follower "
          f"conv2 + bn2 (batch statistics, as the authors), {x.shape[0]} CIFAR-10 test images, "
          f"follower input {tuple(x.shape)}")
    with torch.no_grad():
        _single_filters(x, conv, bn, kw)
        _many_attempts(x, conv, bn, kw, args.masks)
    return 0


def _follower_input(model: torch.nn.Module, block: torch.nn.Module,
                    images: torch.Tensor) -> torch.Tensor:
    """The follower's input: relu(bn1(conv1(.))) of the target layer, for ``images``."""
    captured = {}
    handle = block.conv2.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return captured["x"]


def _single_filters(x: torch.Tensor, conv: Any, bn: Any, kw: dict) -> None:
    """Single-filter damage t = ||Y_base - Y_try||^2 / ||Y_base||^2: the exact oracle; the three
    least and most damaging filters, fused kernel and loop side by side."""
    from .. import ops

    one_hot = ~torch.eye(x.shape[1], dtype=torch.bool)
    fused = ops.masked_damage(x, conv.weight, one_hot, **kw)
    loop, base = _loop_damage(x, conv, bn, one_hot)
    norm2 = float((base**2).sum())
    order = torch.argsort(fused)
    print("\nfilter  damage t (fused)  damage t (loop of forwards)")
    picks = list(order[:3]) + list(order[-3:])
    for rank, c in enumerate(picks):
        if rank == 3:
            print("   ...")
        print(f"{int(c):6d}  {float(fused[c]) / norm2:16.4e}  {float(loop[c]) / norm2:27.4e}")
    print(f"least damaging: filter {int(order[0])}; most damaging: filter {int(order[-1])}")


def _many_attempts(x: torch.Tensor, conv: Any, bn: Any, kw: dict, K: int) -> None:
    """``K`` AOFP attempts (drop g = floor(C/2) random filters each), priced both ways, timed."""
    from .. import ops

    C = x.shape[1]
    g = C // 2
    masks = torch.ones(K, C, dtype=torch.bool)
    drop = torch.rand(K, C).argsort(dim=1)[:, :g]
    masks.scatter_(1, drop, False)
    t0 = time.perf_counter()
    fused = ops.masked_damage(x, conv.weight, masks, **kw)
    t_fused = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop, _ = _loop_damage(x, conv, bn, masks)
    t_loop = time.perf_counter() - t0
    rel = float(((fused.double() - loop.double()).abs() / loop.double().abs()).max())
    print(f"\n{K} random attempts of g = {g} filters each:")
    print(f"  fused masked_damage : {t_fused * 1e3:8.1f} ms  ({K / t_fused:9.0f} masks/s)")
    print(f"  loop of forwards    : {t_loop * 1e3:8.1f} ms  ({K / t_loop:9.0f} masks/s)")
    print(f"  speed-up {t_loop / t_fused:.1f}x; largest relative difference {rel:.1e} "
          "(the loop runs in float32 too)")
