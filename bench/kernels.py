"""Kernel microbenchmark: masks priced per second, fused kernels vs the authors' loop.

For each follower shape and number of masks K, in one process, side by side:
- loop: the authors' way, one masked follower forward per mask (conv -> norm -> post, the
  squared difference against the unmasked output), in PyTorch, in whichever memory format
  (NCHW or channels-last) is faster for that shape. Its cost is linear in K, so its rate is
  measured on min(K, --loop-masks) masks.
- masked_damage in each mode (fused: one pass over the K masks, nothing stored per mask);
- gram: channel_gram + quadratic_damage (the exact damage of linear targets).
Every kernel is checked against the loop on the same masks before it is timed; times are medians.

    python bench/kernels.py                     # the full table, printed
    python bench/kernels.py --out bench/results/kernels-cpu.md
    python bench/kernels.py --quick             # a small smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aofp_ext import ops


@dataclass(frozen=True)
class Shape:
    name: str
    N: int
    C: int
    HW: int
    k: int = 3


RESNET56 = (Shape("R56 16@32x32", 64, 16, 32), Shape("R56 32@16x16", 64, 32, 16),
            Shape("R56 64@8x8", 64, 64, 8))
VGG = (Shape("VGG 256@8x8", 64, 256, 8), Shape("VGG 512@4x4", 64, 512, 4))
MODES = (("affine", "relu"), ("batch", "none"), ("batch", "relu"))


@dataclass(frozen=True)
class Config:
    shapes: tuple[Shape, ...] = RESNET56 + VGG
    ks: tuple[int, ...] = (16, 64, 256, 1024)
    repeats: int = 3
    loop_masks: int = 16
    device: str = "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > 5.0:  # long runs: one is enough
            break
    return statistics.median(times)


def make_inputs(s: Shape, K: int, device: str, gen: torch.Generator):
    x = torch.randn(s.N, s.C, s.HW, s.HW, generator=gen).relu_().to(device)
    w = (torch.randn(s.C, s.C, s.k, s.k, generator=gen) / (s.C * s.k * s.k) ** 0.5).to(device)
    scale = (torch.rand(s.C, generator=gen) + 0.5).to(device)
    shift = (torch.randn(s.C, generator=gen) * 0.1).to(device)
    # AOFP attempts: each drops g = floor(C / 2) random filters
    drop = torch.rand(K, s.C, generator=gen).argsort(dim=1)[:, : s.C // 2]
    masks = torch.ones(K, s.C, dtype=torch.bool).scatter_(1, drop, False).to(device)
    return x, w, masks, scale, shift


def loop_damage(x, w, masks, scale, shift, norm, post, pad):
    """The authors' way: one follower forward per mask."""

    def f(inp):
        y = F.conv2d(inp, w, padding=pad)
        if norm == "affine":
            y = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        elif norm == "batch":
            y = F.batch_norm(y, None, None, scale, shift, training=True, eps=1e-5)
        return torch.relu(y) if post == "relu" else y

    base = f(x)
    return torch.stack([((f(x * m.view(1, -1, 1, 1)) - base) ** 2).sum()
                        for m in masks.to(x.dtype)])


def check(name, got, want, rtol=1e-3):
    err = float(((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-12)).max())
    if err > rtol:
        raise AssertionError(f"{name}: relative error {err:.2e} against the loop (> {rtol})")
    return err


def run(cfg: Config, quiet: bool = False) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in cfg.shapes:
            pad = s.k // 2
            x, w, masks, scale, shift = make_inputs(s, max(cfg.ks), cfg.device, gen)
            sub = masks[: cfg.loop_masks]
            # The loop's cost is linear in K: its rate is measured once per mode, on `sub`, in
            # the faster of the two memory formats, and its values check every fused op.
            loop_rate, loop_vals = {}, {}
            for norm, post in MODES + (("affine", "none"),):
                best = float("inf")
                for fmt in (torch.contiguous_format, torch.channels_last):
                    xf = x.contiguous(memory_format=fmt)
                    fn = lambda: loop_damage(xf, w, sub, scale, shift, norm, post, pad)  # noqa: E731
                    best = min(best, median_time(fn, cfg.repeats, cfg.device))
                loop_rate[(norm, post)] = len(sub) / best
                loop_vals[(norm, post)] = fn()
            for K in cfg.ks:
                mk = masks[:K]
                row = {"shape": s.name, "K": K}
                for (norm, post), rate in loop_rate.items():
                    key = f"{norm}+{post}"
                    row[f"loop {key}"] = rate
                    want = loop_vals[(norm, post)]
                    if (norm, post) == ("affine", "none"):
                        def gram(m=mk):
                            return ops.quadratic_damage(
                                ops.channel_gram(x, w, padding=pad, scale=scale), m)
                        check(f"{s.name} gram", gram(sub), want)
                        row["gram"] = K / median_time(gram, cfg.repeats, cfg.device)
                    else:
                        kw = dict(padding=pad, norm=norm, scale=scale, shift=shift, post=post)
                        check(f"{s.name} {key}", ops.masked_damage(x, w, sub, **kw), want)
                        fused = lambda: ops.masked_damage(x, w, mk, **kw)  # noqa: E731
                        row[f"fused {key}"] = K / median_time(fused, cfg.repeats, cfg.device)
                rows.append(row)
                if not quiet:
                    print(format_row(row), flush=True)
    return rows


COLUMNS = [(f"fused {n}+{p}", f"loop {n}+{p}") for n, p in MODES] + [("gram", "loop affine+none")]


def header() -> str:
    cells = ["shape", "K"]
    for fused, loop in COLUMNS:
        label = fused.replace("fused ", "")
        cells += [f"{label} masks/s", f"{label} loop", f"{label} x"]
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def format_row(r: dict) -> str:
    cells = [r["shape"], str(r["K"])]
    for fused, loop in COLUMNS:
        cells += [f"{r[fused]:,.0f}", f"{r[loop]:,.0f}", f"**{r[fused] / r[loop]:.1f}x**"]
    return "| " + " | ".join(cells) + " |"


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:  # pragma: no cover
        model = platform.processor() or "unknown CPU"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch "
            f"{torch.__version__}; Python {platform.python_version()}; load average at the end "
            f"{load} (this benchmark alone accounts for about 2; more means other processes shared the cores)")


# --------------------------------------------------------------------------------------------
# The moments path (post="none" followers): ops.masked_damage's automatic choice against the
# fused tile pass and the loop, at large K. Separate from the table above (--moments).
# --------------------------------------------------------------------------------------------

MOMENT_MODES = (("batch", "none"), ("affine", "none"))


def run_moments(cfg: Config, quiet: bool = False) -> list[dict]:
    from aofp_ext import _moments

    rows = []
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in cfg.shapes:
            pad = s.k // 2
            x, w, masks, scale, shift = make_inputs(s, max(cfg.ks), cfg.device, gen)
            sub = masks[: cfg.loop_masks]
            P = s.N * s.HW * s.HW
            for norm, post in MOMENT_MODES:
                best = float("inf")
                for fmt in (torch.contiguous_format, torch.channels_last):
                    xf = x.contiguous(memory_format=fmt)
                    fn = lambda: loop_damage(xf, w, sub, scale, shift, norm, post, pad)  # noqa: E731
                    best = min(best, median_time(fn, cfg.repeats, cfg.device))
                want = fn()
                kw = dict(padding=pad, norm=norm, scale=scale, shift=shift, post=post)
                for K in cfg.ks:
                    mk = masks[:K]
                    row = {"shape": s.name, "mode": f"{norm}+{post}", "K": K,
                           "loop": len(sub) / best}
                    use = _moments.moments_cost(s.C, s.C, s.k * s.k, P, K, norm == "batch") < \
                        _moments.fused_cost(s.C, s.C, s.k * s.k, P, K)
                    row["chosen"] = "moments" if use else "fused"
                    for method in ("auto", "fused"):
                        if method == "auto" and not use:
                            continue      # the same call as "fused"
                        f = lambda m=method: ops.masked_damage(x, w, mk, method=m, **kw)  # noqa: E731
                        check(f"{s.name} {norm}+{post} {method}",
                              ops.masked_damage(x, w, sub, method=method, **kw), want)
                        row[method] = K / median_time(f, cfg.repeats, cfg.device)
                    row.setdefault("auto", row["fused"])
                    rows.append(row)
                    if not quiet:
                        print(format_moments_row(row), flush=True)
    return rows


def moments_header() -> str:
    cells = ["shape", "mode", "K", "path chosen", "masked_damage masks/s", "fused masks/s",
             "loop masks/s", "chosen / loop", "fused / loop"]
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def format_moments_row(r: dict) -> str:
    return (f"| {r['shape']} | {r['mode']} | {r['K']} | {r['chosen']} | {r['auto']:,.0f} | "
            f"{r['fused']:,.0f} | {r['loop']:,.0f} | **{r['auto'] / r['loop']:.1f}x** | "
            f"{r['fused'] / r['loop']:.1f}x |")


def write_moments(path: str, rows: list[dict], cmd: str, took: float, load0: str) -> None:
    """Replace (or append) the moments section of ``path``, keeping the rest of the file."""
    marker = "## The moments path"
    old = open(path).read() if os.path.exists(path) else "# Kernel benchmark\n"
    head = old.split(marker)[0].rstrip() + "\n\n"
    lines = [
        marker, "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}; load average at the start {load0}",
        f"- command: `{cmd}` ({took:.0f} s)",
        "- columns: masks/s of `ops.masked_damage` (method auto: the path its cost model "
        "chooses), of the fused tile pass (method=\"fused\"), of the loop of masked follower "
        "forwards, and the ratios to the loop. post=\"none\" followers only (the moments path "
        "prices those); each mask drops floor(C/2) random filters; every figure was checked "
        "against the loop on the same masks (relative error <= 1e-3) before timing.",
        "", moments_header()] + [format_moments_row(r) for r in rows]
    with open(path, "w") as f:
        f.write(head + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="two small shapes, K in {16, 256}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-masks", type=int, default=16,
                   help="masks the loop is timed on (its cost is linear in K)")
    p.add_argument("--out", help="write the Markdown table to this file")
    p.add_argument("--moments", action="store_true",
                   help="only the moments-path rows (post=none modes, K = 1024 unless --ks); "
                        "with --out, replaces that section of the file and keeps the rest")
    p.add_argument("--ks", default=None, help="comma-separated K values (with --moments)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cfg = Config(repeats=args.repeats, loop_masks=args.loop_masks, device=args.device)
    if args.quick:
        cfg = Config(shapes=(RESNET56[1], Shape("tiny 8@8x8", 8, 8, 8)), ks=(16, 256), repeats=1,
                     loop_masks=8, device=args.device)
    if args.moments:
        ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else (1024,)
        if args.quick:
            cfg = Config(shapes=(RESNET56[2], Shape("tiny 8@8x8", 8, 8, 8)), ks=(64,),
                         repeats=1, loop_masks=8, device=args.device)
        else:
            cfg = Config(ks=ks, repeats=args.repeats, loop_masks=args.loop_masks,
                         device=args.device)
        load0 = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(moments_header())
        t0 = time.perf_counter()
        rows = run_moments(cfg)
        if args.out:
            cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
            write_moments(args.out, rows, cmd, time.perf_counter() - t0, load0)
            print(f"wrote {args.out}")
        return 0
    print(header())
    t0 = time.perf_counter()
    rows = run(cfg)
    took = time.perf_counter() - t0
    if args.out:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        with open(args.out, "w") as f:
            f.write("# Kernel benchmark: masks priced per second\n\n")
            f.write(f"- date: {datetime.date.today().isoformat()}\n")
            f.write(f"- machine: {machine()}\n")
            f.write(f"- command: `{cmd}` ({took:.0f} s)\n")
            f.write("- columns: masks/s of the fused op, of the loop of masked follower forwards "
                    "(PyTorch, faster of NCHW and channels-last, timed on "
                    f"{cfg.loop_masks} masks), and their ratio. Each mask drops floor(C/2) "
                    "random filters (an AOFP attempt). Modes: affine+relu (BN folded, ReLU), "
                    "batch+none (BN on batch statistics, ResNet block), batch+relu (VGG in "
                    "training mode); gram = channel_gram + quadratic_damage, the exact "
                    "damage at a linear (affine+none) follower, against that loop.\n\n")
            f.write(header() + "\n")
            for r in rows:
                f.write(format_row(r) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
