"""The ``aofp`` command line: ``aofp prune | eval | demo | bench | info``."""

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


def pricing_demo(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------

ARCHS = ("lenet5", "resnet20", "resnet56", "vgg16", "mobilenetv2")
_DATASET_FOLDERS = {"mnist": "mnist", "cifar10": "cifar10-subset/cifar-10-batches-py"}


def build_model(arch: str) -> torch.nn.Module:
    from . import models

    return {"lenet5": models.lenet5_bn, "resnet20": models.resnet20,
            "resnet56": models.resnet56, "vgg16": models.vgg16_cifar,
            "mobilenetv2": models.mobilenet_v2_cifar}[arch]()


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """A model saved by ``aofp_ext.save`` (pruned: keep-sets + state dict), or a plain state
    dict / ``{'state_dict': ...}`` checkpoint of the original architecture."""
    from .checkpoint import load
    from .models import load_pretrained

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"aofp: weights file {path} not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("format") == "aofp_ext.pruned_model":
        return load(model, path)
    return load_pretrained(model, path)


def parse_data(spec: str) -> tuple[str, Path]:
    """``cifar10[:DIR]`` or ``mnist[:DIR]``; DIR defaults to the shipped data."""
    from .data import default_data_dir

    name, _, folder = spec.partition(":")
    if name not in _DATASET_FOLDERS:
        raise argparse.ArgumentTypeError(f"--data must be cifar10[:DIR] or mnist[:DIR], got "
                                         f"{spec!r}")
    return name, Path(folder) if folder else default_data_dir() / _DATASET_FOLDERS[name]


def load_split(name: str, root: Path, split: str, limit: int | None = None):
    from torch.utils.data import Subset

    from .data import cifar10, mnist

    try:
        ds = (mnist if name == "mnist" else cifar10)(root, split)
    except FileNotFoundError as exc:
        raise SystemExit(f"aofp: {exc}") from None
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    return ds


def example_for(name: str) -> torch.Tensor:
    return torch.zeros(1, 1, 28, 28) if name == "mnist" else torch.zeros(1, 3, 32, 32)


def _loaders(name: str, root: Path, batch: int, train_limit: int | None,
             test_limit: int | None, seed: int):
    """Training and test loaders. Under a process group the training loader reads this rank's
    shard (``DistributedSampler``, shuffled by ``seed`` and the epoch) in batches of
    ``batch // world_size``: ``batch`` is the global batch, as in one process."""
    from torch.utils.data import DataLoader, DistributedSampler

    from . import distributed as ddist

    train = load_split(name, root, "train", train_limit)
    test = load_split(name, root, "test", test_limit)
    world = ddist.world_size()
    if world > 1:
        if batch % world:
            raise SystemExit(f"aofp: --batch-size {batch} (the global batch) must be divisible "
                             f"by the number of processes, {world}")
        sampler = DistributedSampler(train, num_replicas=world, rank=ddist.rank(),
                                     shuffle=True, seed=seed)
        return (DataLoader(train, batch_size=batch // world, sampler=sampler),
                DataLoader(test, batch_size=500))
    return (DataLoader(train, batch_size=batch, shuffle=True,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(test, batch_size=500))


def _print_summary(r: dict) -> None:
    acc = [("before", r["accuracy_before"]), ("after the search", r["accuracy_after_search"]),
           ("after finetuning", r["accuracy_after_finetune"])]
    print(f"\n{r['model']}: {r['steps']} search steps ({r['stop_reason']}), search "
          f"{r['search_seconds']:.1f} s, finetune {r['finetune_seconds']:.1f} s")
    print(f"  MACs   {r['macs_before']:>12,} -> {r['macs_after']:>12,}  "
          f"({r['macs_after'] / r['macs_before']:.1%})")
    print(f"  params {r['params_before']:>12,} -> {r['params_after']:>12,}  "
          f"({r['params_after'] / r['params_before']:.1%})")
    if r["accuracy_before"] is not None:
        print("  accuracy " + ", ".join(f"{k} {v:.2f} %" for k, v in acc if v is not None))
    widths = ", ".join(f"{k} {r['widths_before'][k]}->{v}" for k, v in r["widths_after"].items())
    print(f"  widths: {widths}")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def prune_cmd(args: argparse.Namespace) -> int:
    from . import distributed as ddist

    if args.nproc is not None and ddist.env_world_size() <= 1:
        # --nproc N: this command again, N processes under torchrun on this machine
        return ddist.launch(args.nproc, _without_nproc(list(args.argv)))
    started, args.device = ddist.init_from_env(args.device, args.dist_timeout)
    try:
        return _prune(args)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _prune(args: argparse.Namespace) -> int:
    from . import distributed as ddist
    from .pruner import accuracy, prune

    name, root = args.data
    torch.manual_seed(args.seed)
    model = load_weights(build_model(args.arch), args.weights)
    train, test = _loaders(name, root, args.batch_size, args.train_limit, args.test_limit,
                           args.seed)
    out = Path(args.out)
    result = prune(
        model, train, example_inputs=example_for(name), target_flops=args.target_flops,
        masks_per_step=args.masks_per_step, thresh=args.thresh,
        iters_per_half=args.iters_per_half, warmup_iters=args.warmup_iters, lr=args.lr,
        targets=args.targets, max_steps=args.max_steps, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, eval_fn=accuracy(test), device=args.device,
        seed=args.seed, checkpoint_dir=out / "checkpoint",
        progress=not args.no_progress and sys.stderr.isatty(),
        bn_mode=args.bn_mode, out_dir=out, method=args.method,
        method_options=dict(args.method_option) or None,
        calibration_batches=args.calibration_batches)
    if not ddist.is_main():
        return 0
    _print_summary(result.report)
    print(f"  wrote {out / 'model.pt'} (load with aofp_ext.load or `aofp eval --weights`), "
          f"{out / 'report.md'}, {out / 'report.json'}")
    return 0


def eval_cmd(args: argparse.Namespace) -> int:
    from .flops import count_flops
    from .pruner import accuracy

    name, root = args.data
    model = load_weights(build_model(args.arch), args.weights).to(args.device or "cpu").eval()
    test = load_split(name, root, "test", args.test_limit)
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    acc = accuracy(DataLoader(test, batch_size=args.batch_size))(model)
    macs, params = count_flops(model, example_for(name).to(args.device or "cpu"))
    print(f"{args.arch} ({args.weights}) on {len(test)} {name} test images: accuracy "
          f"{acc:.2f} %, {macs:,} MACs, {params:,} params ({time.perf_counter() - t0:.1f} s)")
    return 0


def demo(args: argparse.Namespace) -> int:
    """LeNet-5-BN on the shipped MNIST: (train one short epoch,) prune to <= 50 % MACs,
    finetune briefly; accuracy before and after, MACs, widths, time."""
    if args.pricing:
        return pricing_demo(args)
    from torch.utils.data import DataLoader, Subset

    from .data import default_data_dir, mnist
    from .models import lenet5_bn
    from .pruner import accuracy, prune

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
    masks = args.masks_per_step
    iph = max(1, -(-400 // masks))  # the authors' LeNet-5 setting: 400 steps per half at K=1
    print(f"  AOFP: {masks} masks per step, {iph} steps per half (the authors' 400 at one mask "
          f"per step), thresh 0.05, target <= 50 % of the MACs")
    result = prune(model, loader, example_inputs=torch.zeros(1, 1, 28, 28), target_flops=0.5,
                   masks_per_step=masks, thresh=0.05, iters_per_half=iph,
                   finetune_epochs=1, finetune_lr=0.01, eval_fn=evaluate, seed=args.seed,
                   progress=not args.no_progress and sys.stderr.isatty(), out_dir=args.out)
    _print_summary(result.report)
    print(f"  total {time.perf_counter() - t_start:.1f} s")
    if args.out:
        print(f"  wrote {args.out}/model.pt, report.md, report.json")
    ok = result.report["macs_after"] <= 0.5 * result.report["macs_before"]
    return 0 if ok else 1


def bench_cmd(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.which}.py"
    if not script.is_file():
        print(f"aofp bench: {script} not found: the benchmarks live in the source tree "
              "(bench/); run from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    argv = list(args.args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = saved
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


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {v}")
    return v


def available_methods() -> list[str]:
    from .criteria import available

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aofp", description="aofp_ext: Approximated Oracle Filter Pruning for PyTorch CNNs")
    sub = p.add_subparsers(dest="command", required=True)

    # prune
    pr = sub.add_parser(
        "prune", help="prune a trained model with AOFP to a MACs target",
        description="Prune a trained model with AOFP until its MACs fall to --target-flops, cut "
        "the channels, optionally finetune; writes model.pt, report.{json,md,png} and a "
        "checkpoint/ folder into --out (re-run the same command to resume).")
    pr.add_argument("--arch", required=True, choices=ARCHS)
    pr.add_argument("--method", default="aofp", choices=available_methods(),
                    help="aofp (the search, default) or a criterion + global ranking "
                    "(docs/methods.md)")
    pr.add_argument("--method-option", action="append", default=[], type=_option,
                    metavar="KEY=VALUE", help="an option of the criterion (repeatable), e.g. "
                    "--method-option keep_prob=0.7; VALUE is read as a Python literal")
    pr.add_argument("--calibration-batches", type=_positive, default=8,
                    help="training batches a criterion reads (default 8; not aofp)")
    pr.add_argument("--weights", required=True, help="trained weights (a state dict, or a "
                    "model saved by aofp_ext.save)")
    pr.add_argument("--data", required=True, type=parse_data, metavar="NAME[:DIR]",
                    help="cifar10[:DIR] or mnist[:DIR] (default DIR: the shipped data)")
    pr.add_argument("--target-flops", type=_fraction, default=0.5,
                    help="stop when MACs <= this fraction of the original (default 0.5)")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    pr.add_argument("--masks-per-step", type=_positive, default=64,
                    help="attempts per layer per step (default 64; the authors: 1)")
    pr.add_argument("--finetune-epochs", type=int, default=0)
    pr.add_argument("--finetune-lr", type=float, default=0.01)
    pr.add_argument("--thresh", type=float, default=0.01, help="default 0.01 (LeNet: 0.05)")
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

    # eval
    ev = sub.add_parser("eval", help="accuracy, MACs and params of a (pruned) model",
                        description="Top-1 accuracy on the test split, MACs and parameters.")
    ev.add_argument("--arch", required=True, choices=ARCHS)
    ev.add_argument("--weights", required=True,
                    help="a state dict, or a pruned model saved by aofp prune (model.pt)")
    ev.add_argument("--data", required=True, type=parse_data, metavar="NAME[:DIR]",
                    help="cifar10[:DIR] or mnist[:DIR]")
    ev.add_argument("--device", default=None)
    ev.add_argument("--batch-size", type=_positive, default=500)
    ev.add_argument("--test-limit", type=_positive, default=None)
    ev.set_defaults(func=eval_cmd)

    # demo
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

    # bench
    b = sub.add_parser(
        "bench", help="run a script of bench/ (source tree): kernels, prune, compare, distributed",
        description="Run a benchmark script of the source tree with the given arguments, e.g. "
        "`aofp bench kernels --quick` or `aofp bench prune --help`.")
    b.add_argument("which", choices=["kernels", "prune", "compare", "distributed"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(func=bench_cmd)

    i = sub.add_parser("info", help="print the build configuration")
    i.set_defaults(func=info)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
