"""Kernel microbenchmark: masks priced per second, fused kernels vs the authors' loop.

For each follower shape and number of masks K, in one process, side by side:
- loop: the authors' way, one masked follower forward per mask (conv -> norm -> post, the
  squared difference against the unmasked output), in PyTorch, in whichever memory format
  (NCHW or channels-last) is faster for that shape. Its cost is linear in K, so its rate is
  measured on min(K, --loop-masks) masks.
- masked_damage in each mode (fused: one pass over the K masks, nothing stored per mask);
- gram: channel_gram + quadratic_damage (the exact damage of linear targets).
Every kernel is checked against the loop on the same masks before it is timed; times are medians.

On a GPU (--device cuda) the baseline is the batched loop (--baseline batched): the K masked
follower forwards as one convolution over K copies of the masked input, in chunks that bound its
memory (the faster of a grouped convolution and the copies folded into the batch), in float32
(cuDNN's TF32 off), timed with CUDA events on min(K, --loop-masks) masks; the shapes are
ResNet-56's and ResNet-50's (bottleneck 3x3 and 1x1 followers, batch 32), K = 64, 256, 1024; and
the mask product of each fused op (2 K C O P FLOPs per pass) is reported in TFLOP/s against a
float32 and a TF32 matmul peak measured in the same run (--peak).

    python bench/kernels.py                     # the full table, printed
    python bench/kernels.py --out bench/results/kernels-cpu.md
    python bench/kernels.py --quick             # a small smoke run
    python bench/kernels.py --device cuda --out kernels-h200.md --json kernels-h200.json
    python bench/kernels.py --tiny --baseline batched --peak   # the GPU plan, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _common import cpu_name  # bench/, first on sys.path
from aofp_ext import ops


@dataclass(frozen=True)
class Shape:
    name: str
    N: int
    C: int
    HW: int
    k: int = 3
    O: int | None = None  # follower output channels (default C)

    @property
    def out(self) -> int:
        return self.O if self.O is not None else self.C

    def flops_per_mask(self) -> int:
        """FLOPs of one mask's row of the mask product R Z (2 C O P, P = N * H * W)."""
        return 2 * self.C * self.out * self.N * self.HW * self.HW


RESNET56 = (Shape("R56 16@32x32", 64, 16, 32), Shape("R56 32@16x16", 64, 32, 16),
            Shape("R56 64@8x8", 64, 64, 8))
VGG = (Shape("VGG 256@8x8", 64, 256, 8), Shape("VGG 512@4x4", 64, 512, 4))
# ResNet-50 bottlenecks at batch 32: the followers of conv1 (the 3x3 conv2) and of conv2 (the 1x1
# conv3, 4x wider output), at each stage's resolution.
RESNET50 = tuple(
    sh for w, hw in ((64, 56), (128, 28), (256, 14), (512, 7))
    for sh in (Shape(f"R50 3x3 {w}@{hw}x{hw}", 32, w, hw),
               Shape(f"R50 1x1 {w}->{4 * w}@{hw}x{hw}", 32, w, hw, k=1, O=4 * w)))
TINY = (Shape("R56 tiny 8@8x8", 4, 8, 8), Shape("R50 tiny 3x3 8@6x6", 4, 8, 6),
        Shape("R50 tiny 1x1 8->16@6x6", 4, 8, 6, k=1, O=16))
SHAPE_SETS = {"r56": RESNET56, "vgg": VGG, "r50": RESNET50, "tiny": TINY}
MODES = (("affine", "relu"), ("batch", "none"), ("batch", "relu"))
# passes of the fused mask product per mode (batch+relu: the statistics pass, then the ReLU pass)
PASSES = {"affine+relu": 1, "batch+none": 1, "batch+relu": 2}


@dataclass(frozen=True)
class Config:
    shapes: tuple[Shape, ...] = RESNET56 + VGG
    ks: tuple[int, ...] = (16, 64, 256, 1024)
    repeats: int = 3
    loop_masks: int = 16
    device: str = "cpu"
    baseline: str = "loop"          # "loop" (one forward per mask) or "batched" (chunks of copies)
    chunk_bytes: int = 1 << 30      # the batched loop's working memory per chunk
    check_masks: int = 16           # masks the per-mask loop computes to check every other path


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> float:
    """Median seconds of ``repeats`` calls after a warm-up (CUDA events on a GPU)."""
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if times[-1] > 5.0:  # long runs: one is enough
            break
    return statistics.median(times)


def make_inputs(s: Shape, K: int, device: str, gen: torch.Generator):
    x = torch.randn(s.N, s.C, s.HW, s.HW, generator=gen).relu_().to(device)
    w = (torch.randn(s.out, s.C, s.k, s.k, generator=gen) / (s.C * s.k * s.k) ** 0.5).to(device)
    scale = (torch.rand(s.out, generator=gen) + 0.5).to(device)
    shift = (torch.randn(s.out, generator=gen) * 0.1).to(device)
    # AOFP attempts: each drops g = floor(C / 2) random filters
    drop = torch.rand(K, s.C, generator=gen).argsort(dim=1)[:, : s.C // 2]
    masks = torch.ones(K, s.C, dtype=torch.bool).scatter_(1, drop, False).to(device)
    return x, w, masks, scale, shift


def norm_post(y, scale, shift, norm, post):
    """The follower's norm and post on conv outputs ``(N, O, H, W)``."""
    if norm == "affine":
        y = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    elif norm == "batch":
        y = F.batch_norm(y, None, None, scale, shift, training=True, eps=1e-5)
    return torch.relu(y) if post == "relu" else y


def loop_damage(x, w, masks, scale, shift, norm, post, pad):
    """The authors' way: one follower forward per mask."""

    def f(inp):
        return norm_post(F.conv2d(inp, w, padding=pad), scale, shift, norm, post)

    base = f(x)
    return torch.stack([((f(x * m.view(1, -1, 1, 1)) - base) ** 2).sum()
                        for m in masks.to(x.dtype)])


def batched_damage(x, w, masks, scale, shift, norm, post, pad, chunk_bytes, grouped):
    """The loop of masked forwards, batched: each chunk of k masks is ONE convolution over k
    masked copies of ``x``, either grouped (``(N, k C, H, W)``, groups = k) or folded into the
    batch (``(k N, C, H, W)``, BatchNorm statistics per copy); chunks bound the memory."""
    N, C, O = x.shape[0], x.shape[1], w.shape[0]
    base = norm_post(F.conv2d(x, w, padding=pad), scale, shift, norm, post).flatten(2)
    kc = max(1, min(masks.shape[0], chunk_bytes // (4 * (x.numel() + 4 * base.numel()))))
    if grouped:
        wg, sg, tg = w.repeat(kc, 1, 1, 1), scale.repeat(kc), shift.repeat(kc)
    out = []
    for k0 in range(0, masks.shape[0], kc):
        m = masks[k0:k0 + kc].to(x.dtype)
        k = m.shape[0]
        if grouped:
            xm = (x.unsqueeze(1) * m.view(1, k, C, 1, 1)).flatten(1, 2)
            y = F.conv2d(xm, wg[:k * O], padding=pad, groups=k)
            y = norm_post(y, sg[:k * O], tg[:k * O], norm, post).view(N, k, O, -1)
            out.append((y - base.unsqueeze(1)).square_().sum(dim=(0, 2, 3)))
            continue
        xm = (x.unsqueeze(0) * m.view(k, 1, C, 1, 1)).flatten(0, 1)
        y = F.conv2d(xm, w, padding=pad).view(k, N, O, -1)
        if norm == "batch":
            mean = y.mean(dim=(1, 3), keepdim=True)
            var = y.var(dim=(1, 3), unbiased=False, keepdim=True)
            y = (y - mean) * (torch.rsqrt(var + 1e-5) * scale.view(1, 1, O, 1)) + shift.view(1, 1, O, 1)
        elif norm == "affine":
            y = y * scale.view(1, 1, O, 1) + shift.view(1, 1, O, 1)
        if post == "relu":
            y = torch.relu(y)
        out.append((y - base.unsqueeze(0)).square_().sum(dim=(1, 2, 3)))
    return torch.cat(out)


def batched_rate(cfg, x, w, masks, scale, shift, norm, post, pad, want):
    """Masks/s of the faster batched variant on ``masks``, each checked against ``want`` (the
    per-mask loop's values on the first masks) before it is timed."""
    best, name = float("inf"), ""
    for grouped in (True, False):
        fn = lambda m=masks: batched_damage(x, w, m, scale, shift, norm, post, pad,  # noqa: E731
                                            cfg.chunk_bytes, grouped)
        check(f"batched ({'grouped' if grouped else 'folded'}) {norm}+{post}",
              fn(masks[: len(want)]), want)
        t = median_time(fn, cfg.repeats, cfg.device)
        if t < best:
            best, name = t, "grouped" if grouped else "folded"
    return masks.shape[0] / best, name


def check(name, got, want, rtol=1e-3):
    err = float(((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-12)).max())
    if err > rtol:
        raise AssertionError(f"{name}: relative error {err:.2e} against the loop (> {rtol})")
    return err


@contextlib.contextmanager
def fp32_math(device: str):
    """On a GPU: float32 convolutions and matmuls (no TF32, which would cost the loop three
    decimal digits the fused ops keep), cuDNN's fastest algorithms (benchmark mode)."""
    if device != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def run(cfg: Config, quiet: bool = False, on_row=None) -> list[dict]:
    """The table's rows; ``on_row(rows)`` after each (to save partial results)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    batched = cfg.baseline == "batched"
    modes = MODES + (("affine", "none"),)
    with torch.no_grad(), fp32_math(cfg.device):
        for s in cfg.shapes:
            pad = s.k // 2
            x, w, masks, scale, shift = make_inputs(s, max(cfg.ks), cfg.device, gen)
            sub = masks[: cfg.check_masks if batched else cfg.loop_masks]
            # The loop's cost is linear in K: its rate is measured once per mode, on `sub`, in
            # the faster of the two memory formats, and its values check every fused op. The
            # batched loop's values are checked against the same, and it is timed per K below.
            loop_rate, loop_vals, batched_cache = {}, {}, {}
            for norm, post in modes:
                if batched:
                    loop_vals[(norm, post)] = loop_damage(x, w, sub, scale, shift, norm, post, pad)
                    continue
                best = float("inf")
                for fmt in (torch.contiguous_format, torch.channels_last):
                    xf = x.contiguous(memory_format=fmt)
                    fn = lambda: loop_damage(xf, w, sub, scale, shift, norm, post, pad)  # noqa: E731
                    best = min(best, median_time(fn, cfg.repeats, cfg.device))
                loop_rate[(norm, post)] = len(sub) / best
                loop_vals[(norm, post)] = fn()
            for K in cfg.ks:
                mk = masks[:K]
                row = {"shape": s.name, "K": K, "flops_per_mask": s.flops_per_mask()}
                for norm, post in modes:
                    key = f"{norm}+{post}"
                    want = loop_vals[(norm, post)]
                    if batched:
                        n = min(K, cfg.loop_masks)
                        if (key, n) not in batched_cache:
                            batched_cache[(key, n)] = batched_rate(
                                cfg, x, w, masks[:n], scale, shift, norm, post, pad, want)
                        row[f"loop {key}"], row[f"loop {key} variant"] = batched_cache[(key, n)]
                    else:
                        row[f"loop {key}"] = loop_rate[(norm, post)]
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
                        row[f"tflops {key}"] = (row[f"fused {key}"] * PASSES[key]
                                                * row["flops_per_mask"] / 1e12)
                rows.append(row)
                if not quiet:
                    print(format_row(row), flush=True)
                if on_row is not None:
                    on_row(rows)
    return rows


def measure_peaks(device: str, n: int, repeats: int = 10) -> dict:
    """TFLOP/s of torch.matmul on random n x n float32 matrices, with TF32 off and (on a GPU) on."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = {"n": n, "fp32": None, "tf32": None}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for name in ("fp32", "tf32") if device == "cuda" else ("fp32",):
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            sec = median_time(lambda: torch.matmul(a, b), repeats, device)
            out[name] = 2 * n**3 / sec / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return out


COLUMNS = [(f"fused {n}+{p}", f"loop {n}+{p}") for n, p in MODES] + [("gram", "loop affine+none")]


def header(loop: str = "loop") -> str:
    cells = ["shape", "K"]
    for fused, _ in COLUMNS:
        label = fused.replace("fused ", "")
        cells += [f"{label} masks/s", f"{label} {loop}", f"{label} x"]
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def format_row(r: dict) -> str:
    cells = [r["shape"], str(r["K"])]
    for fused, loop in COLUMNS:
        cells += [f"{r[fused]:,.0f}", f"{r[loop]:,.0f}", f"**{r[fused] / r[loop]:.1f}x**"]
    return "| " + " | ".join(cells) + " |"


def gemm_table(rows: list[dict], peaks: dict) -> str:
    """TFLOP/s of each fused op's mask product (2 K C O P FLOPs per pass, over the whole op's
    time: a lower bound of the product's own rate) and its share of the measured peaks."""
    modes = [f"{n}+{p}" for n, p in MODES]
    cells = ["shape", "K"] + [c for m in modes for c in (f"{m} TFLOP/s", f"{m} % fp32",
                                                         f"{m} % tf32")]
    lines = ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]

    def pct(v, peak):
        return f"{100 * v / peak:.1f} %" if peak else "n/a"
    for r in rows:
        c = [r["shape"], str(r["K"])]
        for m in modes:
            c += [f"{r[f'tflops {m}']:.3f}", pct(r[f"tflops {m}"], peaks.get("fp32")),
                  pct(r[f"tflops {m}"], peaks.get("tf32"))]
        lines.append("| " + " | ".join(c) + " |")
    return "\n".join(lines)


def machine(device: str = "cpu") -> str:
    model = cpu_name()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    gpu = ""
    if device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout
        gpu = (f"GPU {smi.strip() or torch.cuda.get_device_name()} (nvidia-smi: name, driver, "
               f"memory), CUDA {torch.version.cuda}; ")
    return (f"{gpu}{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch "
            f"{torch.__version__}; Python {platform.python_version()}; load average at the end "
            f"{load} (this benchmark alone accounts for about 2; more means other processes shared the cores)")


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_shapes(text: str) -> tuple[Shape, ...]:
    names = text.split(",")
    bad = [n for n in names if n not in SHAPE_SETS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown shape set(s) {bad}; choose from "
                                         f"{sorted(SHAPE_SETS)}")
    return tuple(sh for n in names for sh in SHAPE_SETS[n])


def config_from(args) -> Config:
    gpu = args.device == "cuda"
    if args.quick:
        return Config(shapes=(RESNET56[1], Shape("tiny 8@8x8", 8, 8, 8)), ks=(16, 256), repeats=1,
                      loop_masks=8, device=args.device, baseline=args.baseline or "loop")
    if args.tiny:
        return Config(shapes=TINY, ks=args.ks or (4, 16), repeats=1, loop_masks=8, check_masks=4,
                      device=args.device, baseline=args.baseline or "batched", chunk_bytes=1 << 16)
    return Config(shapes=args.shapes or ((RESNET50 + RESNET56) if gpu else (RESNET56 + VGG)),
                  ks=args.ks or ((64, 256, 1024) if gpu else (16, 64, 256, 1024)),
                  repeats=args.repeats, loop_masks=args.loop_masks or (256 if gpu else 16),
                  device=args.device, baseline=args.baseline or ("batched" if gpu else "loop"),
                  chunk_bytes=(args.chunk_mib or (4096 if gpu else 1024)) << 20)


def baseline_note(cfg: Config) -> str:
    if cfg.baseline == "loop":
        return ("the loop of masked follower forwards (PyTorch, faster of NCHW and channels-last, "
                f"timed on {cfg.loop_masks} masks)")
    return ("the batched loop of masked follower forwards (PyTorch: each chunk of masks is one "
            "convolution over that many masked copies of the input, the faster of a grouped "
            "convolution and the copies folded into the batch, chunks of at most "
            f"{cfg.chunk_bytes / 2**20:g} MiB, float32 with cuDNN's TF32 off, timed on min(K, "
            f"{cfg.loop_masks}) masks; each variant checked against the per-mask loop first)")


def write_markdown(path: str, cfg: Config, rows: list[dict], peaks: dict | None, cmd: str,
                   took: float) -> None:
    with open(path, "w") as f:
        f.write("# Kernel benchmark: masks priced per second\n\n")
        f.write(f"- date: {datetime.date.today().isoformat()}\n")
        f.write(f"- machine: {machine(cfg.device)}\n")
        f.write(f"- command: `{cmd}` ({took:.0f} s)\n")
        f.write(f"- columns: masks/s of the fused op, of {baseline_note(cfg)}, and their ratio. "
                "Each mask drops floor(C/2) "
                "random filters (an AOFP attempt). Modes: affine+relu (BN folded, ReLU), "
                "batch+none (BN on batch statistics, ResNet block), batch+relu (VGG in "
                "training mode); gram = channel_gram + quadratic_damage, the exact "
                "damage at a linear (affine+none) follower, against that loop.\n\n")
        f.write(header("batched" if cfg.baseline == "batched" else "loop") + "\n")
        for r in rows:
            f.write(format_row(r) + "\n")
        if peaks is not None:
            f.write(f"\n## The mask product against the matmul peak\n\n- peak: torch.matmul of "
                    f"random {peaks['n']} x {peaks['n']} float32 matrices in this run: "
                    f"{peaks['fp32']:.2f} TFLOP/s with TF32 off"
                    + (f", {peaks['tf32']:.2f} TFLOP/s with TF32 on" if peaks["tf32"] else "")
                    + ".\n- TFLOP/s: 2 K C O P FLOPs per pass of the mask product (P = N H W; "
                    "batch+relu makes 2 passes) over the whole fused op's time, so a lower bound "
                    "of the product's own rate (Z costs taps/K of it).\n\n")
            f.write(gemm_table(rows, peaks) + "\n")


# --------------------------------------------------------------------------------------------
# The moments path (post="none" followers; batch + relu: the statistics from the moments, then
# one ReLU pass): ops.masked_damage's automatic choice against the fused mask pass and the loop,
# at large K. Separate from the table above (--moments).
# --------------------------------------------------------------------------------------------

MOMENT_MODES = (("batch", "none"), ("affine", "none"), ("batch", "relu"))


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
                    # the decision ops.masked_damage(method="auto") makes (the lag route of a
                    # stride-1 follower included)
                    lag = _moments.lag_shape(x, w, (1, 1), (pad, pad), (1, 1))
                    use = _moments.choose(s.C, s.out, s.k * s.k, P, K, norm == "batch",
                                          lag=lag, relu=post == "relu") == "moments"
                    use = use and (post == "none" or cfg.device == "cpu")   # CPU only for relu
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
    # that section alone, where it is a heading of its own (not "### The moments path ..."
    # under another section); the rest of the file is kept on both sides
    lines_old = old.split("\n")
    at = next((i for i, ln in enumerate(lines_old) if ln.strip() == marker), None)
    if at is None:
        head, tail = old.rstrip() + "\n\n", ""
    else:
        end = next((i for i in range(at + 1, len(lines_old))
                    if lines_old[i].startswith("## ")), len(lines_old))
        head = "\n".join(lines_old[:at]).rstrip() + "\n\n"
        tail = "\n".join(lines_old[end:])
        tail = "\n" + tail if tail else ""
    lines = [
        marker, "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}; load average at the start {load0}",
        f"- command: `{cmd}` ({took:.0f} s)",
        "- columns: masks/s of `ops.masked_damage` (method auto: the path its cost model "
        "chooses), of the fused mask pass (method=\"fused\"), of the loop of masked follower "
        "forwards, and the ratios to the loop. post=\"none\" followers (the moments path "
        "prices those) and batch+relu (the moments give every mask's BN statistics, one fused "
        "ReLU pass prices them: `ops.masked_relu_damage`); each mask drops floor(C/2) random "
        "filters; every figure was checked against the loop on the same masks (relative error <= 1e-3) before timing.",
        "", moments_header()] + [format_moments_row(r) for r in rows]
    with open(path, "w") as f:
        f.write(head + "\n".join(lines) + "\n" + tail)


def moments_main(args, argv) -> int:
    """``--moments``: only the moments-path rows; with --out, that section of the file."""
    if args.quick:
        cfg = Config(shapes=(RESNET56[2], Shape("tiny 8@8x8", 8, 8, 8)), ks=(64,), repeats=1,
                     loop_masks=8, device=args.device)
    else:
        cfg = Config(shapes=args.shapes or Config.shapes, ks=args.ks or (1024,), repeats=args.repeats,
                     loop_masks=args.loop_masks or 16, device=args.device)
    load0 = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(moments_header())
    t0 = time.perf_counter()
    rows = run_moments(cfg)
    if args.out:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        write_moments(args.out, rows, cmd, time.perf_counter() - t0, load0)
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="two small shapes, K in {16, 256}")
    p.add_argument("--tiny", action="store_true",
                   help="three tiny shapes, K in {4, 16}, one repeat (a dry run of the GPU plan)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-masks", type=int, default=None,
                   help="masks the loop is timed on (its cost is linear in K; default 16, on a "
                   "GPU 256)")
    p.add_argument("--baseline", choices=["loop", "batched"], default=None,
                   help="loop: one masked forward per mask (default on the CPU); batched: chunks "
                   "of masked copies in one convolution (default on a GPU)")
    p.add_argument("--shapes", type=parse_shapes, default=None, metavar="SET[,SET]",
                   help=f"shape sets {sorted(SHAPE_SETS)} (default r56,vgg; on a GPU r50,r56)")
    p.add_argument("--ks", type=parse_ints, default=None, metavar="K[,K]",
                   help="numbers of masks (default 16,64,256,1024; on a GPU 64,256,1024)")
    p.add_argument("--chunk-mib", type=int, default=None,
                   help="the batched loop's working memory per chunk (default 1024 MiB, on a GPU "
                   "4096)")
    p.add_argument("--peak", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the float32 (and TF32) matmul peak and report the mask "
                   "product's TFLOP/s (default: on a GPU only)")
    p.add_argument("--out", help="write the Markdown table to this file")
    p.add_argument("--json", help="write the rows, peaks and settings as JSON to this file")
    p.add_argument("--moments", action="store_true",
                   help="only the moments-path rows (post=none modes, K = 1024 unless --ks); "
                        "with --out, replaces that section of the file and keeps the rest")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.moments:
        return moments_main(args, argv)
    cfg = config_from(args)
    want_peak = args.peak if args.peak is not None else args.device == "cuda"
    t0 = time.perf_counter()
    peaks = None
    if want_peak:  # first, so that partial results (a stopped run) carry it
        n = 128 if args.tiny else (8192 if args.device == "cuda" else 2048)
        peaks = measure_peaks(args.device, n, repeats=2 if args.tiny else 10)
        print(f"matmul peak ({n} x {n}): fp32 {peaks['fp32']:.2f} TFLOP/s"
              + (f", tf32 {peaks['tf32']:.2f} TFLOP/s" if peaks["tf32"] else ""))
    cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))

    def save(rows: list[dict], done: bool) -> None:
        took = time.perf_counter() - t0
        if args.out:
            write_markdown(args.out, cfg, rows, peaks, cmd if done else cmd + " [stopped early: "
                           "partial results]", took)
        if args.json:
            meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": machine(cfg.device), "command": cmd, "seconds": took,
                    "complete": done, "device": cfg.device, "baseline": cfg.baseline,
                    "loop_masks": cfg.loop_masks, "repeats": cfg.repeats,
                    "chunk_bytes": cfg.chunk_bytes}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "peaks": peaks, "passes": PASSES, "rows": rows}, f,
                          indent=1)

    print(header("batched" if cfg.baseline == "batched" else "loop"))
    partial = (lambda rows: save(rows, False)) if (args.out or args.json) else None
    rows = run(cfg, on_row=partial)
    if peaks is not None:
        print("\n" + gemm_table(rows, peaks))
    save(rows, True)
    for path in (args.out, args.json):
        if path:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
