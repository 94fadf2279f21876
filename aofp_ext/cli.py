"""The ``aofp`` command line: ``aofp demo`` and ``aofp info``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


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


def demo(args: argparse.Namespace) -> int:
    """Price filter masks of a pretrained ResNet-56 layer on real CIFAR-10 images."""
    from . import ops
    from .data import cifar10, default_data_dir
    from .models import load_pretrained, resnet56

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
    captured = {}
    handle = block.conv2.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    x = captured["x"]  # the follower's input: relu(bn1(conv1(.))) of the target layer
    conv, bn = block.conv2, block.bn2
    C = x.shape[1]
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, norm="batch",
              scale=bn.weight.detach(), shift=bn.bias.detach(), eps=bn.eps, post="none")
    print(f"ResNet-56 layer{stage}[{index}]: target conv1 ({C} filters) -> follower conv2 + bn2 "
          f"(batch statistics, as the authors), {x.shape[0]} CIFAR-10 test images, "
          f"follower input {tuple(x.shape)}")

    with torch.no_grad():
        # 1. Single-filter damage t = ||Y_base - Y_try||^2 / ||Y_base||^2: the exact oracle.
        one_hot = ~torch.eye(C, dtype=torch.bool)
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

        # 2. Many AOFP attempts (drop g = floor(C/2) random filters each), priced both ways.
        K, g = args.masks, C // 2
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
    return 0


def info(args: argparse.Namespace) -> int:
    from . import __version__, build_info

    print(f"aofp_ext {__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for k, v in build_info().items():
        print(f"  {k}: {v}")
    return 0


def _block(text: str) -> tuple[int, int]:
    try:
        stage, index = (int(v) for v in text.split("."))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STAGE.INDEX such as 1.0, got {text!r}")
    if stage not in (1, 2, 3) or not 0 <= index < 9:
        raise argparse.ArgumentTypeError("ResNet-56 has stages 1-3 with blocks 0-8")
    return stage, index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aofp", description="aofp_ext: Approximated Oracle Filter Pruning for PyTorch CNNs")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="price filter masks of a pretrained ResNet-56 layer on "
                       "shipped CIFAR-10 images, fused kernel vs the loop of forwards")
    d.add_argument("--data-dir", help="folder with weights/ and cifar10-subset/ "
                   "(default: $AOFP_DATA_DIR, else ../shared/data)")
    d.add_argument("--block", type=_block, default=(1, 0), metavar="STAGE.INDEX",
                   help="which basic block's conv1 -> conv2 pair to price (default 1.0)")
    d.add_argument("--batch", type=int, default=64, help="test images in the batch (default 64)")
    d.add_argument("--masks", type=int, default=256, help="random attempts to price (default 256)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)
    i = sub.add_parser("info", help="print the build configuration")
    i.set_defaults(func=info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
