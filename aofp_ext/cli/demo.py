"""``aofp demo``: LeNet-5-BN on the shipped MNIST, trained for one short epoch (unless
``--weights``), pruned with AOFP to <= 50 % of its MACs and finetuned briefly; ``--pricing`` runs
the kernel pricing demo (:mod:`.pricing_demo`) instead."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["demo"]


def demo(args: argparse.Namespace) -> int:
    """LeNet-5-BN on the shipped MNIST: (train one short epoch,) prune to <= 50 % MACs,
    finetune briefly; accuracy before and after, MACs, widths, time."""
    if args.pricing:
        from .pricing_demo import pricing_demo

        return pricing_demo(args)
    from torch.utils.data import DataLoader, Subset

    from ..data import default_data_dir, mnist
    from ..models import lenet5_bn
    from ..pruner import accuracy, prune
    from .build import load_weights
    from .commands import print_summary

    t_start = time.perf_counter()
    root = (Path(args.data_dir) if args.data_dir else default_data_dir()) / "mnist"
    try:
        train_all, test_all = mnist(root, "train"), mnist(root, "test")
    except FileNotFoundError as exc:
        print(f"aofp demo: {exc}; pass --data-dir (or set AOFP_DATA_DIR) to the folder that "
              "holds mnist/", file=sys.stderr)
        return 2
    n_train, n_test = (2048, 2000) if args.quick else (12800, len(test_all))
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train = Subset(train_all, torch.randperm(len(train_all), generator=g)[:n_train].tolist())
    loader = DataLoader(train, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    test = DataLoader(Subset(test_all, range(n_test)), batch_size=1000)
    evaluate = accuracy(test)
    model = lenet5_bn()
    print(f"aofp demo: LeNet-5-BN on the shipped MNIST ({n_train:,} training images, "
          f"{n_test:,} test images), torch threads {torch.get_num_threads()}")
    if args.weights:
        load_weights(model, args.weights)
        print(f"  weights: {args.weights}")
    else:
        _train_one_epoch(model, loader)
    masks = args.masks_per_step
    iph = max(1, -(-400 // masks))  # the authors' LeNet-5 setting: 400 steps per half at K=1
    print(f"  AOFP: {masks} masks per step, {iph} steps per half (the authors' 400 at one mask "
          f"per step), thresh 0.05, target <= 50 % of the MACs")
    result = prune(model, loader, example_inputs=torch.zeros(1, 1, 28, 28), target_flops=0.5,
                   masks_per_step=masks, thresh=0.05, iters_per_half=iph,
                   finetune_epochs=1, finetune_lr=0.01, eval_fn=evaluate, seed=args.seed,
                   progress=not args.no_progress and sys.stderr.isatty(), out_dir=args.out)
    print_summary(result.report)
    print(f"  total {time.perf_counter() - t_start:.1f} s")
    if args.out:
        print(f"  wrote {args.out}/model.pt, report.md, report.json")
    ok = result.report["macs_after"] <= 0.5 * result.report["macs_before"]
    return 0 if ok else 1


def _train_one_epoch(model: torch.nn.Module, loader) -> None:
    """SGD (lr 0.05, momentum 0.9) over ``loader`` once: a starting point worth pruning."""
    t0 = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"  trained one short epoch ({len(loader)} steps of 64) in "
          f"{time.perf_counter() - t0:.1f} s")
