"""The AOFP search step against a plain training step, side by side in one process.

For each model and number of masks K: the median of a few plain training steps (forward,
backward, SGD step; the optimizer prune() builds) and the median of a few AOFP search steps of
``prune()`` on the same model, batch, threads and device, with every target active from the
first step (``warmup_iters=0``, ``iters_per_half=1``, ``thresh=0``: nothing is ever pruned, so
every step prices every target). With ``iters_per_half=1`` every layer halves its search space
after each step, so the timed steps (the first two steps are not timed: a warm-up step and
the step right after it) draw masks over a quarter, an eighth, ... of each layer; the fused
mask pass's work grows with the channels the masks vary
(the moments path's does not), so ``--full-space`` times steps whose masks vary over every
channel (``iters_per_half`` past the run: the first step's cost, the worst case). The search step is split into its parts by timing wrappers
installed around prune()'s own functions (nothing in aofp_ext is edited): capture (the
consumers' forward hooks: input capture and ``||Y_base||^2``), pricing (``pricing.price`` /
``pricing.price_parts``),
decision (``LayerSearch.draw/record/end_step``), and the rest (forward + backward + optimizer
step). On CUDA each wrapper synchronises the device, which adds a little to the search step.

    python bench/search_step.py [--device cpu|cuda] [--models resnet20,resnet56,...]
        [--masks 16,64,256] [--out FILE.md] [--json FILE.json] [--tiny]

``--tiny``: batch 4 at reduced inputs, one timed step per run: a dry run in seconds.
ResNet-50 / ResNet-152 (torchvision, 64x64, batch 32) are skipped when torchvision is absent.
Weights are random (pricing cost does not depend on them).

OMP_WAIT_POLICY is set to PASSIVE (unless set), as in bench/prune.py: on a CPU shared with other
processes OpenMP's spin-waiting made a batch-4 ResNet-56 training step take 7.4 s instead of
0.15 s here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch is imported

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aofp_ext import models as zoo  # noqa: E402
from aofp_ext import pricing, pruner, search  # noqa: E402
from aofp_ext.pruner import search_loop  # noqa: E402
from _common import cpu_name  # noqa: E402  (bench/, first on sys.path)

ALL_MODELS = ("resnet20", "resnet56", "vgg16", "mobilenetv2", "lenet", "resnet50", "resnet152")


@dataclass(frozen=True)
class Spec:
    name: str
    make: object          # () -> nn.Module
    batch: int
    shape: tuple          # one input sample
    classes: int = 10


def _torchvision(depth: int):
    try:
        import torchvision
    except ImportError:
        return None
    return lambda: getattr(torchvision.models, f"resnet{depth}")(num_classes=100)


def specs(tiny: bool) -> dict[str, Spec]:
    b, hw = (4, 32) if tiny else (64, 32)
    out = {
        "resnet20": Spec("ResNet-20", zoo.resnet20, b, (3, hw, hw)),
        "resnet56": Spec("ResNet-56", zoo.resnet56, b, (3, hw, hw)),
        "vgg16": Spec("VGG-16 (CIFAR)", zoo.vgg16_cifar, b, (3, hw, hw)),
        "mobilenetv2": Spec("MobileNetV2 (CIFAR)", zoo.mobilenet_v2_cifar, b, (3, hw, hw)),
        "lenet": Spec("LeNet-5-BN", zoo.lenet5_bn, b, (1, 28, 28)),
    }
    for depth in (50, 152):
        make = _torchvision(depth)
        if make is not None:
            tb, thw = (2, 32) if tiny else (32, 64)
            out[f"resnet{depth}"] = Spec(f"torchvision ResNet-{depth}", make, tb, (3, thw, thw),
                                         100)
    return out


# --------------------------------------------------------------------------------------------
# Timing wrappers around prune()'s own functions
# --------------------------------------------------------------------------------------------


class Parts:
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.t = {"capture": 0.0, "pricing": 0.0, "decision": 0.0}
        self.depth = 0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, part: str, fn):
        def timed(*a, **k):
            if self.depth:               # nested in another timed part: counted there
                return fn(*a, **k)
            self.sync()
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.t[part] += time.perf_counter() - t0
                self.depth -= 1
        return timed

    def take(self) -> dict[str, float]:
        out, self.t = self.t, {k: 0.0 for k in self.t}
        return out


@contextmanager
def patched(parts: Parts):
    saved = []

    def swap(obj, name, part):
        fn = getattr(obj, name)
        saved.append((obj, name, fn))
        setattr(obj, name, parts.wrap(part, fn))

    swap(pricing.Consumer, "pre_hook", "capture")
    swap(pricing.Consumer, "post_hook", "capture")
    for mod in (pruner, search_loop, pricing):   # every module that imported them by name
        for name in ("price", "price_parts"):
            if hasattr(mod, name):
                swap(mod, name, "pricing")
    for name in ("draw", "record", "end_step"):
        swap(search.LayerSearch, name, "decision")
    try:
        yield
    finally:
        for obj, name, fn in reversed(saved):
            setattr(obj, name, fn)


@contextmanager
def fused_only():
    """ops.masked_damage with the moments path switched off (every call on the fused pass)."""
    from aofp_ext import ops
    saved = ops._path
    ops._path = lambda *a, **k: "fused"
    try:
        yield
    finally:
        ops._path = saved


# --------------------------------------------------------------------------------------------
# The two steps
# --------------------------------------------------------------------------------------------


def batches(spec: Spec, device: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(spec.batch, *spec.shape, generator=g).to(device),
             torch.randint(0, spec.classes, (spec.batch,), generator=g).to(device))
            for _ in range(n)]


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def plain_steps(model: nn.Module, data, device: str, steps: int) -> list[float]:
    opt = pruner._sgd(model, 1e-3) if hasattr(pruner, "_sgd") else torch.optim.SGD(
        model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for i in range(steps + 1):          # the first is a warm-up
        x, y = data[i % len(data)]
        sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())            # as prune() reads the loss each step
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def search_steps(model: nn.Module, data, device: str, steps: int, K: int,
                 full_space: bool = False) -> tuple[list[float], dict[str, float], int]:
    """Times of ``steps`` search steps (after one warm-up step) and the parts' medians."""
    stamps: list[float] = []
    per_step: list[dict[str, float]] = []
    parts = Parts(device)

    def callback(step, info):
        sync(device)
        stamps.append(time.perf_counter())
        per_step.append(parts.take())

    n_targets = 0

    def count(step, info):
        nonlocal n_targets
        n_targets = len(info["widths"])
        callback(step, info)

    with patched(parts):
        pruner.prune(model, data, example_inputs=data[0][0][:1], target_flops=0.9,
                     masks_per_step=K, thresh=0.0,
                     iters_per_half=steps + 3 if full_space else 1, warmup_iters=0,
                     max_steps=steps + 2, device=device, progress=False, callback=count,
                     latency=False)
    times = [b - a for a, b in zip(stamps, stamps[1:])][1:]     # drop the warm-up step
    shares = {k: statistics.median(p[k] for p in per_step[2:]) for k in per_step[0]}
    if not all(p["pricing"] > 0 and p["capture"] > 0 for p in per_step[2:]):
        raise RuntimeError("the timing wrappers missed the pricing or the capture of a search "
                           "step (a module imports them under another name): parts not measured")
    return times, shares, n_targets


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def one_round(base: nn.Module, data, device: str, steps: int, K: int, full_space: bool):
    """(plain step, search step, the search step's parts, targets): medians of one plain run
    and the search run right after it."""
    plain = statistics.median(plain_steps(copy.deepcopy(base), data, device, steps))
    times, parts, n_t = search_steps(copy.deepcopy(base), data, device, steps, K, full_space)
    return plain, statistics.median(times), parts, n_t


def machine(device: str) -> str:
    cpu = cpu_name()
    s = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
         f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
    if device == "cuda":
        s += f"; GPU {torch.cuda.get_device_name()}"
    return s


def loadavg() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def markdown(rows: list[dict], argv: list[str], device: str, load_start: str, wall: float,
             full_space: bool = False) -> str:
    space = ("iters_per_half past the run, so every timed step's masks vary over every channel "
             "of every layer" if full_space else
             "iters_per_half=1, so each layer's search space halves after every step and the "
             "timed steps' masks (after a warm-up step and one more) vary over a quarter of "
             "each layer, then an eighth, and so on, back to the whole layer once its space is "
             "down to 2 or 3 filters")
    lines = [
        "# The AOFP search step against a plain training step",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine(device)}; device {device}",
        f"- load average (1, 5, 15 min): at the start {load_start}; at the end {loadavg()}",
        f"- command: `python bench/search_step.py {' '.join(argv)}` ({wall:.0f} s)",
        "- plain step: forward + backward + SGD step (prune()'s optimizer), timed right before "
        "each row's search steps; search step: one "
        f"step of `prune()` with every target active (thresh=0, warmup_iters=0; {space}); "
        "medians of the timed steps after a warm-up step, side by side in one process, same "
        "model, batch, threads. Parts of the search step (medians): capture = the consumers' "
        "forward hooks, pricing = `pricing.price` for every target, decision = "
        "`LayerSearch.draw/record/end_step`; fwd+bwd = the rest. With `--rounds R` the plain "
        "and the search run alternate R times: the times and parts are medians over the "
        "rounds, the ratio is the median of the rounds' ratios (their range in brackets).",
        "",
        "| model | targets | batch, input | K | plain step | search step | ratio | fwd+bwd | "
        "capture | pricing | decision |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fused = [r for r in rows if "fused_search_s" in r]
    for r in rows:
        s = r["search_s"]
        pct = {k: 100 * r["parts"][k] / s for k in r["parts"]}
        rest = 100 - sum(pct.values())
        spread = (f" ({min(r['ratios']):.2f}-{max(r['ratios']):.2f})"
                  if len(r.get("ratios", ())) > 1 else "")
        lines.append(
            f"| {r['model']} | {r['targets']} | {r['batch']}, {r['input']} | {r['K']} | "
            f"{r['plain_s']:.3f} s | {s:.3f} s | **{r['ratio']:.2f}x**{spread} | {rest:.0f} % | "
            f"{pct['capture']:.0f} % | {pct['pricing']:.0f} % | {pct['decision']:.0f} % |")
    if fused:
        lines += ["", "The same search step with every attempt priced by the fused mask pass "
                  "(`ops.masked_damage(method=\"fused\")`, the moments path off), in the same "
                  "run:", "",
                  "| model | K | search step, moments path on | pricing | search step, fused "
                  "only | pricing | ratio to plain, fused only |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in fused:
            lines.append(f"| {r['model']} | {r['K']} | {r['search_s']:.3f} s | "
                         f"{r['parts']['pricing']:.3f} s | {r['fused_search_s']:.3f} s | "
                         f"{r['fused_pricing_s']:.3f} s | "
                         f"{r['fused_search_s'] / r['plain_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default=",".join(ALL_MODELS),
                   help=f"comma-separated, from {','.join(ALL_MODELS)}")
    p.add_argument("--masks", default="16,64,256", help="comma-separated K values")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write the raw figures here")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a dry run in seconds")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the plain and the search run this many times and report "
                        "the median ratio with its range (a shared machine's load drifts)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's setting); stated in the file")
    p.add_argument("--full-space", action="store_true",
                   help="time steps whose masks vary over every channel of every layer (no "
                        "layer halves its search space during the run): the first step's "
                        "cost, the worst case for the fused mask pass")
    p.add_argument("--compare-fused", action="store_true",
                   help="also time the search step with every attempt priced by the fused "
                        "mask pass (the moments path off): the gain of the moments path")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {','.join(ALL_MODELS)}")
    ks = [int(k) for k in a.masks.split(",") if k.strip()]
    steps = a.steps or (1 if a.tiny else 3)
    table = specs(a.tiny)
    load_start, t_start = loadavg(), time.perf_counter()
    rows = []
    for name in names:
        if name not in table:
            print(f"skip {name}: torchvision is not installed", file=sys.stderr)
            continue
        spec = table[name]
        torch.manual_seed(0)
        base = spec.make().to(a.device)
        data = batches(spec, a.device, 4)
        for K in ks:    # the plain step right before each search run: both see the same load
            rounds = [one_round(base, data, a.device, steps, K, a.full_space)
                      for _ in range(a.rounds)]
            plain = statistics.median(r[0] for r in rounds)
            s = statistics.median(r[1] for r in rounds)
            ratios = [r[1] / r[0] for r in rounds]
            parts = {k: statistics.median(r[2][k] for r in rounds) for k in rounds[0][2]}
            row = dict(model=spec.name, key=name, targets=rounds[0][3], batch=spec.batch,
                       input="x".join(map(str, spec.shape[1:])), K=K, plain_s=plain,
                       search_s=s, ratio=statistics.median(ratios), ratios=ratios,
                       parts=parts, steps=steps, load=loadavg())
            if a.compare_fused:
                with fused_only():
                    ft, fparts, _ = search_steps(copy.deepcopy(base), data, a.device, steps, K,
                                                 a.full_space)
                row["fused_search_s"] = statistics.median(ft)
                row["fused_pricing_s"] = fparts["pricing"]
            rows.append(row)
            print(f"{spec.name:24s} K={K:4d} plain {plain:.3f} s  search {s:.3f} s  "
                  f"ratio {row['ratio']:.2f}x  " + "  ".join(f"{k} {v:.3f}" for k, v in
                                                          parts.items()), flush=True)
    wall = time.perf_counter() - t_start
    md = markdown(rows, argv, a.device, load_start, wall, a.full_space)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(rows=rows, argv=argv, device=a.device,
                                                machine=machine(a.device)), indent=1))
    if not a.out:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
