"""End-to-end AOFP benchmark: accuracy, MACs, steps and time of aofp_ext.prune on real data.

(a) LeNet-5-BN on the full shipped MNIST (60,000 / 10,000): a base model trained here, then
    pruned (thresh 0.05, the authors' LeNet setting) to 50 % of its MACs, and as far as the search
    goes (target = the smallest MACs the searched layers allow, so it runs to its step limit),
    each followed by a short finetune.
(b) The shipped ResNet-56 on the shipped CIFAR-10 subset (4,000 train / 1,017 test images):
    the search to 50 % of the MACs with 64 attempts per layer per step and with the authors' one
    attempt per step (priced the authors' way, one masked follower forward per attempt), steps
    and wall time to the target, accuracy right after the search and after a short finetune.
    The K = 1 run is capped (--k1-max-steps; by default 20x the steps K = 64 needed, so a K = 1
    run that has not reached the target at the cap shows the 1/20 goal).

    python bench/prune.py --out bench/results/prune.md        # everything (about an hour)
    python bench/prune.py --part lenet                        # (a) only
    python bench/prune.py --part resnet --k1-max-steps 3000   # (b) with a shorter K = 1 cap
    python bench/prune.py --quick                             # a smoke run of both (minutes)

OMP_WAIT_POLICY is set to PASSIVE (unless set): on a CPU shared with other processes, OpenMP's
default spin-waiting makes every parallel region wait for descheduled threads (measured here:
9 s instead of 0.7 s for one ResNet-56 training step while another job ran).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

import aofp_ext  # noqa: E402
from aofp_ext import pricing, pruner  # noqa: E402
from aofp_ext.data import cifar10, default_data_dir, mnist  # noqa: E402
from aofp_ext.models import lenet5_bn, load_pretrained, resnet56  # noqa: E402
from aofp_ext.search import default_iters_per_half  # noqa: E402
from _common import cpu_name  # noqa: E402  (bench/, first on sys.path)


@dataclass(frozen=True)
class Config:
    lenet_base_epochs: int = 2          # training of the LeNet base model (full MNIST)
    lenet_masks: int = 64
    lenet_finetune_epochs: int = 1      # full MNIST epochs after each cut
    lenet_floor_halves: int = 100       # the "as far as it goes" run: step limit in halves
    lenet_k1_max_steps: int = 40000     # the authors' K = 1 run on LeNet (to the target)
    resnet_masks: int = 64
    # The authors' ResNet-56 thresh is 0.01. Here single-filter damages are 0.01-0.02 in stages
    # 1-2, so at 0.01 most moves prune one filter after ~5 halves and the search crawls (see
    # bench/results/prune.md); 0.05 lets a layer prune 2-4 filters per move.
    resnet_thresh: float = 0.05
    resnet_max_steps: int = 2000        # K = 64 safety limit
    resnet_finetune_epochs: int = 4     # epochs of the 4,000-image subset after the cut
    k1_max_steps: int | None = None     # None: 20x the K = 64 steps, plus one
    k1_budget_minutes: float | None = None  # stop the K = 1 run after this much search time
    train_limit: int | None = None      # --quick: fewer training images
    test_limit: int | None = None
    seed: int = 0


QUICK = Config(lenet_base_epochs=1, lenet_floor_halves=8, lenet_k1_max_steps=600,
               resnet_max_steps=60,
               resnet_finetune_epochs=1, k1_max_steps=40, train_limit=1024, test_limit=500)


def machine() -> str:
    cpu = cpu_name()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def subset(ds, n: int | None):
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


def stderr_pts(acc: float, n: int) -> float:
    p = acc / 100
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


class _OutOfTime(Exception):
    pass


def run_prune(name: str, model, train, test_loader, n_test: int,
              budget_s: float | None = None, **kw) -> dict:
    """One ``aofp_ext.prune`` run as a table row. With ``budget_s`` the search stops after that
    many seconds (of this call) and the row holds what the search had reached (no cut, no
    accuracies); with ``checkpoint_dir`` in ``kw`` a re-run resumes where it stopped."""
    t0, c0, l0 = time.perf_counter(), time.process_time(), load()
    last: dict = {}

    def log(step: int, info: dict) -> None:  # a line every 50 steps when there is no bar
        last.update(info, step=step)
        if step % 50 == 0 and not sys.stderr.isatty():
            print(f"  [{name}] step {step}: MACs {info['macs_fraction']:.3f}, loss "
                  f"{info['loss']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            raise _OutOfTime

    try:
        result = aofp_ext.prune(model, train, eval_fn=aofp_ext.accuracy(test_loader),
                                progress=sys.stderr.isatty(), callback=log, **kw)
    except _OutOfTime:
        return _partial_row(name, model, kw, last, n_test, t0, c0, l0)
    r = result.report
    row = {k: r[k] for k in ("steps", "stop_reason", "macs_before", "macs_after",
                             "macs_fraction", "params_before", "params_after", "search_seconds",
                             "finetune_seconds", "accuracy_before", "accuracy_after_search",
                             "accuracy_after_finetune", "widths_after")}
    row.update(name=name, settings=r["settings"], wall=time.perf_counter() - t0,
               cpu=time.process_time() - c0, load_start=l0, load_end=load(),
               halves=sum(1 for m in r["history"]), moves=r["history"], n_test=n_test,
               pricing=pricing.PRICING)
    print(f"[{name}] steps {row['steps']} ({row['stop_reason']}), MACs "
          f"{row['macs_fraction']:.3f}, search {row['search_seconds']:.0f} s, acc "
          f"{row['accuracy_before']:.2f} -> {row['accuracy_after_search']:.2f} -> "
          f"{row['accuracy_after_finetune']:.2f}", flush=True)
    return row


def _partial_row(name: str, model, kw: dict, last: dict, n_test: int, t0: float, c0: float,
                 l0: float) -> dict:
    """The row of a search stopped by its time budget: steps, MACs and widths it had reached,
    the moves from its last checkpoint."""
    macs_before, params_before = aofp_ext.count_flops(model, kw["example_inputs"])
    moves: list = []
    if kw.get("checkpoint_dir"):
        ckpt = Path(kw["checkpoint_dir"]) / pruner.CHECKPOINT_NAME
        if ckpt.is_file():
            moves = torch.load(ckpt, map_location="cpu", weights_only=True)["history"]
    row = {"steps": last.get("step", 0), "stop_reason": "time budget",
           "macs_before": macs_before, "macs_fraction": last.get("macs_fraction", 1.0),
           "params_before": params_before, "params_after": None,
           "search_seconds": time.perf_counter() - t0, "finetune_seconds": None,
           "accuracy_before": None, "accuracy_after_search": None,
           "accuracy_after_finetune": None, "widths_after": last.get("widths", {}),
           "name": name, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
           "load_start": l0, "load_end": load(), "moves": moves, "halves": len(moves),
           "n_test": n_test, "pricing": pricing.PRICING,
           "settings": {"masks_per_step": kw["masks_per_step"],
                        "iters_per_half": default_iters_per_half(kw["masks_per_step"]),
                        "thresh": kw["thresh"], "finetune_epochs": kw.get("finetune_epochs")}}
    row["macs_after"] = int(round(row["macs_fraction"] * macs_before))
    print(f"[{name}] stopped by its time budget at step {row['steps']}: MACs "
          f"{row['macs_fraction']:.3f} (moves in the last checkpoint: {len(moves)})", flush=True)
    return row


# --------------------------------------------------------------------------------------------
# (a) LeNet-5-BN on MNIST
# --------------------------------------------------------------------------------------------


def lenet_base(loader: DataLoader, epochs: int, seed: int, work: Path
               ) -> tuple[dict, float | None]:
    """The base LeNet-5-BN (SGD momentum 0.9, weight decay 1e-4, lr 0.05 cosine per step) and
    its training seconds, or the copy cached in ``work`` (then None seconds)."""
    path = work / f"lenet5-base-{epochs}ep-{len(loader.dataset)}.pt"
    torch.manual_seed(seed)
    model = lenet5_bn()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.state_dict(), None
    t0 = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    total, i = epochs * len(loader), 0
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * i / total))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            i += 1
    torch.save(model.state_dict(), path)
    return model.state_dict(), time.perf_counter() - t0


def lenet_part(cfg: Config, work: Path) -> dict:
    root = default_data_dir() / "mnist"
    train = subset(mnist(root, "train"), cfg.train_limit)
    test = subset(mnist(root, "test"), cfg.test_limit)
    test_loader = DataLoader(test, batch_size=1000)

    def make_loader() -> DataLoader:  # the same data order for every run
        return DataLoader(train, batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(cfg.seed))

    loader = make_loader()

    base, base_seconds = lenet_base(loader, cfg.lenet_base_epochs, cfg.seed, work)
    model = lenet5_bn()
    model.load_state_dict(base)
    base_acc = aofp_ext.accuracy(test_loader)(model.eval())
    print(f"[lenet] base accuracy {base_acc:.2f} % on {len(test)} test images", flush=True)

    K = cfg.lenet_masks
    iph = math.ceil(400 / K)              # the authors' LeNet-5 setting, 400 at K = 1
    warm = math.ceil(500 / K)
    common = dict(example_inputs=torch.zeros(1, 1, 28, 28), masks_per_step=K, thresh=0.05,
                  iters_per_half=iph, warmup_iters=warm,
                  finetune_epochs=cfg.lenet_finetune_epochs, finetune_lr=0.01, seed=cfg.seed)
    rows = []
    m = lenet5_bn()
    m.load_state_dict(base)
    rows.append(run_prune("LeNet-5-BN, target 50 %", m, make_loader(), test_loader, len(test),
                          target_flops=0.5, **common))
    # the authors' setting on the same model: one attempt per step priced by one masked
    # follower forward, 400 steps per half, 500 warm-up steps; small enough to run to the target
    m = lenet5_bn()
    m.load_state_dict(base)
    pricing.PRICING = "loop"
    try:
        rows.append(run_prune("LeNet-5-BN, target 50 %, K = 1 (authors)", m, make_loader(),
                              test_loader, len(test), target_flops=0.5,
                              **{**common, "masks_per_step": 1, "iters_per_half": 400,
                                 "warmup_iters": 500, "max_steps": cfg.lenet_k1_max_steps}))
    finally:
        pricing.PRICING = "fused"
    # as far as it goes: the target is the floor (one filter per searched layer), so the search
    # runs until its step limit; thresh 0.05 decides where each layer stops shrinking
    m = lenet5_bn()
    m.load_state_dict(base)
    floor = 29_000 / 2_293_000  # conv1 1 filter, conv2 1 filter: 14,400 + 1,600 + 8,000 + 5,000
    rows.append(run_prune("LeNet-5-BN, smallest reached", m, make_loader(), test_loader,
                          len(test),
                          target_flops=math.ceil(floor * 1e4) / 1e4,
                          max_steps=warm + cfg.lenet_floor_halves * iph, **common))
    return {"base_accuracy": base_acc, "base_seconds": base_seconds,
            "base_epochs": cfg.lenet_base_epochs, "n_train": len(train), "n_test": len(test),
            "rows": rows}


# --------------------------------------------------------------------------------------------
# (b) ResNet-56 on the CIFAR-10 subset
# --------------------------------------------------------------------------------------------


def resnet_part(cfg: Config, work: Path, reuse_k64: str | None = None) -> dict:
    root = default_data_dir() / "cifar10-subset" / "cifar-10-batches-py"
    weights = default_data_dir() / "weights" / "resnet56-4bfd9763.th"
    train = subset(cifar10(root, "train"), cfg.train_limit)
    test = subset(cifar10(root, "test"), cfg.test_limit)
    test_loader = DataLoader(test, batch_size=500)

    def fresh():
        return load_pretrained(resnet56(), weights)

    def loader():
        return DataLoader(train, batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(cfg.seed))

    common = dict(example_inputs=torch.zeros(1, 3, 32, 32), target_flops=0.5,
                  thresh=cfg.resnet_thresh,
                  finetune_epochs=cfg.resnet_finetune_epochs, finetune_lr=0.01, seed=cfg.seed)
    rows = []
    pricing.PRICING = "fused"
    if reuse_k64:  # the K = 64 row of an earlier run (same config), to run only K = 1 now
        rows = json.loads(Path(reuse_k64).read_text())[:1]
        print(f"[resnet] K = {cfg.resnet_masks} row reused from {reuse_k64}", flush=True)
    else:
        rows.append(run_prune(f"ResNet-56, K = {cfg.resnet_masks} (extension ops)", fresh(), loader(),
                              test_loader, len(test), masks_per_step=cfg.resnet_masks,
                              max_steps=cfg.resnet_max_steps, **common))
        _dump(work / "prune-results-resnet-k64.json", rows)
    cap = cfg.k1_max_steps if cfg.k1_max_steps is not None else 20 * rows[0]["steps"] + 1
    if cap == 0:
        return {"n_train": len(train), "n_test": len(test), "k1_cap": 0, "rows": rows}
    pricing.PRICING = "loop"   # the authors' way: one masked follower forward per attempt
    try:
        budget = cfg.k1_budget_minutes * 60 if cfg.k1_budget_minutes else None
        rows.append(run_prune("ResNet-56, K = 1 (authors, one forward per attempt)", fresh(),
                              loader(), test_loader, len(test), masks_per_step=1, max_steps=cap,
                              budget_s=budget, checkpoint_dir=work / "resnet-k1-checkpoint",
                              checkpoint_every=50, **common))
    finally:
        pricing.PRICING = "fused"
    return {"n_train": len(train), "n_test": len(test), "k1_cap": cap,
            "k1_budget_minutes": cfg.k1_budget_minutes, "rows": rows}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _num(v, fmt: str = ",") -> str:
    return "-" if v is None else format(v, fmt)


def _acc(v: float | None, n: int) -> str:
    return "-" if v is None else f"{v:.2f} ± {stderr_pts(v, n):.2f}"


def table(rows: list[dict]) -> list[str]:
    out = ["| run | K | iters/half | steps | stop | MACs after | params after | search s "
           "(CPU s) | load | acc. after search | acc. after finetune (s) | widths |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r["settings"]
        widths = ", ".join(str(v) for v in r["widths_after"].values())
        out.append(
            f"| {r['name']} | {s['masks_per_step']} | {s['iters_per_half']} | {r['steps']} | "
            f"{r['stop_reason']} | {r['macs_after']:,} ({r['macs_fraction']:.1%}) | "
            f"{_num(r['params_after'])} | {r['search_seconds']:.0f} ({r['cpu']:.0f} total) | "
            f"{r['load_start']:.1f}-{r['load_end']:.1f} | "
            f"{_acc(r['accuracy_after_search'], r['n_test'])} | "
            f"{_acc(r['accuracy_after_finetune'], r['n_test'])} "
            f"({_num(r['finetune_seconds'], '.0f')}) | {widths} |")
    return out


def markdown(results: dict, argv: list[str]) -> str:
    lines = [
        "# End-to-end AOFP pruning (bench/prune.py)",
        "",
        f"- date: {results['date']}",
        f"- machine: {results['machine']}",
        f"- command: `{results['command']}`",
        *(f"- merged from an earlier run: {m}" for m in results.get("merged", [])),
        f"- config: `{json.dumps(results['config'])}`",
        "- accuracies are top-1 percent ± one standard error of the test-set estimate "
        "(sqrt(p(1-p)/n)); MACs per image (conv + Linear); `load` is the 1-minute load average "
        "at the start and end of the run (the machine is shared; wall times move with it);",
        "  `search s` is the wall time of the search alone, the CPU seconds in brackets cover "
        "the whole run (search, cut, evaluations, finetune).",
        "",
    ]
    if "lenet" in results:
        a = results["lenet"]
        lines += [
            f"## (a) LeNet-5-BN, MNIST ({a['n_train']:,} train / {a['n_test']:,} test), CPU",
            "",
            f"Base model: {a['base_epochs']} epochs of SGD here, accuracy "
            f"{_acc(a['base_accuracy'], a['n_test'])} %, {a['rows'][0]['macs_before']:,} MACs, "
            f"{a['rows'][0]['params_before']:,} params. "
            "Search: thresh 0.05 and the authors' LeNet steps per half scaled to K "
            "(ceil(400 / K)); finetune: full epochs, lr 0.01 cosine.",
            "",
            *table(a["rows"]),
            "",
            *compare(a["rows"][0], a["rows"][1:2]),
            "",
        ]
    if "resnet" in results:
        b = results["resnet"]
        k64, rest = b["rows"][0], b["rows"][1:]
        lines += [
            f"## (b) ResNet-56 (shipped weights), CIFAR-10 subset ({b['n_train']:,} train / "
            f"{b['n_test']:,} test), CPU",
            "",
            f"Base accuracy {_acc(k64['accuracy_before'], b['n_test'])} %, "
            f"{k64['macs_before']:,} MACs. Target 50 % of the MACs, thresh "
            f"{k64['settings']['thresh']}, the 27 first "
            "convs of the blocks, defaults iters_per_half = ceil(1000 / K), warm-up "
            f"ceil(500 / K); finetune {k64['settings']['finetune_epochs']} epochs of the subset, "
            f"lr 0.01 cosine. "
            + (f"The K = 1 run is capped at {b['k1_cap']:,} steps"
               + (f" and {b['k1_budget_minutes']:g} minutes of search" if b.get(
                   "k1_budget_minutes") else "") + "." if b["k1_cap"] else
               "(No K = 1 run.)"),
            "",
            *table(b["rows"]),
            "",
        ]
        lines += compare(k64, rest)
    return "\n".join(lines) + "\n"


def pruned_after(moves: list[dict], halves: int) -> int:
    """Channels pruned by each layer's first ``halves`` decisions."""
    per: dict[str, int] = {}
    total = 0
    for m in moves:
        n = per.get(m["layer"], 0)
        if n < halves:
            total += len(m["pruned"])
        per[m["layer"]] = n + 1
    return total


def decisions(moves: list[dict]) -> int:
    """Decisions completed by every layer (the least of them)."""
    per: dict[str, int] = {}
    for m in moves:
        per[m["layer"]] = per.get(m["layer"], 0) + 1
    return min(per.values()) if per else 0


def compare(fast: dict, slows: list[dict]) -> list[str]:
    """Steps to the target, and channels pruned after the same number of halves per layer."""
    out = []
    K = fast["settings"]["masks_per_step"]
    for r in slows:
        k = r["settings"]["masks_per_step"]
        if fast["stop_reason"] == "target" and r["stop_reason"] == "target":
            out.append(f"- steps to the target: K = {K} {fast['steps']:,}, K = {k} "
                       f"{r['steps']:,}: ratio {fast['steps'] / r['steps']:.4f} "
                       f"(1/{r['steps'] / fast['steps']:.0f}).")
        elif fast["stop_reason"] == "target":
            out.append(f"- K = {k} did not reach the target within {r['steps']:,} steps "
                       f"(stopped by its {r['stop_reason']}; MACs at {r['macs_fraction']:.1%}); "
                       f"K = {K} reached it in "
                       f"{fast['steps']:,} steps, i.e. in less than "
                       f"{fast['steps'] / r['steps']:.4f} (1/{r['steps'] / fast['steps']:.1f}) "
                       f"of the steps K = {k} needs.")
        else:
            out.append(f"- K = {K} did not reach the target within {fast['steps']:,} steps.")
        h = decisions(r["moves"])
        out.append(f"- after {h} decision(s) per layer (every layer's first {h} halves): "
                   f"K = {K} had pruned {pruned_after(fast['moves'], h)} channels, K = {k} "
                   f"{pruned_after(r['moves'], h)}.")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["lenet", "resnet", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--k1-max-steps", type=int, default=None,
                   help="cap of the ResNet-56 K = 1 run (default: 20x the K = 64 steps + 1; "
                   "0: skip it)")
    p.add_argument("--k1-budget-minutes", type=float, default=None,
                   help="stop the ResNet-56 K = 1 search after this many minutes (the row then "
                   "shows the steps and MACs it reached; re-running with the same --work resumes "
                   "it from its checkpoint)")
    p.add_argument("--resnet-thresh", type=float, default=None,
                   help="thresh of the ResNet-56 runs (default 0.05; the authors: 0.01)")
    p.add_argument("--reuse-k64", metavar="JSON",
                   help="take the ResNet-56 K = 64 row from prune-results-resnet-k64.json of an "
                   "earlier run with the same config (run only K = 1)")
    p.add_argument("--merge", nargs="*", metavar="JSON",
                   help="include the parts found in these result files of earlier runs")
    p.add_argument("--work", default=None,
                   help="folder for the base LeNet weights and the JSON results "
                   "(default: a temporary folder)")
    p.add_argument("--out", help="write the Markdown report here")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.k1_max_steps is not None:
        cfg = Config(**{**asdict(cfg), "k1_max_steps": args.k1_max_steps})
    if args.k1_budget_minutes is not None:
        cfg = Config(**{**asdict(cfg), "k1_budget_minutes": args.k1_budget_minutes})
    if args.resnet_thresh is not None:
        cfg = Config(**{**asdict(cfg), "resnet_thresh": args.resnet_thresh})
    if args.work:
        work = Path(args.work)
    else:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="aofp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "machine": machine(), "config": asdict(cfg)}
    for path in args.merge or []:  # parts measured by an earlier run of this script
        earlier = json.loads(Path(path).read_text())
        for part in ("lenet", "resnet"):
            if part in earlier and earlier[part] and args.part not in (part, "all"):
                results[part] = earlier[part]
                results.setdefault("merged", []).append(
                    f"{part}: {earlier['date']}, `{earlier.get('command', '?')}`")
    results["command"] = "python bench/prune.py " + " ".join(argv)
    if args.part in ("lenet", "all"):
        results["lenet"] = lenet_part(cfg, work)
        _dump(work / "prune-results-lenet.json", {**results, "resnet": None})
    if args.part in ("resnet", "all"):
        results["resnet"] = resnet_part(cfg, work, args.reuse_k64)
        if args.reuse_k64:
            results.setdefault("merged", []).append(
                f"the ResNet-56 K = {cfg.resnet_masks} row: {args.reuse_k64} (same config)")
    results = {k: v for k, v in results.items() if v is not None}
    _dump(work / "prune-results.json", results)
    md = markdown(results, argv)
    print("\n" + md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        print(f"wrote {args.out} (raw results: {work / 'prune-results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
