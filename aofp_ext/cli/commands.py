"""The commands of ``aofp`` other than ``demo`` (:mod:`.demo`): ``prune``, ``eval``, ``bench``,
``info``. Each takes the parsed arguments (:mod:`.parser`) and returns the exit status."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .build import build_data, build_model

__all__ = ["prune_cmd", "eval_cmd", "bench_cmd", "info", "print_summary"]


def prune_cmd(args: argparse.Namespace) -> int:
    from .. import distributed as ddist

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
    from .. import distributed as ddist
    from ..pruner import accuracy, prune

    torch.manual_seed(args.seed)
    model = build_model(args)
    data = build_data(args)
    out = Path(args.out)
    result = prune(
        model, data.train, example_inputs=data.example, target_flops=args.target_flops,
        masks_per_step=args.masks_per_step, thresh=args.thresh,
        iters_per_half=args.iters_per_half, warmup_iters=args.warmup_iters, lr=args.lr,
        targets=args.targets, max_steps=args.max_steps, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, eval_fn=accuracy(data.test), device=args.device,
        seed=args.seed, checkpoint_dir=out / "checkpoint",
        progress=not args.no_progress and sys.stderr.isatty(),
        bn_mode=args.bn_mode, out_dir=out, method=args.method,
        method_options=dict(args.method_option) or None,
        calibration_batches=args.calibration_batches)
    if not ddist.is_main():
        return 0
    print_summary(result.report)
    print(f"  wrote {out / 'model.pt'} (load with aofp_ext.load or `aofp eval --weights`), "
          f"{out / 'report.md'}, {out / 'report.json'}")
    return 0


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



def eval_cmd(args: argparse.Namespace) -> int:
    from ..flops import count_flops
    from ..pruner import accuracy

    model = build_model(args).to(args.device or "cpu").eval()
    data = build_data(args)
    t0 = time.perf_counter()
    acc = accuracy(data.test)(model)
    macs, params = count_flops(model, data.example.to(args.device or "cpu"))
    print(f"{args.model or args.arch} ({args.weights}) on {data.test_images} {data.name} test images: "
          f"accuracy {acc:.2f} %, {macs:,} MACs, {params:,} params "
          f"({time.perf_counter() - t0:.1f} s)")
    if args.latency:
        print_latency(args, model, next(iter(data.test))[0].to(args.device or "cpu"))
    return 0


def print_latency(args: argparse.Namespace, model: torch.nn.Module, example: torch.Tensor) -> None:
    """``--latency``: this model's inference latency next to its original architecture's (built
    fresh from ``--model``; the weights' values do not change the time), side by side in one run
    (interleaved forwards, medians), at batch 1 and ``--latency-batch``."""
    from ..latency import compare
    from ..models import from_spec

    original = from_spec(args.model or args.arch, args.model_kwargs).to(example.device)
    r = compare(original, model, example, batch=args.latency_batch, repeats=args.latency_repeats)
    where = f"{r['device']}" + (f", {r['threads']} threads" if r["device"] == "cpu" else "")
    print(f"  latency ({where}, {r['timer']}, median of {args.latency_repeats} interleaved "
          "forwards; original = the unpruned architecture):")
    for b, speedup in r["speedup"].items():
        o, p = r["original"][b]["median_s"], r["pruned"][b]["median_s"]
        print(f"    batch {b:>4}: original {o * 1e3:9.3f} ms, this model {p * 1e3:9.3f} ms "
              f"({speedup:.2f}x)")


def bench_cmd(args: argparse.Namespace) -> int:
    import runpy

    root = Path(__file__).resolve().parents[2]  # aofp_ext/cli/commands.py -> the source tree
    script = root / "bench" / f"{args.which}.py"
    if not script.is_file():
        print(f"aofp bench: {script} not found: the benchmarks live in the source tree "
              "(bench/); run from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    argv = list(args.args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    saved = sys.argv, sys.path[:]
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))  # as `python bench/NAME.py` has it
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv, sys.path[:] = saved
    return 0


def info(args: argparse.Namespace) -> int:
    from .. import __version__, build_info

    print(f"aofp_ext {__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for k, v in build_info().items():
        print(f"  {k}: {v}")
    return 0


def print_summary(r: dict) -> None:
    """The report of a run in a few lines."""
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

