"""Prunability of the model zoo: every torchvision classification model, torchvision's
segmentation models and the timm CNN list of tests/_zoo.py, with random weights and small inputs
(64 x 64 unless a model needs more), written to docs/zoo.md.

One row per model: channel groups, prunable groups, the groups ``aofp_ext.prune`` searches with
``targets="auto"`` and ``targets="all"``, the smallest MACs fraction reachable with
``targets="all"`` (every searched group cut to one channel per producing module) and with every
prunable group cut (grouped-conv groups included: the search skips them), the relative error of a
random cut of every prunable group against ``masked_forward``, the seconds the row took, and the
reasons (shortened, the most frequent first) for the conv groups that are not prunable.

    python bench/zoo.py                       # everything -> docs/zoo.md (long on 2 cores)
    python bench/zoo.py --only resnet18 dpn68 --out /tmp/zoo.md
    python bench/zoo.py --shard 0/2 --json a.json & python bench/zoo.py --shard 1/2 --json b.json
    python bench/zoo.py --render a.json b.json  # two processes, one table

The goals of issue 14: at least 95 % of the torchvision classification models and 90 % of the
timm list with at least half of their MACs reachable (``targets="all"``), every cut exact.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _zoo import (SEGMENTATION, TIMM_MODELS, available, build, cut_matches_preview,  # noqa: E402
                  cut_to_minimum_, example, count_targets, groups_quietly, randomize_norms,
                  torchvision_classification)

EXACT = 1e-4  # the largest relative error a cut may show


@dataclass
class Row:
    source: str
    name: str
    groups: int = 0
    prunable: int = 0
    auto: int = 0
    all: int = 0
    frac_all: float = 1.0
    frac_any: float = 1.0
    err: float = 0.0
    seconds: float = 0.0
    opaque: int = 0
    reasons: str = ""
    error: str = ""

    @property
    def reaches_half(self) -> bool:
        return not self.error and self.frac_all <= 0.5 and self.err <= EXACT


def _short(reason: str) -> str:
    first = reason.split("; ")[0]
    return first if len(first) <= 110 else first[:107] + "..."


def _reasons(model: torch.nn.Module, groups) -> str:
    conv = torch.nn.modules.conv._ConvNd
    made = [g for g in groups if not g.prunable and any(
        s.role == "out" and isinstance(model.get_submodule(s.module), conv) for s in g.producers)]
    if not made:  # no conv-made group at all (e.g. convs whose weight the forward computes)
        made = [g for g in groups if not g.prunable and g.reason not in (
            "reaches the model output", "model input 'x'")]
    counts = collections.Counter(_short(g.reason) for g in made if g.reason)
    return "; ".join(f"{n}x {r}" if n > 1 else r for r, n in counts.most_common(2))


def run_one(source: str, name: str) -> Row:
    row, t0 = Row(source, name), time.perf_counter()
    try:
        model = build(source, name)
        randomize_norms(model)
        x = example(source, name)
        groups, opaque = groups_quietly(model, x)
        row.groups, row.prunable = len(groups), sum(g.prunable for g in groups)
        row.auto, row.all = (count_targets(model, groups, t) for t in ("auto", "all"))
        row.opaque, row.reasons = len(opaque), _reasons(model, groups)
        if row.prunable:
            check = cut_matches_preview(model, x, groups)
            row.err = check.rel_err
            row.frac_all = cut_to_minimum_(model, x, "all") / check.macs_before
            row.frac_any = cut_to_minimum_(model, x, "prunable") / check.macs_before
    except Exception as exc:  # a row that says what went wrong, never a stopped run
        row.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    row.seconds = time.perf_counter() - t0
    gc.collect()
    return row


#: The biggest torchvision models run last (a run cut short still covers the others).
HEAVY = ("_b5", "_b6", "_b7", "_v2_m", "_v2_l", "16gf", "32gf", "128gf", "vit_l", "vit_h",
         "densenet161", "densenet169", "densenet201", "convnext_base", "convnext_large",
         "resnet152", "101", "swin_b", "swin_v2_b", "maxvit")


def _cases(only: list[str] | None) -> list[tuple[str, str]]:
    cases = []
    if available("torchvision"):
        cases += [("torchvision", n) for n in torchvision_classification()]
        cases += [("segmentation", n) for n in SEGMENTATION]
    if available("timm"):
        cases += [("timm", n) for n in TIMM_MODELS]
    cases = [c for c in cases if not only or c[1] in only]
    return sorted(cases, key=lambda c: any(h in c[1] for h in HEAVY))  # stable


def _summary(rows: list[Row], source: str, goal: float) -> str:
    mine = [r for r in rows if r.source == source]
    if not mine:
        return f"| {source} | 0 | | | | |"
    ok = [r for r in mine if r.reaches_half]
    some = [r for r in mine if r.prunable and not r.error]
    exact = all(r.err <= EXACT for r in mine)
    pct = 100 * len(ok) / len(mine)
    met = "met" if pct >= 100 * goal and exact else "not met"
    return (f"| {source} | {len(mine)} | {len(some)} | {len(ok)} ({pct:.0f} %) | "
            f"{100 * goal:.0f} % | {'yes' if exact else 'NO'} | {met} |")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("torchvision", "timm")
                         if available(p))
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {versions}, Python {platform.python_version()}")


def render(rows: list[Row], command: str, seconds: float, loads: tuple[float, float],
           pending: list[tuple[str, str]] = ()) -> str:
    lines = [
        "# Model zoo: which models aofp_ext can prune, and how far",
        "",
        f"Generated by `{command}` on {datetime.date.today()} ({seconds / 60:.0f} min; load "
        f"average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end).",
        f"Machine: {machine()}.",
        "",
        *([f"**Partial run**: {len(pending)} models not run yet: "
           + ", ".join(f"{s}:{n}" for s, n in pending) + ".", ""] if pending else []),
        "Random weights (seeded), random BN statistics, eval mode, a batch of one 64 x 64 image "
        "(56 for vit_h_14, 96 for the Inception / Xception nets, 224 for maxvit_t and the Swin "
        "nets, whose windows need it).",
        "Columns: channel groups; prunable groups; groups `aofp_ext.prune` searches with "
        "`targets=\"auto\"` / `\"all\"`; the smallest MACs fraction reachable with "
        "`targets=\"all\"` (every searched group cut to one channel per producing module, and "
        "per part in grouped-conv and `chunk` groups, which the AOFP search searches with equal "
        "counts kept in every part) and with every prunable group cut (the features of flattened "
        "vectors too, e.g. a classifier's hidden Linear, which `targets=\"all\"` does not "
        "search); the relative error of a random cut of "
        "every prunable group against `masked_forward`; seconds for the row; modules made opaque "
        "leaves (torch.fx cannot trace them); why the conv groups that are not prunable are not "
        "(the most frequent reasons, shortened).",
        "",
        "## Summary",
        "",
        "Goal (issue 14): at least half of the MACs reachable with `targets=\"all\"`, every cut "
        "exact (relative error <= 1e-4).",
        "",
        "| models | count | with prunable groups | at least half of MACs reachable | goal | "
        "every cut exact | goal met |",
        "|---|---|---|---|---|---|---|",
        _summary(rows, "torchvision", 0.95),
        _summary(rows, "timm", 0.90),
        _summary(rows, "segmentation", 0.0),
        "",
        "Models that miss (smallest MACs fraction reachable with `targets=\"all\"`; why: in "
        "the table): "
        + ", ".join(f"{r.source}:{r.name} ({r.frac_all:.2f})" for r in rows
                    if not r.reaches_half) + ".",
        "",
        "## Models",
        "",
        "| model | groups | prunable | targets auto / all | min MACs (all) | min MACs "
        "(prunable) | cut error | s | opaque | not prunable because |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.source}:{r.name} | | | | | | | {r.seconds:.0f} | | "
                         f"**error**: {r.error.replace('|', '/')} |")
            continue
        mark = "" if r.reaches_half else " *"
        lines.append(
            f"| {r.source}:{r.name}{mark} | {r.groups} | {r.prunable} | {r.auto} / {r.all} | "
            f"{r.frac_all:.3f} | {r.frac_any:.3f} | {r.err:.1e} | {r.seconds:.0f} | "
            f"{r.opaque or ''} | {r.reasons.replace('|', '/')} |")
    lines += ["", "`*`: less than half of the MACs reachable with `targets=\"all\"`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"))
    ap.add_argument("--only", nargs="*", help="model names to run (default: all)")
    ap.add_argument("--shard", help="I/N: run every N-th model from the I-th (0-based)")
    ap.add_argument("--json", help="also write the rows (and the models not run yet) here")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="write --out from the --json files of shards instead of running")
    args = ap.parse_args(argv)
    if args.render:
        return _render_shards(args.render, args.out)
    torch.set_grad_enabled(False)
    t0, l0 = time.perf_counter(), os.getloadavg()[0]
    rows: list[Row] = []
    cases = _cases(args.only)
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        cases = cases[i::n]
    command = "python bench/zoo.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    for i, (source, name) in enumerate(cases):
        row = run_one(source, name)
        rows.append(row)
        print(f"{source}:{name}: {row.prunable}/{row.groups} prunable, min MACs (all) "
              f"{row.frac_all:.3f}, err {row.err:.1e}, {row.seconds:.0f} s {row.error}",
              flush=True)
        # written after every model: a run stopped early leaves a table that says so
        seconds, loads = time.perf_counter() - t0, (l0, os.getloadavg()[0])
        if args.json:
            Path(args.json).write_text(json.dumps({
                "rows": [asdict(r) for r in rows], "pending": cases[i + 1:],
                "seconds": seconds, "loads": loads}))
        else:
            Path(args.out).write_text(render(rows, command, seconds, loads, cases[i + 1:]))
    print(f"wrote {args.json or args.out}")


def _render_shards(files: list[str], out: str) -> None:
    shards = [json.loads(Path(f).read_text()) for f in files]
    by_model = {(r["source"], r["name"]): Row(**r) for s in shards for r in s["rows"]}
    rows = list(by_model.values())  # a later file's row replaces an earlier one
    order = {c: i for i, c in enumerate(_cases(None))}
    rows.sort(key=lambda r: order.get((r.source, r.name), len(order)))
    pending = [tuple(c) for s in shards for c in s["pending"] if tuple(c) not in by_model]
    seconds = max(s["seconds"] for s in shards)
    loads = (max(s["loads"][0] for s in shards), max(s["loads"][1] for s in shards))
    names = " ".join(Path(f).name for f in files)
    command = (f"python bench/zoo.py --json {names}, then --render {names}" if len(files) == 1
               else f"python bench/zoo.py --shard I/N --json F (in parallel), then --render {names}")
    Path(out).write_text(render(rows, command, seconds, loads, pending))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
