"""The arguments of ``aofp``: :func:`build_parser` (every command, option and help text) and the
argument types that check values as they are parsed. Each command's function is its parser's
``func`` default; the commands themselves live in :mod:`.commands` and :mod:`.demo`."""

from __future__ import annotations

import argparse
from typing import Any

from .build import ARCHS, parse_data, parse_model_kwargs
from .commands import bench_cmd, eval_cmd, info, prune_cmd
from .demo import demo

__all__ = ["build_parser"]


def _block(text: str) -> tuple[int, int]:
    try:
        stage, index = (int(v) for v in text.split("."))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STAGE.INDEX such as 1.0, got {text!r}")
    if stage not in (1, 2, 3) or not 0 <= index < 9:
        raise argparse.ArgumentTypeError("ResNet-56 has stages 1-3 with blocks 0-8")
    return stage, index


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {v}")
    return v


def available_methods() -> list[str]:
    from ..criteria import available

    return available()


def _option(text: str) -> tuple[str, object]:
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _model_and_data_options(p: argparse.ArgumentParser, command: str) -> None:
    """The options that name the model, its weights and the data (``prune`` and ``eval``)."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="SPEC",
                       help="the model: a built-in name (" + ", ".join(ARCHS) + "), "
                       "timm:NAME (e.g. timm:resnet50d) or PKG.MODULE:FACTORY (e.g. "
                       "torchvision.models:resnet50, my_pkg.nets:build), called with "
                       "--model-kwargs; never downloads weights")
    which.add_argument("--arch", choices=ARCHS, help="a built-in model (same as --model NAME)")
    p.add_argument("--model-kwargs", type=parse_model_kwargs, default={}, metavar="JSON",
                   help="keyword arguments of the model factory, a JSON object, e.g. "
                   "'{\"num_classes\": 10}'")
    p.add_argument("--weights", required=True,
                   help="trained weights: a state dict (plain or {'state_dict': ...}) of the "
                   "architecture, or a model saved by aofp_ext.save / aofp prune (model.pt); "
                   "loaded with weights_only")
    p.add_argument("--data", required=True, type=parse_data, metavar="NAME[:DIR]",
                   help="cifar10[:DIR] or mnist[:DIR] (default DIR: the shipped data), or "
                   "folder:DIR, an image folder with DIR/train and DIR/val (one subfolder per "
                   "class; random-resized crops + flips for training, resize + centre crop for "
                   "val, ImageNet normalisation; needs torchvision)"
                   + (": its val/ split" if command == "eval" else ""))
    p.add_argument("--input-size", type=_positive, default=224,
                   help="folder data: the side of the square input images (default 224)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes (default 0: load in the main process)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aofp", description="aofp_ext: Approximated Oracle Filter Pruning for PyTorch CNNs")
    sub = p.add_subparsers(dest="command", required=True)
    _prune_command(sub)
    _eval_command(sub)
    _demo_command(sub)
    _bench_command(sub)
    i = sub.add_parser("info", help="print the build configuration")
    i.set_defaults(func=info)
    return p


def _prune_command(sub: Any) -> None:
    """``aofp prune``: every option of :func:`aofp_ext.prune` the command exposes."""
    pr = sub.add_parser(
        "prune", help="prune a trained model with AOFP to a MACs target",
        description="Prune a trained model with AOFP until its MACs fall to --target-flops, cut "
        "the channels, optionally finetune; writes model.pt, report.{json,md,png} and a "
        "checkpoint/ folder into --out (re-run the same command to resume).")
    _model_and_data_options(pr, "prune")
    pr.add_argument("--method", default="aofp", choices=available_methods(),
                    help="aofp (the search, default) or a criterion + global ranking "
                    "(docs/methods.md)")
    pr.add_argument("--method-option", action="append", default=[], type=_option,
                    metavar="KEY=VALUE", help="an option of the criterion (repeatable), e.g. "
                    "--method-option keep_prob=0.7; VALUE is read as a Python literal")
    pr.add_argument("--calibration-batches", type=_positive, default=8,
                    help="training batches a criterion reads (default 8; not aofp)")
    pr.add_argument("--target-flops", type=_fraction, default=0.5,
                    help="stop when MACs <= this fraction of the original (default 0.5)")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    pr.add_argument("--masks-per-step", type=_positive, default=64,
                    help="attempts per layer per step (default 64; the authors: 1)")
    pr.add_argument("--finetune-epochs", type=int, default=0)
    pr.add_argument("--finetune-lr", type=float, default=0.01)
    pr.add_argument("--thresh", type=float, default=0.05,
                    help="a half is pruned when its largest average damage is below this "
                         "(default 0.05; the authors: 0.01 for ResNet/VGG, slower to reach "
                         "the target: docs/prune.md)")
    pr.add_argument("--iters-per-half", type=_positive, default=None,
                    help="default ceil(1000 / masks-per-step)")
    pr.add_argument("--warmup-iters", type=int, default=None,
                    help="default ceil(500 / masks-per-step)")
    pr.add_argument("--max-steps", type=_positive, default=None)
    pr.add_argument("--lr", type=float, default=1e-3, help="search lr (default 1e-3)")
    pr.add_argument("--batch-size", type=_positive, default=64,
                    help="training batch (default 64); with several processes the global "
                    "batch, split evenly between them")
    pr.add_argument("--targets", default="auto", choices=["auto", "all"])
    pr.add_argument("--bn-mode", default="batch", choices=["batch", "running"],
                    help="follower BN when pricing: batch statistics (default, the authors) "
                    "or running statistics")
    pr.add_argument("--train-limit", type=_positive, default=None,
                    help="use only the first N training images")
    pr.add_argument("--test-limit", type=_positive, default=None,
                    help="evaluate on the first N test images")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--no-progress", action="store_true",
                    help="no progress bars (there are none when stderr is not a terminal)")
    pr.add_argument("--nproc", type=_positive, default=None, metavar="N",
                    help="run in N processes on this machine (torchrun --standalone "
                    "--nproc_per_node N -m aofp_ext.cli prune ...; several machines: call "
                    "torchrun yourself, see the README); --batch-size stays the global batch")
    pr.add_argument("--dist-timeout", type=float, default=600, metavar="SECONDS",
                    help="under torchrun: how long a collective waits for the other processes "
                    "before failing (default 600)")
    pr.set_defaults(func=prune_cmd)


def _eval_command(sub: Any) -> None:
    """``aofp eval``."""
    ev = sub.add_parser("eval", help="accuracy, MACs and params of a (pruned) model",
                        description="Top-1 accuracy on the test split, MACs and parameters.")
    _model_and_data_options(ev, "eval")
    ev.add_argument("--device", default=None)
    ev.add_argument("--batch-size", type=_positive, default=500)
    ev.add_argument("--test-limit", type=_positive, default=None)
    ev.add_argument("--latency", action="store_true",
                    help="also time inference against the unpruned architecture, side by side "
                    "(median of interleaved forwards at batch 1 and --latency-batch)")
    ev.add_argument("--latency-batch", type=_positive, default=32)
    ev.add_argument("--latency-repeats", type=_positive, default=20)
    ev.set_defaults(func=eval_cmd)


def _demo_command(sub: Any) -> None:
    """``aofp demo`` (and ``--pricing``)."""
    d = sub.add_parser(
        "demo", help="prune LeNet-5-BN on the shipped MNIST to <= 50%% MACs (a few minutes on "
        "a laptop CPU); --pricing: the kernel pricing demo on ResNet-56",
        description="Default: LeNet-5-BN on the shipped MNIST, trained for one short epoch "
        "(unless --weights), pruned with AOFP to <= 50 % of its MACs and finetuned for one "
        "short epoch; prints accuracy before and after, MACs, widths and time. With --pricing: "
        "price filter masks of a pretrained ResNet-56 layer on shipped CIFAR-10 images, fused "
        "kernel vs the loop of masked forwards.")
    d.add_argument("--data-dir", help="folder with mnist/ (and weights/, cifar10-subset/ for "
                   "--pricing); default: $AOFP_DATA_DIR, else ../shared/data")
    d.add_argument("--weights", help="LeNet-5-BN weights to start from (default: train one "
                   "short epoch)")
    d.add_argument("--masks-per-step", type=_positive, default=64)
    d.add_argument("--out", help="write model.pt and report.{json,md,png} here")
    d.add_argument("--quick", action="store_true",
                   help="2,048 training and 2,000 test images (a smoke run)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--pricing", action="store_true",
                   help="the kernel pricing demo on ResNet-56 instead")
    d.add_argument("--block", type=_block, default=(1, 0), metavar="STAGE.INDEX",
                   help="--pricing: which basic block's conv1 -> conv2 pair (default 1.0)")
    d.add_argument("--batch", type=int, default=64, help="--pricing: test images (default 64)")
    d.add_argument("--masks", type=int, default=256,
                   help="--pricing: random attempts to price (default 256)")
    d.set_defaults(func=demo)


def _bench_command(sub: Any) -> None:
    """``aofp bench WHICH ARGS...``."""
    b = sub.add_parser(
        "bench", help="run a script of bench/ (source tree): kernels, prune, compare, distributed",
        description="Run a benchmark script of the source tree with the given arguments, e.g. "
        "`aofp bench kernels --quick` or `aofp bench prune --help`.")
    b.add_argument("which", choices=["kernels", "prune", "compare", "distributed"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(func=bench_cmd)
