"""Refit the cost model of ``ops.masked_damage(method="auto")`` on this machine.

Times both exact paths (``method="fused"`` and ``method="moments"``, BN on batch statistics, no
ReLU) on follower shapes of the benchmarked nets, then fits each path's coefficients
(``_moments._FUSED_S``, ``_moments._MOMENTS_S``) to its measured times by non-negative least
squares on the relative error, over the work counts of ``_moments.fused_terms`` /
``_moments.moments_terms``. Prints both dictionaries (to paste into aofp_ext/_moments.py) and,
for the old and the new coefficients, how often the model picks the faster path and what its
misses cost. ``--out`` writes the table as Markdown.

    python bench/cost_model.py --threads 1 --out bench/results/cost-model.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date

import torch

from _common import cpu_name  # bench/, first on sys.path
from aofp_ext import _moments, ops

# (name, C, O, kernel, map, batch): ResNet-56 stages, VGG (CIFAR), ResNet-50 bottleneck conv2
# (3x3) and conv3 (1x1) followers at 64x64 inputs, MobileNetV2 projections, a LeNet-like
# follower with few outputs (the z route).
SHAPES = (
    ("R56 16@32x32", 16, 16, 3, 32, 64), ("R56 32@16x16", 32, 32, 3, 16, 64),
    ("R56 64@8x8", 64, 64, 3, 8, 64), ("VGG 256@8x8", 256, 256, 3, 8, 64),
    ("VGG 512@4x4", 512, 512, 3, 4, 64), ("R50 3x3 128@8x8", 128, 128, 3, 8, 32),
    ("R50 3x3 256@4x4", 256, 256, 3, 4, 32), ("R50 3x3 512@2x2", 512, 512, 3, 2, 32),
    ("R50 1x1 64->256@16x16", 64, 256, 1, 16, 32), ("R50 1x1 256->1024@4x4", 256, 1024, 1, 4, 32),
    ("MBv2 1x1 576->96@8x8", 576, 96, 1, 8, 64), ("MBv2 1x1 960->320@4x4", 960, 320, 1, 4, 64),
    ("LeNet 5x5 6->16@14x14", 6, 16, 5, 14, 64),
)
KS = (16, 64, 256, 1024)


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(threads: int, repeats: int, budget: float, quiet: bool) -> list[dict]:
    """One row per (shape, K): both paths' times and the work counts. A path whose time at a
    smaller K already exceeded ``budget`` seconds is not timed at larger K for that shape."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, C, O, k, hw, N in SHAPES:
        x = torch.randn(N, C, hw, hw, generator=gen).relu_()
        w = torch.randn(O, C, k, k, generator=gen) / (C * k * k) ** 0.5
        scale, shift = torch.rand(O, generator=gen) + 0.5, torch.randn(O, generator=gen)
        P = N * hw * hw
        lag = _moments.lag_shape(x, w, (1, 1), (k // 2, k // 2), (1, 1))
        slow = set()
        for K in KS:
            masks = torch.rand(K, C, generator=gen) < 0.5
            row = dict(shape=name, K=K, C=C, O=O, T=k * k, P=P, lag=lag)
            for method in ("fused", "moments"):
                if method in slow:
                    continue
                t = best_time(lambda m=method: ops.masked_damage(
                    x, w, masks, padding=k // 2, norm="batch", scale=scale, shift=shift,
                    method=m), repeats)
                row[method] = t
                if t > budget:
                    slow.add(method)
            rows.append(row)
            if not quiet:
                print(f"{name:24s} K={K:5d} fused {row.get('fused', float('nan')):8.3f} s "
                      f"moments {row.get('moments', float('nan')):8.3f} s", flush=True)
    return rows


def nnls_relative(terms: list[dict], times: list[float], fixed: list[float]) -> dict:
    """Non-negative least squares of ``sum_j c_j terms[j] + fixed ~ time``, each row weighted by
    1 / time (relative error): the unconstrained fit, then the negative coefficients dropped
    one at a time (smallest first) and refitted."""
    keys = list(terms[0])
    A = torch.tensor([[r[k] for k in keys] for r in terms], dtype=torch.float64)
    t = torch.tensor(times, dtype=torch.float64)
    f = torch.tensor(fixed, dtype=torch.float64)
    A, b = A / t[:, None], (t - f) / t
    active = [j for j in range(len(keys)) if bool(A[:, j].abs().max() > 0)]
    while True:
        cols = A[:, active]
        scale = cols.abs().max(dim=0).values
        sol = torch.linalg.lstsq(cols / scale, b[:, None]).solution[:, 0] / scale
        if bool((sol >= 0).all()):
            break
        active.pop(int(sol.argmin()))
    out = {k: 0.0 for k in keys}
    for j, v in zip(active, sol.tolist()):
        out[keys[j]] = float(f"{v:.2g}")
    return out


def fit(rows: list[dict], threads: int, build: float | None = None) -> tuple[dict, dict]:
    """Both paths' coefficients; ``build`` holds the moments' seconds per BLAS multiply-add at
    that value (it also decides the routes to the moments, so it should stay a GEMM rate even
    where the other terms could absorb it)."""
    both = [r for r in rows if "fused" in r]
    fused = nnls_relative([_moments.fused_terms(r["C"], r["O"], r["T"], r["P"], r["K"], threads)
                           for r in both], [r["fused"] for r in both], [0.0] * len(both))
    mom = [r for r in rows if "moments" in r]
    mt = [_moments.moments_terms(r["C"], r["O"], r["T"], r["P"], r["K"], True, threads, r["lag"])
          for r in mom]
    fixed = [m[1] + (build * m[0]["build"] if build is not None else 0.0) for m in mt]
    terms = [dict(m[0], build=0.0) if build is not None else m[0] for m in mt]
    moments = nnls_relative(terms, [r["moments"] for r in mom], fixed)
    if build is not None:
        moments["build"] = build
    return fused, moments


def score(rows: list[dict], threads: int) -> tuple[int, int, float]:
    """(right choices, cases, mean extra time over the faster path) of the current model."""
    right = n = 0
    extra = 0.0
    for r in rows:
        if "fused" not in r or "moments" not in r:
            continue
        pick = _moments.choose(r["C"], r["O"], r["T"], r["P"], r["K"], True, threads, r["lag"])
        best = min(r["fused"], r["moments"])
        n += 1
        right += r[pick] == best
        extra += r[pick] / best - 1
    return right, n, extra / max(1, n)


def markdown(rows, threads, old, new, fitted, cmd) -> str:
    lines = [
        "# Cost model of masked_damage(method=\"auto\"): measured times and the refit", "",
        f"- date: {date.today()}",
        f"- machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"Python {platform.python_version()}",
        f"- command: `{cmd}`",
        "- BN on batch statistics, no ReLU, random masks keeping half the channels; best of the "
        "repeats; a path is not timed at larger K once it exceeded the budget", "",
        "| shape | K | fused s | moments s | chosen (refit) |", "|---|---|---|---|---|"]
    for r in rows:
        pick = _moments.choose(r["C"], r["O"], r["T"], r["P"], r["K"], True, threads, r["lag"])
        f, m = (f"{r[k]:.4f}" if k in r else "-" for k in ("fused", "moments"))
        lines.append(f"| {r['shape']} | {r['K']} | {f} | {m} | {pick} |")
    lines += ["", f"- before the refit: {old[0]} of {old[1]} choices right, mean extra time "
              f"{100 * old[2]:.0f} % over the faster path",
              f"- after: {new[0]} of {new[1]}, mean extra time {100 * new[2]:.0f} %",
              f"- fused coefficients: `{fitted[0]}`", f"- moments coefficients: `{fitted[1]}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0,
                   help="seconds: a path slower than this is not timed at larger K")
    p.add_argument("--build", type=float,
                   help="hold the moments' seconds per BLAS multiply-add at this value")
    p.add_argument("--out", help="write the Markdown table here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rows = measure(args.threads, args.repeats, args.budget, args.quiet)
    old = score(rows, args.threads)
    fitted = fit(rows, args.threads, args.build)
    _moments._FUSED_S.update(fitted[0])
    _moments._MOMENTS_S.update(fitted[1])
    new = score(rows, args.threads)
    print(f"_FUSED_S = {fitted[0]}\n_MOMENTS_S = {fitted[1]}")
    print(f"right choices: {old[0]}/{old[1]} before, {new[0]}/{new[1]} after; mean extra time "
          f"{100 * old[2]:.0f} % -> {100 * new[2]:.0f} %")
    if args.out:
        cmd = "python bench/cost_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as fh:
            fh.write(markdown(rows, args.threads, old, new, fitted, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
