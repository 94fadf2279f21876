"""Every filter-selection method side by side: accuracy, MACs, selection time, agreement with the
exact oracle, and Torch-Pruning 1.6.1 on the same models, data and finetune.

For each model, each MACs target (by default 50 % and 70 % of the MACs removed: target_flops 0.5
and 0.3) and each method of ``aofp_ext.criteria.available()`` (or ``--methods``):

- selection with ``aofp_ext.prune(method=...)`` on the same training loader (same seed, so the
  same ``--calibration-batches`` batches for every criterion), the channels cut, the accuracy on
  the test set right after the cut; AOFP (``method="aofp"``) runs its search (which trains the
  network while it searches) with ``masks_per_step`` at its default, thresh 0.05 and a step guard
  (the table shows the MACs it reached and flags a miss); a criterion that keeps the shared
  ranking (``Criterion.select``) is scored once per model and its scores ranked for each target
  (the same keep-sets as scoring again: same batches, same seed; ``--no-reuse-scores``);
- then the same fixed finetune for every method (SGD momentum 0.9, weight decay 1e-4 on weights,
  lr 0.01 cosine to 0 per step, the same data order and augmentation), and the accuracy again;
- MACs and params after, counted with ``aofp_ext.count_flops`` (conv + Linear MACs per image);
- the selection wall time;
- the Spearman correlation of the criterion's per-filter scores (``report["selection"]
  ["scores"]``) with those of the exact oracle (``--reference``, default ``oracle``) on the same
  batches: the mean over layers of the per-layer correlation, and the global one over the
  per-layer mean-normalised scores (what the shared global ranking sorts).

Side by side, Torch-Pruning 1.6.1 (``pip install --no-deps torch-pruning==1.6.1``, or the
``bench`` extra; optional: without it those rows are skipped with a note) with its magnitude
(L1), BN-scale and Taylor importances and global pruning, (i) restricted to the layers AOFP
searches (``targets="auto"``: the other convs and Linears are TP ``ignored_layers``) and (ii) on
its full dependency graph (every prunable layer, residual-coupled ones included; only the
classifier is ignored). TP's ``pruning_ratio`` (a fraction of channels) is bisected on fresh
copies until our MACs count meets the target. TP 1.6.1 cannot follow ResNet-56's option-A
shortcut (``F.pad`` on the channel dim: its pruned model fails with a shape error), so for (ii)
that shortcut is handed to TP as the exactly equivalent fixed 1x1 stride-2 conv with 0/1 weights
and turned back into a parameter-free channel gather after the cut (no MACs, no params, never
trained), like the original.

Models: (a) LeNet-5-BN on the full shipped MNIST (a base model trained here, the recipe of
bench/prune.py, cached in --work), finetune 1 epoch (938 steps), no augmentation; (b) the
shipped ResNet-56 on the shipped CIFAR-10 subset (4,000 train / 1,017 test), finetune 1 epoch
(63 steps) with random crop 32 (padding 4) + horizontal flip.

Time on 2 idle CPU cores (estimated from smoke runs on the shared machine, by CPU time): about
an hour for everything with 8 registered criteria: ResNet-56 AOFP ~9 min to 50 % and up to
~14 min for 70 % (the 500-step guard), oracle-loss ~8 min (scored once), the other selections
seconds to ~2 min, each ResNet-56 row ~20-30 s of finetune and evaluation, LeNet ~6 min in all.
``--part``, ``--work`` (resume) and ``--merge`` split it into pieces.

    python bench/compare.py --work /tmp/cmp --out bench/results/compare.md   # all (~1 h, idle)
    python bench/compare.py --part resnet --methods l1,aofp --targets 0.5    # a subset
    python bench/compare.py --part lenet --work /tmp/cmp                     # (a) only
    python bench/compare.py --merge /tmp/cmp/compare-lenet.json /tmp/cmp/compare-resnet.json \\
                            --part none --out bench/results/compare.md      # report only
    python bench/compare.py --quick                                          # smoke run (minutes)

Each finished row is saved at once in ``--work``/compare-<part>.json; a run with the same
``--work`` and settings skips the rows found there (an interrupted run loses one row at most).
The Markdown report (``--out``) gets a PNG of accuracy vs MACs next to it (``.png``).

OMP_WAIT_POLICY is set to PASSIVE (unless set), as in bench/prune.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import aofp_ext  # noqa: E402
from aofp_ext.criteria import CRITERIA, Criterion, available, register  # noqa: E402
from aofp_ext.criteria.base import relative  # noqa: E402
from aofp_ext.data import CIFAR10_MEAN, CIFAR10_STD, cifar10, default_data_dir, mnist  # noqa: E402
from aofp_ext.models import lenet5_bn, load_pretrained, resnet56  # noqa: E402
from aofp_ext.models.resnet_cifar import PadShortcut  # noqa: E402
from aofp_ext.pricing import select_targets  # noqa: E402


def _import_prune_bench():
    """bench/prune.py (not a package): its machine/load/subset/stderr helpers."""
    spec = importlib.util.spec_from_file_location("_bench_prune",
                                                  Path(__file__).with_name("prune.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return sys.modules[spec.name]


_bp = _import_prune_bench()
machine, load, subset, stderr_pts, _dump = (_bp.machine, _bp.load, _bp.subset, _bp.stderr_pts,
                                            _bp._dump)

TP_VERSION = "1.6.1"
TP_INSTALL = (f"pip install --no-deps torch-pruning=={TP_VERSION}   (or: pip install -e "
              "\".[bench]\" from the repository root)")
try:  # optional: the comparison rows with Torch-Pruning
    import torch_pruning as tp
except ImportError:
    tp = None


def tp_version() -> str | None:
    """The installed distribution's version (the 1.6.1 wheel's ``__version__`` says 1.6.0)."""
    if tp is None:
        return None
    try:
        from importlib.metadata import version

        return version("torch-pruning")
    except Exception:
        return getattr(tp, "__version__", "?")

#: TP importances: key -> (label, factory). TP defaults otherwise (group mean reduction, per-group
#: mean normaliser, which is the per-layer mean normalisation of our global ranking).
TP_IMPORTANCES: dict[str, tuple[str, Callable[[], Any]]] = {
    "l1": ("magnitude (L1)", lambda: tp.importance.MagnitudeImportance(p=1)),
    "bn_scale": ("BN scale", lambda: tp.importance.BNScaleImportance()),
    "taylor": ("Taylor", lambda: tp.importance.TaylorImportance()),
}
TP_SCOPES = {"restricted": "AOFP's layers", "full": "full graph"}


@dataclass(frozen=True)
class Config:
    targets: tuple[float, ...] = (0.5, 0.3)   # target_flops: 50 % and 70 % of the MACs removed
    # batches (of batch_size) every criterion and TP's Taylor gradients read; prune's default is
    # 8, 4 here for the time budget: oracle-loss costs (sum of widths) masked forwards per image,
    # about 8 min for 4 batches on ResNet-56 on 2 idle cores
    calibration_batches: int = 4
    batch_size: int = 64
    finetune_lr: float = 0.01
    lenet_base_epochs: int = 2            # the base LeNet (bench/prune.py's recipe)
    lenet_finetune_epochs: int = 1        # full MNIST epochs after each cut (no augmentation)
    lenet_thresh: float = 0.05            # the authors' LeNet thresh
    lenet_aofp_max_steps: int = 3000      # guard (ceil(400/64) = 7 steps per half)
    resnet_finetune_epochs: int = 1       # epochs of the 4,000-image subset, crop + flip (each
    #                                       more adds ~10 min to the full run on 2 idle cores)
    resnet_thresh: float = 0.05           # bench/prune.py's ResNet-56 setting
    # guard: ~310 steps reach 50 %; 70 % needs more than the guard may allow (~1.7 s per step
    # on 2 idle cores); the table shows the MACs actually reached and flags a miss
    resnet_aofp_max_steps: int = 500
    tp_scan_step: float = 0.05            # TP's pruning_ratio: a scan in these steps, then
    tp_bisect_iters: int = 12             # bisection between the last two
    # a criterion's scores do not depend on the target when it keeps the default select (the
    # shared ranking): score once per model, rank the same scores for every target
    reuse_scores: bool = True
    method_options: dict = field(default_factory=dict)   # {method: {option: value}}
    train_limit: int | None = None        # --quick: fewer images
    test_limit: int | None = None
    seed: int = 0


QUICK = Config(calibration_batches=1, batch_size=8, lenet_base_epochs=1,
               lenet_aofp_max_steps=40, resnet_finetune_epochs=1, resnet_aofp_max_steps=10,
               tp_scan_step=0.1, tp_bisect_iters=4, train_limit=128, test_limit=128,
               method_options={"lfe": {"n_masks": 64}, "agent": {"updates": 1, "actions": 4}})


# --------------------------------------------------------------------------------------------
# Data, finetune, evaluation
# --------------------------------------------------------------------------------------------


class CropFlip(Dataset):
    """Random crop (zero padding in pixel space, i.e. the normalised value of a black pixel) and
    horizontal flip of normalised image tensors; draws from torch's global RNG (seeded before
    each finetune, so every method sees the same augmented images in the same order)."""

    def __init__(self, base: Dataset, pad: int = 4, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        self.base, self.pad = base, pad
        self.fill = (-torch.tensor(mean) / torch.tensor(std)).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        c, h, w = x.shape
        p = self.pad
        canvas = self.fill.expand(c, h + 2 * p, w + 2 * p).clone()
        canvas[:, p:p + h, p:p + w] = x
        dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
        x = canvas[:, dy:dy + h, dx:dx + w]
        if bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, y


def finetune(model: nn.Module, dataset: Dataset, epochs: int, cfg: Config) -> float:
    """The finetune of every row: SGD momentum 0.9, weight decay 1e-4 on weights (0 on BN and
    biases), lr ``cfg.finetune_lr`` cosine to 0 per step, the same seeded order and augmentation.
    Returns the wall seconds."""
    t0 = time.perf_counter()
    if epochs == 0:
        return 0.0
    torch.manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    model.zero_grad(set_to_none=True)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                           {"params": rest, "weight_decay": 0.0}], lr=cfg.finetune_lr,
                          momentum=0.9)
    total, i = epochs * len(loader), 0
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = cfg.finetune_lr * 0.5 * (1 + math.cos(math.pi * i / total))
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune loss {float(loss)} at step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            i += 1
    model.eval()
    return time.perf_counter() - t0


def evaluate(model: nn.Module, test_loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        return float(aofp_ext.accuracy(test_loader)(model))


def selection_loader(train: Dataset, cfg: Config) -> DataLoader:
    """The selection loader of every row: the same seeded order, so the same first batches."""
    return DataLoader(train, batch_size=cfg.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(cfg.seed))


def calibration(train: Dataset, cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches ``prune`` gives a criterion: the first ``calibration_batches`` of the loader
    (torch's global RNG seeded as ``prune`` seeds it, for the same augmented images)."""
    torch.manual_seed(cfg.seed)
    out = []
    for x, y in selection_loader(train, cfg):
        out.append((x, y))
        if len(out) == cfg.calibration_batches:
            break
    return out


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd,
                                                                 nn.Linear))}


# --------------------------------------------------------------------------------------------
# Torch-Pruning
# --------------------------------------------------------------------------------------------


class ShortcutConv(nn.Conv2d):
    """ResNet option-A shortcut as a fixed 1x1 stride-2 conv with 0/1 weights (what TP sees)."""


class GatherShortcut(nn.Module):
    """``out[:, dst] = x[:, src, ::2, ::2]``, zeros elsewhere: the option-A shortcut after a cut
    (parameter-free, like the original ``F.pad``)."""

    def __init__(self, src: list[int], dst: list[int], out_channels: int):
        super().__init__()
        self.src, self.dst, self.out_channels = list(src), list(dst), int(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        out = x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])
        if self.src:
            out[:, self.dst] = x[:, self.src]
        return out


def _replace(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
                n += 1
    return n


def pad_to_conv(model: nn.Module) -> int:
    def make(m: PadShortcut) -> ShortcutConv:
        cin = 2 * m.pad                      # planes = 4 * pad = cin + 2 * pad
        c = ShortcutConv(cin, cin + 2 * m.pad, 1, stride=2, bias=False)
        with torch.no_grad():
            c.weight.zero_()
            for j in range(cin):
                c.weight[m.pad + j, j, 0, 0] = 1.0
        return c

    return _replace(model, PadShortcut, make)


def conv_to_gather(model: nn.Module) -> int:
    def make(c: ShortcutConv) -> GatherShortcut:
        w = c.weight.detach()[:, :, 0, 0]
        nz = (w != 0).nonzero().tolist()
        if not torch.equal(w[w != 0], torch.ones(len(nz))) or len({d for d, _ in nz}) != len(nz):
            raise RuntimeError("the shortcut conv is no longer a 0/1 channel selection")
        return GatherShortcut([s for _, s in nz], [d for d, _ in nz], c.out_channels)

    return _replace(model, ShortcutConv, make)


def tp_prune(base: nn.Module, scope: str, importance: str, target_names: list[str],
             example: torch.Tensor, target_flops: float, calib: list, cfg: Config,
             classifier: str) -> tuple[nn.Module, dict]:
    """Prune a copy of ``base`` with TP at the smallest ``pruning_ratio`` whose MACs (our count)
    meet ``target_flops`` (a scan in steps of ``cfg.tp_scan_step``, then bisection; of the
    ratios tried, the one with the most MACs within the target). Returns the model and
    information about the search."""
    t_all = time.perf_counter()
    macs0, _ = aofp_ext.count_flops(base, example)
    goal = target_flops * macs0
    src = copy.deepcopy(base).eval()
    converted = pad_to_conv(src) if scope == "full" else 0
    grad_s = 0.0
    if importance == "taylor":  # gradients of the task loss on the calibration batches (eval)
        t0 = time.perf_counter()
        src.zero_grad(set_to_none=True)
        for x, y in calib:
            F.cross_entropy(src(x), y).backward()
        grad_s = time.perf_counter() - t0

    def trial(ratio: float) -> tuple[nn.Module, int, float]:
        t0 = time.perf_counter()
        m = copy.deepcopy(src).eval()
        for p, q in zip(src.parameters(), m.parameters()):  # deepcopy drops .grad
            q.grad = None if p.grad is None else p.grad.clone()
        if scope == "restricted":
            ignored = [mod for n, mod in m.named_modules()
                       if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear))
                       and n not in target_names]
        else:
            ignored = [m.get_submodule(classifier)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(m, example, TP_IMPORTANCES[importance][1](),
                                          global_pruning=True, pruning_ratio=ratio,
                                          ignored_layers=ignored)
            pruner.step()
        m.zero_grad(set_to_none=True)
        if converted:  # back to a parameter-free gather; it must compute the same
            x = torch.randn((2, *example.shape[1:]), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                y0 = m(x)
                conv_to_gather(m)
                y1 = m(x)
            if not torch.allclose(y0, y1, rtol=1e-5, atol=1e-5):
                raise RuntimeError("the gather shortcut differs from the TP-pruned shortcut conv")
        sec = time.perf_counter() - t0
        return m, aofp_ext.count_flops(m, example)[0], sec

    tried: list[tuple[float, int]] = []
    best: tuple[float, nn.Module, int, float] | None = None

    def consider(ratio: float) -> bool:
        nonlocal best
        m, macs, sec = trial(ratio)
        tried.append((round(ratio, 6), macs))
        ok = macs <= goal
        if ok and (best is None or macs > best[2]):
            best = (ratio, m, macs, sec)
        return ok

    lo, hi = 0.0, None
    for k in range(1, math.ceil(1 / cfg.tp_scan_step)):  # the first ratio that meets the target
        r = cfg.tp_scan_step * k
        if consider(r):
            hi = r
            break
        lo = r
    if hi is None:
        raise RuntimeError(f"TP ({scope}, {importance}) did not reach {target_flops} of the MACs "
                           f"at any pruning_ratio below 1 (tried: {tried})")
    for _ in range(cfg.tp_bisect_iters):  # the smallest ratio in (lo, hi] that meets it
        mid = (lo + hi) / 2
        if consider(mid):
            hi = mid
        else:
            lo = mid
    ratio, model, macs, sec = best
    before, after = widths(base), widths(model)
    changed = sorted(n for n in after if n in before and after[n] != before[n])
    info = {"pruning_ratio": ratio, "trials": len(tried), "tried": tried,
            "bisection_seconds": time.perf_counter() - t_all,
            "selection_seconds": grad_s + sec, "gradient_seconds": grad_s,
            "shortcuts_converted": converted, "layers_changed": changed}
    if scope == "restricted":
        outside = [n for n in changed if n not in target_names]
        if outside:
            raise RuntimeError(f"TP restricted to AOFP's layers changed other layers: {outside}")
    return model, info


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _key(target: float, family: str, method: str) -> str:
    return f"{target:g}|{family}|{method}"


_REUSED: dict[str, type] = {}


def reusable(method: str) -> bool:
    """Whether ``method``'s keep-sets depend on the target only through the shared ranking of
    its scores (it keeps :meth:`Criterion.select`)."""
    cls = CRITERIA.get(method)
    return cls is not None and cls.select is Criterion.select


def reused_method(method: str, options: dict, scores: list[list[float]]) -> str:
    """A criterion that is ``method`` with its scores given (those of another target's row):
    ``prune(method=<returned name>)`` then ranks them exactly as ``method`` would."""
    if method not in _REUSED:
        base = CRITERIA[method]

        def init(self) -> None:
            base.__init__(self, **self._opts)

        def scores_fn(self, ctx) -> list[torch.Tensor]:
            return [torch.tensor(v, dtype=torch.float64) for v in self._cached]

        cls = type(f"Reused_{base.__name__}", (base,),
                   {"__init__": init, "scores": scores_fn, "needs_data": False})
        _REUSED[method] = register(f"{method}@reused-scores")(cls)
    cls = _REUSED[method]
    cls._opts, cls._cached = dict(options), scores
    return cls.name


def run_ours(method: str, fresh: Callable[[], nn.Module], train: Dataset, ft_data: Dataset,
             ft_epochs: int, test_loader: DataLoader, example: torch.Tensor, target: float,
             cfg: Config, aofp_kw: dict, tag: str, reuse: dict | None = None) -> dict:
    """One row of ours; ``reuse``: the row of another target whose scores this one ranks."""
    model = fresh()
    t0 = time.perf_counter()

    def log(step: int, info: dict) -> None:
        if step % 50 == 0:
            print(f"  [{tag}] step {step}: MACs {info['macs_fraction']:.3f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)

    kw = dict(example_inputs=example, target_flops=target, method=method, seed=cfg.seed,
              finetune_epochs=0, progress=False)  # no eval_fn: no evaluation before
    opts = cfg.method_options.get(method) or None
    if method == "aofp":
        kw.update(aofp_kw, callback=log)
    elif reuse is not None:
        kw.update(method=reused_method(method, opts or {}, list(reuse["scores"].values())),
                  calibration_batches=cfg.calibration_batches)
    else:
        kw.update(calibration_batches=cfg.calibration_batches, method_options=opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = aofp_ext.prune(model, selection_loader(train, cfg), **kw)
    r = result.report
    sel = r.get("selection") or {}
    seconds = sel.get("seconds", r["search_seconds"])
    if reuse is not None:  # the scoring was done for the other target
        if list(sel["scores"].values()) != list(reuse["scores"].values()):
            raise RuntimeError("reused scores came back changed")
        sel = {**sel, "method": method, "scores_from_target": reuse["target"],
               "ranking_seconds": seconds}
        seconds = reuse["selection_seconds"]
    row = {"family": "aofp_ext", "method": method, "label": method,
           "macs_after": r["macs_after"], "params_after": r["params_after"],
           "acc_selection": evaluate(result.model, test_loader),
           "selection_seconds": seconds, "method_options": opts,
           "steps": r["steps"], "stop_reason": r["stop_reason"],
           "widths_after": r["widths_after"], "scores": sel.get("scores"),
           "selection_info": {k: v for k, v in sel.items() if k != "scores"},
           "warnings": [str(w.message) for w in caught]}
    if method == "aofp":
        row["settings"] = {k: r["settings"][k] for k in ("masks_per_step", "iters_per_half",
                                                         "warmup_iters", "thresh", "max_steps")}
    row["finetune_seconds"] = finetune(result.model, ft_data, ft_epochs, cfg)
    row["acc_finetune"] = evaluate(result.model, test_loader)
    return row


def run_tp(scope: str, importance: str, fresh: Callable[[], nn.Module], train: Dataset,
           ft_data: Dataset, ft_epochs: int, test_loader: DataLoader, example: torch.Tensor,
           target: float, cfg: Config, target_names: list[str], classifier: str) -> dict:
    model, info = tp_prune(fresh(), scope, importance, target_names, example, target,
                           calibration(train, cfg) if importance == "taylor" else [], cfg,
                           classifier)
    macs, params = aofp_ext.count_flops(model, example)
    row = {"family": "torch-pruning", "method": f"tp-{importance}-{scope}",
           "label": f"TP {TP_IMPORTANCES[importance][0]}, {TP_SCOPES[scope]}",
           "macs_after": macs, "params_after": params,
           "acc_selection": evaluate(model, test_loader),
           "selection_seconds": info["selection_seconds"], "tp": info,
           "widths_after": widths(model)}
    row["finetune_seconds"] = finetune(model, ft_data, ft_epochs, cfg)
    row["acc_finetune"] = evaluate(model, test_loader)
    return row


def run_part(part: str, cfg: Config, work: Path, methods: list[str], tp_imps: list[str],
             tp_scopes: list[str], header: dict) -> dict:
    """All rows of one model; each finished row is saved in work/compare-<part>.json."""
    root = default_data_dir()
    if part == "lenet":
        train = subset(mnist(root / "mnist", "train"), cfg.train_limit)
        test = subset(mnist(root / "mnist", "test"), cfg.test_limit)
        example = torch.zeros(1, 1, 28, 28)
        base_state, base_seconds = lenet_base(cfg, train, work)

        def fresh() -> nn.Module:
            m = lenet5_bn()
            m.load_state_dict(base_state)
            return m.eval()

        ft_data, ft_epochs, classifier = train, cfg.lenet_finetune_epochs, "fc2"
        k = 64
        aofp_kw = dict(thresh=cfg.lenet_thresh, iters_per_half=math.ceil(400 / k),
                       warmup_iters=math.ceil(500 / k), max_steps=cfg.lenet_aofp_max_steps)
    else:
        croot = root / "cifar10-subset" / "cifar-10-batches-py"
        weights = root / "weights" / "resnet56-4bfd9763.th"
        train = subset(cifar10(croot, "train"), cfg.train_limit)
        test = subset(cifar10(croot, "test"), cfg.test_limit)
        example = torch.zeros(1, 3, 32, 32)
        base_seconds = None

        def fresh() -> nn.Module:
            return load_pretrained(resnet56(), weights).eval()

        ft_data, ft_epochs, classifier = CropFlip(train), cfg.resnet_finetune_epochs, "linear"
        # the shipped ResNet-56 has memorised these training images (loss ~0.001 on them): the
        # selection (AOFP's training and pricing, every criterion's calibration batches) sees
        # them augmented, as the finetune does, so that loss-based criteria get a signal
        train = ft_data
        aofp_kw = dict(thresh=cfg.resnet_thresh, max_steps=cfg.resnet_aofp_max_steps)
    test_loader = DataLoader(test, batch_size=500)
    base = fresh()
    macs0, params0 = aofp_ext.count_flops(base, example)
    base_acc = evaluate(base, test_loader)
    target_names = [g.name for g in select_targets(aofp_ext.channel_groups(base, example),
                                                   "auto", base)]
    print(f"[{part}] base accuracy {base_acc:.2f} % on {len(test)} images, {macs0:,} MACs, "
          f"{params0:,} params, {len(target_names)} AOFP target layers", flush=True)

    path = work / f"compare-{part}.json"
    cfg_d = asdict(cfg)
    done: dict[str, dict] = {}
    if path.is_file():
        old = json.loads(path.read_text())
        same = {k: v for k, v in cfg_d.items() if k != "targets"}
        if {k: v for k, v in (old.get("config") or {}).items() if k != "targets"} == same and (
                old.get(part)):
            done = {r["key"]: r for r in old[part]["rows"]}
            print(f"[{part}] {len(done)} finished row(s) found in {path}: not run again",
                  flush=True)
    out = {"n_train": len(train), "n_test": len(test), "macs_before": macs0,
           "params_before": params0, "base_accuracy": base_acc, "base_seconds": base_seconds,
           "finetune_epochs": ft_epochs, "augmentation": part == "resnet",
           "target_layers": target_names, "aofp": {k: v for k, v in aofp_kw.items()},
           "torch_pruning": tp_version(), "config": cfg_d, "date": header["date"],
           "command": header["command"], "available": header["available"],
           "load_start": load(), "rows": []}
    keep = set()

    def save() -> None:
        merged = {**done, **{r["key"]: r for r in out["rows"]}}
        _dump(path, {**header, "config": cfg_d,
                     part: {**out, "rows": list(merged.values())}})

    def first_scores(m: str) -> dict | None:  # a finished row of m with scores, any target
        if not (cfg.reuse_scores and reusable(m)):
            return None
        rows = [r for r in [*out["rows"], *done.values()] if r.get("method") == m
                and r.get("scores") and "scores_from_target" not in r.get("selection_info", {})]
        return rows[0] if rows else None

    jobs: list[tuple[float, str, str, Callable[[], dict]]] = []
    for target in cfg.targets:
        for m in methods:
            jobs.append((target, "aofp_ext", m, lambda m=m, target=target: run_ours(
                m, fresh, train, ft_data, ft_epochs, test_loader, example, target, cfg, aofp_kw,
                f"{part} {m} {target:g}", first_scores(m))))
        if tp is not None:
            for scope in tp_scopes:
                for imp in tp_imps:
                    jobs.append((target, "torch-pruning", f"tp-{imp}-{scope}",
                                 lambda s=scope, i=imp, target=target: run_tp(
                                     s, i, fresh, train, ft_data, ft_epochs, test_loader,
                                     example, target, cfg, target_names, classifier)))
    for target, family, method, job in jobs:
        key = _key(target, family, method)
        keep.add(key)
        if key in done:
            out["rows"].append(done.pop(key))
            continue
        t0, c0, l0 = time.perf_counter(), time.process_time(), load()
        try:
            row = job()
        except Exception as e:  # one failing method must not stop the benchmark
            traceback.print_exc()
            row = {"family": family, "method": method, "label": method,
                   "error": f"{type(e).__name__}: {e}"}
        row.update(key=key, target=target, wall=time.perf_counter() - t0,
                   cpu=time.process_time() - c0, load_start=l0,
                   load_end=load(), macs_fraction=(row["macs_after"] / macs0
                                                   if "macs_after" in row else None))
        if "macs_after" in row:
            row["above_target"] = row["macs_after"] > target * macs0
        out["rows"].append(row)
        save()
        print(f"[{part}] {target:g} {row['label']}: " + (
            f"ERROR {row['error']}" if "error" in row else
            f"MACs {row['macs_fraction']:.3f}{' (ABOVE TARGET)' if row['above_target'] else ''}"
            f", acc {row['acc_selection']:.2f} -> {row['acc_finetune']:.2f}, selection "
            f"{row['selection_seconds']:.1f} s, finetune {row['finetune_seconds']:.0f} s, "
            f"row {row['wall']:.0f} s ({row['cpu']:.0f} CPU s, load {l0:.1f})"), flush=True)
    out["rows"] += [r for k, r in done.items() if k not in keep]  # rows of other selections
    out["load_end"] = load()
    save()
    return out


def lenet_base(cfg: Config, train: Dataset, work: Path) -> tuple[dict, float | None]:
    """The base LeNet-5-BN of bench/prune.py (same recipe and cache file name in --work)."""
    return _bp.lenet_base(selection_loader(train, cfg), cfg.lenet_base_epochs, cfg.seed, work)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 (float64), ties get their average rank."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    r = torch.empty_like(x)
    r[torch.argsort(x, stable=True)] = torch.arange(x.numel(), dtype=torch.float64)
    _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inv, r)
    return (sums / counts)[inv]


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (Pearson of the average ranks); None if undefined."""
    ra, rb = ranks(torch.as_tensor(a)), ranks(torch.as_tensor(b))
    if ra.numel() < 3 or ra.numel() != rb.numel():
        return None
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else None


def vs_reference(scores: dict | None, ref: dict | None) -> tuple[float | None, float | None]:
    """(mean over layers of the per-layer Spearman, global Spearman of the per-layer
    mean-normalised scores) of ``scores`` against ``ref`` (both {layer: [score per filter]})."""
    if not scores or not ref or set(scores) != set(ref):
        return None, None
    per = [spearman(scores[k], ref[k]) for k in ref]
    per = [v for v in per if v is not None]
    a = torch.cat([relative(torch.tensor(scores[k], dtype=torch.float64)) for k in ref])
    b = torch.cat([relative(torch.tensor(ref[k], dtype=torch.float64)) for k in ref])
    return (sum(per) / len(per) if per else None), spearman(a, b)


def annotate(part: dict, reference: str) -> None:
    """Adds each row's Spearman vs the reference criterion's row at the same target."""
    for r in part["rows"]:
        ref = next((x for x in part["rows"] if x.get("method") == reference
                    and x.get("target") == r.get("target") and x.get("scores")), None)
        r["rho_layer"], r["rho_global"] = vs_reference(r.get("scores"),
                                                       ref["scores"] if ref else None)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

MODELS = {"lenet": "LeNet-5-BN, MNIST", "resnet": "ResNet-56 (shipped weights), CIFAR-10 subset"}


def _f1(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"


def _acc(v: float | None, n: int) -> str:
    return "-" if v is None else f"{v:.2f} ± {stderr_pts(v, n):.2f}"


def _rho(r: dict) -> str:
    a, b = r.get("rho_layer"), r.get("rho_global")
    return "-" if a is None and b is None else (f"{a:.2f}" if a is not None else "-") + " / " + (
        f"{b:.2f}" if b is not None else "-")


def _note(r: dict) -> str:
    notes = []
    if r.get("above_target"):
        notes.append("**MACs above the target**")
    if r.get("method") == "aofp":
        notes.append(f"{r['steps']} steps ({r['stop_reason']})")
    src = (r.get("selection_info") or {}).get("scores_from_target")
    if src is not None:
        notes.append(f"scores of the {src:g} row, ranked for this target (selection s: that "
                     "row's)")
    if r.get("method_options"):
        notes.append(f"options {json.dumps(r['method_options'])}")
    if "tp" in r:
        t = r["tp"]
        notes.append(f"ratio {t['pruning_ratio']:.3f} ({t['trials']} trials, "
                     f"{t['bisection_seconds']:.0f} s)")
    return "; ".join(notes)


def table(part: dict, target: float) -> list[str]:
    n, m0 = part["n_test"], part["macs_before"]
    out = ["| method | MACs after (ours) | params after | acc. after selection | "
           "acc. after finetune | selection s | Spearman vs oracle (layer mean / global) | "
           "notes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    rows = sorted((r for r in part["rows"] if r.get("target") == target),
                  key=lambda r: r.get("family") != "aofp_ext")  # ours first (stable)
    for r in rows:
        if "error" in r:
            out.append(f"| {r['label']} | - | - | - | - | - | - | failed: "
                       f"{r['error'][:160].replace('|', '/')} |")
            continue
        out.append(f"| {r['label']} | {r['macs_after']:,} ({r['macs_after'] / m0:.1%}) | "
                   f"{r['params_after']:,} | {_acc(r['acc_selection'], n)} | "
                   f"{_acc(r['acc_finetune'], n)} | {r['selection_seconds']:.1f} | {_rho(r)} | "
                   f"{_note(r)} |")
    return out


def _se2(a: float, b: float, n: int) -> float:
    """Standard error of a difference of two accuracies on the same n images (as if
    independent: conservative)."""
    return math.hypot(stderr_pts(a, n), stderr_pts(b, n))


def observations(part: dict, reference: str) -> list[str]:
    """'What we saw', from the numbers."""
    n, lines = part["n_test"], []
    for target in sorted({r["target"] for r in part["rows"]}, reverse=True):
        every = [r for r in part["rows"] if r.get("target") == target and "error" not in r]
        rows = [r for r in every if not r.get("above_target")]  # compared at the target only
        if not rows:
            continue
        pct = f"{1 - target:.0%} of the MACs removed"
        ft = sorted(rows, key=lambda r: -r["acc_finetune"])
        sel = sorted(rows, key=lambda r: -r["acc_selection"])
        best = ft[0]
        close = [r["label"] for r in ft[1:]
                 if best["acc_finetune"] - r["acc_finetune"]
                 < 2 * _se2(best["acc_finetune"], r["acc_finetune"], n)]
        s = (f"- {pct}: after the finetune {best['label']} is best "
             f"({best['acc_finetune']:.2f} %)")
        if len(close) > 5:
            s += (f"; {len(close)} of the {len(ft) - 1} other rows are within two standard "
                  f"errors of it ({n:,} test images do not separate them)")
        else:
            s += (f"; within two standard errors of it: {', '.join(close)}" if close else
                  "; every other row is more than two standard errors below it")
        s += (f". Right after selection the order differs: {sel[0]['label']} "
              f"{sel[0]['acc_selection']:.2f} %, {sel[-1]['label']} lowest at "
              f"{sel[-1]['acc_selection']:.2f} %" if sel[0] is not best else
              f". It is also best right after selection ({best['acc_selection']:.2f} %); "
              f"lowest there: {sel[-1]['label']} {sel[-1]['acc_selection']:.2f} %")
        rs = spearman([r["acc_selection"] for r in rows], [r["acc_finetune"] for r in rows])
        if rs is not None and len(rows) >= 4:
            s += (f"; the rank correlation between the accuracy after selection and after the "
                  f"finetune over the {len(rows)} rows is {rs:.2f}")
        lines.append(s + ".")
        a = next((r for r in every if r["method"] == "aofp"), None)
        if a is not None and a.get("above_target"):
            lines.append(f"  AOFP did not reach the target: its step guard stopped the search at "
                         f"{a['steps']} steps ({a['selection_seconds']:.0f} s) with "
                         f"{a['macs_fraction']:.1%} of the MACs left (accuracy there "
                         f"{a['acc_selection']:.2f} %, {a['acc_finetune']:.2f} % after the "
                         "finetune); it is left out of the ranking above.")
        elif a is not None:
            rank = 1 + [r["key"] for r in ft].index(a["key"])
            s = (f"  AOFP: {a['acc_selection']:.2f} % after its search ({a['steps']} steps, "
                 f"{a['selection_seconds']:.0f} s, MACs {a['macs_fraction']:.1%}"
                 + (", **above the target: the step guard stopped it**" if a["above_target"]
                    else "") + f"), {a['acc_finetune']:.2f} % after the finetune, rank {rank} of "
                 f"{len(ft)}")
            if a is not best:
                gap = best["acc_finetune"] - a["acc_finetune"]
                s += (f"; it loses to {best['label']} by {gap:.2f} points "
                      f"({gap / _se2(best['acc_finetune'], a['acc_finetune'], n):.1f} s.e.)")
                worse = [r["label"] for r in ft[rank:]]
                if worse:
                    s += f" and is ahead of {', '.join(worse)}"
            lines.append(s + ".")
        rnd = next((r for r in rows if r["method"] == "random"), None)
        if rnd is not None:
            below = [r["label"] for r in rows if r is not rnd
                     and r["acc_finetune"] <= rnd["acc_finetune"]]
            lines.append(f"  Random selection: {rnd['acc_selection']:.2f} % -> "
                         f"{rnd['acc_finetune']:.2f} %; "
                         + (f"not above it after the finetune: {', '.join(below)}." if below
                            else "every other row ends above it."))
        pairs = []
        for imp, ours in (("l1", "l1"), ("bn_scale", "bn_scale"), ("taylor", "taylor")):
            o = next((r for r in rows if r["method"] == ours), None)
            t = next((r for r in rows if r["method"] == f"tp-{imp}-restricted"), None)
            f = next((r for r in rows if r["method"] == f"tp-{imp}-full"), None)
            if o is not None and t is not None:
                same = all(t["widths_after"].get(k) == w for k, w in o["widths_after"].items())
                pairs.append(f"{ours} {o['acc_finetune']:.2f} vs TP {TP_IMPORTANCES[imp][0]} on "
                             f"the same layers {t['acc_finetune']:.2f}"
                             + (" (the same widths)" if same else ""))
            if t is not None and f is not None:
                pairs.append(f"TP {TP_IMPORTANCES[imp][0]} full graph {f['acc_finetune']:.2f} "
                             f"({f['params_after']:,} params) vs same layers "
                             f"{t['acc_finetune']:.2f} ({t['params_after']:,} params)")
        if pairs:
            lines.append("  After the finetune: " + "; ".join(pairs) + ".")
        flagged = [r["label"] for r in every if r.get("above_target")]
        if flagged:
            lines.append(f"  Above the MACs target (not ranked): {', '.join(flagged)}.")
    rows = [r for r in part["rows"] if "error" not in r]
    rho = {}
    for r in rows:
        if r.get("rho_layer") is not None and r["method"] != reference:
            rho.setdefault(r["label"], r)
    if rho:
        order = sorted(rho.values(), key=lambda r: -r["rho_layer"])
        lines.append(f"- Agreement with the exact {reference} (Spearman, layer mean / global): "
                     + ", ".join(f"{r['label']} {r['rho_layer']:.2f} / "
                                 f"{r['rho_global']:.2f}" for r in order) + ".")
    elif any(r.get("scores") for r in rows):
        lines.append(f"- No Spearman column: no '{reference}' row with scores.")
    if rows:
        fast = min(rows, key=lambda r: r["selection_seconds"])
        slow = max(rows, key=lambda r: r["selection_seconds"])
        lines.append(f"- Selection time: from {fast['selection_seconds']:.2f} s "
                     f"({fast['label']}, {fast['target']:g}) to {slow['selection_seconds']:.0f} s "
                     f"({slow['label']}, {slow['target']:g}).")
    errors = [f"{r['label']} at {r['target']:g}" for r in part["rows"] if "error" in r]
    if errors:
        lines.append(f"- Failed rows (see the table): {', '.join(errors)}.")
    return lines


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)", flush=True)
        return False
    parts = [p for p in MODELS if results.get(p)]
    if not parts:
        return False
    fig, axes = plt.subplots(1, len(parts), figsize=(7.5 * len(parts), 5.5), squeeze=False)
    labels: list[str] = []  # ours in run order, then TP
    for fam in ("aofp_ext", "torch-pruning"):
        for p in parts:
            for r in results[p]["rows"]:
                if r.get("family") == fam and "error" not in r and r["label"] not in labels:
                    labels.append(r["label"])
    cmap = plt.get_cmap("tab20")
    color = {lab: cmap(i % 20) for i, lab in enumerate(labels)}
    for ax, p in zip(axes[0], parts):
        part = results[p]
        ax.axhline(part["base_accuracy"], color="grey", ls="--", lw=1, label="base model")
        for lab in labels:
            rows = sorted((r for r in part["rows"] if r["label"] == lab and "error" not in r),
                          key=lambda r: r["macs_fraction"])
            if not rows:
                continue
            mk = "o" if rows[0]["family"] == "aofp_ext" else (
                "^" if rows[0]["method"].endswith("restricted") else "s")
            x = [r["macs_fraction"] for r in rows]
            ax.plot(x, [r["acc_finetune"] for r in rows], marker=mk, color=color[lab], lw=1,
                    label=lab)
            ax.plot(x, [r["acc_selection"] for r in rows], marker=mk, color=color[lab], lw=0.6,
                    ls=":", mfc="none")
        ax.set_title(f"{MODELS[p]}\nfilled: after finetune, hollow/dotted: after selection")
        ax.set_xlabel("MACs after / MACs before (aofp_ext.count_flops)")
        ax.set_ylabel(f"top-1 accuracy, % ({part['n_test']:,} test images)")
        ax.grid(alpha=0.3)
    h, lab = axes[0][-1].get_legend_handles_labels()
    fig.legend(h, lab, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(results: dict, png: str | None) -> str:
    ref = results.get("reference", "oracle")
    lines = [
        "# Filter-selection methods side by side (bench/compare.py)",
        "",
        f"- date: {results['date']}",
        f"- machine: {results['machine']}",
        f"- command: `{results['command']}`",
        f"- load average (1 min) at the start and end: {results['load_start']:.1f} - "
        f"{results['load_end']:.1f} (the machine may be shared; wall times move with it)",
        *(f"- merged from an earlier run: {m}" for m in results.get("merged", [])),
        f"- methods registered at run time: {', '.join(results['available'])}",
        "- Torch-Pruning: " + (f"torch-pruning {results['torch_pruning']} (the bench pins "
                               f"{TP_VERSION})" if results.get("torch_pruning") else
                               f"not installed, its rows are skipped; install with `{TP_INSTALL}`"),
        "",
        "How each row is made: the method selects filters on the base model (AOFP searches while "
        "training with lr 1e-3, the criteria read the first `calibration_batches` batches of the "
        "same seeded loader (numbers per model below), without training; TP prunes with global "
        "ranking at the smallest `pruning_ratio` "
        "whose MACs, by our count, meet the target), the channels are cut, the test accuracy is "
        "taken (`acc. after selection`), then the same finetune for every row (SGD momentum 0.9, "
        "weight decay 1e-4 on weights, lr cosine to 0, the same seeded order and augmentation) "
        "and the accuracy again. Accuracies: top-1 % "
        "± one standard error of the test-set estimate (sqrt(p(1-p)/n)). MACs per image, conv + "
        "Linear, by `aofp_ext.count_flops` for every row (TP's own count differs). `selection s`: "
        "wall time of the selection alone (AOFP: its search, training included; TP: Taylor "
        "gradients + one prune at the final ratio, the ratio search itself is in the notes). "
        f"Spearman: the criterion's per-filter scores against those of `{ref}` on the same "
        "batches, per layer (mean over layers) and globally over the per-layer mean-normalised "
        "scores (the order the shared ranking removes filters in); `-` where a method has no "
        "per-filter scores (AOFP's search, TP).",
        "",
        "TP rows: `AOFP's layers` = TP restricted to the layers AOFP searches (`targets=\"auto\"`;"
        " every other conv/Linear is in TP's `ignored_layers`); `full graph` = TP's dependency "
        "graph over every prunable layer, residual-coupled groups included (only the classifier "
        "ignored). For ResNet-56 TP 1.6.1 cannot follow the option-A shortcut (`F.pad` on the "
        "channel dim: the pruned model fails with a shape error), so for `full graph` the "
        "shortcut is given to TP as the equivalent fixed 1x1 stride-2 conv with 0/1 weights (it "
        "enters TP's group importance like any conv) and turned back into a parameter-free "
        "channel gather after the cut (no MACs, no params, not trained).",
        "",
    ]
    if png:
        lines += [f"![accuracy vs MACs]({png})", ""]
    for p, title in MODELS.items():
        part = results.get(p)
        if not part:
            continue
        aug = (", random crop 32 (padding 4) + horizontal flip" if part["augmentation"] else
               ", no augmentation")
        aofp, pc = part["aofp"], part["config"]
        lines += [
            f"## {title} ({part['n_train']:,} train / {part['n_test']:,} test images), CPU",
            "",
            f"Run {part['date']}, `{part['command']}`, load average {_f1(part.get('load_start'))}"
            f" - {_f1(part.get('load_end'))}; methods registered then: "
            f"{', '.join(part.get('available') or ['?'])}; Torch-Pruning: "
            f"{part['torch_pruning'] or 'not installed'}; config `{json.dumps(pc)}`.",
            "",
            f"Calibration: the first {pc['calibration_batches']} batches of {pc['batch_size']} "
            "images" + (" (augmented like the finetune's: the base model has memorised the raw "
                        "training images)" if part["augmentation"] else "")
            + f"; finetune lr {pc['finetune_lr']}, batch {pc['batch_size']}.",
            "",
            f"Base model: {_acc(part['base_accuracy'], part['n_test'])} %, "
            f"{part['macs_before']:,} MACs, {part['params_before']:,} params"
            + (f" (trained here in {part['base_seconds']:.0f} s)" if part.get("base_seconds")
               else "") + f"; {len(part['target_layers'])} target layers "
            f"(`targets=\"auto\"`). Finetune: {part['finetune_epochs']} epoch(s) of the training "
            f"set{aug}. AOFP: thresh {aofp['thresh']}, masks_per_step at its default, "
            + (f"iters_per_half {aofp['iters_per_half']}, warm-up {aofp['warmup_iters']} "
               "(the authors' LeNet settings at K = 64), " if "iters_per_half" in aofp else
               "iters_per_half / warm-up at their defaults, ")
            + f"at most {aofp['max_steps']} steps.",
            "",
        ]
        for target in sorted({r["target"] for r in part["rows"]}, reverse=True):
            lines += [f"### target_flops {target:g} ({1 - target:.0%} of the MACs removed)", "",
                      *table(part, target), ""]
        lines += ["### What we saw", "", *observations(part, ref), ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _csv(s: str | None) -> list[str] | None:
    return None if s is None else [v.strip() for v in s.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = __doc__[__doc__.index("    python bench/compare.py --work"):
                    __doc__.index("Each finished row")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + usage + "Torch-Pruning rows need: "
                                + TP_INSTALL)
    p.add_argument("--part", choices=["lenet", "resnet", "all", "none"], default="all",
                   help="which model(s) to run (none: only --merge and the report)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: small subsets, few steps, short finetunes")
    p.add_argument("--methods", help="comma-separated methods of ours (default: every one of "
                   f"aofp_ext.criteria.available(), now: {','.join(available())})")
    p.add_argument("--targets", help="comma-separated target_flops (default 0.5,0.3)")
    p.add_argument("--tp", default="l1,bn_scale,taylor",
                   help="TP importances (l1, bn_scale, taylor; empty: none)")
    p.add_argument("--tp-scopes", default="restricted,full",
                   help="TP scopes: restricted (AOFP's layers), full (whole graph)")
    p.add_argument("--reference", default="oracle",
                   help="the criterion the Spearman column compares with (default oracle)")
    p.add_argument("--calibration-batches", type=int, help="default 4 (--quick: 1)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one criterion (repeatable), e.g. lfe:n_masks=256; VALUE "
                   "is read as a Python literal")
    p.add_argument("--no-reuse-scores", action="store_true",
                   help="score every criterion again for every target (by default a criterion "
                   "with the shared ranking is scored once per model and its scores ranked for "
                   "each target: the same keep-sets, since its scores do not depend on it)")
    p.add_argument("--resnet-finetune-epochs", type=int, help="default 1")
    p.add_argument("--lenet-finetune-epochs", type=int, help="default 1")
    p.add_argument("--resnet-aofp-max-steps", type=int,
                   help="step guard of the ResNet-56 AOFP search (default 500); the table shows "
                   "the MACs actually reached")
    p.add_argument("--lenet-aofp-max-steps", type=int, help="default 3000")
    p.add_argument("--work", help="folder for per-part JSON results (resumed from) and the base "
                   "LeNet (default: a temporary folder)")
    p.add_argument("--merge", nargs="*", metavar="JSON",
                   help="include the parts found in these result files of earlier runs")
    p.add_argument("--out", help="write the Markdown report here (and the PNG next to it)")
    args = p.parse_args(argv)

    cfg = QUICK if args.quick else Config()
    over = {"calibration_batches": args.calibration_batches,
            "resnet_finetune_epochs": args.resnet_finetune_epochs,
            "lenet_finetune_epochs": args.lenet_finetune_epochs,
            "resnet_aofp_max_steps": args.resnet_aofp_max_steps,
            "lenet_aofp_max_steps": args.lenet_aofp_max_steps}
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.targets:
        cfg = replace(cfg, targets=tuple(float(v) for v in _csv(args.targets)))
    if args.no_reuse_scores:
        cfg = replace(cfg, reuse_scores=False)
    if args.method_option:
        import ast

        mo = {k: dict(v) for k, v in cfg.method_options.items()}
        for text in args.method_option:
            name, _, rest = text.partition(":")
            key, sep, value = rest.partition("=")
            if not sep or not key.isidentifier():
                p.error(f"--method-option: expected METHOD:KEY=VALUE, got {text!r}")
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            mo.setdefault(name, {})[key] = value
        cfg = replace(cfg, method_options=mo)
    methods = _csv(args.methods) or available()
    unknown = [m for m in methods if m not in available()]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(available())}")
    tp_imps = _csv(args.tp) or []
    tp_scopes = _csv(args.tp_scopes) or []
    for v, allowed, what in ((tp_imps, TP_IMPORTANCES, "--tp"), (tp_scopes, TP_SCOPES,
                                                                    "--tp-scopes")):
        bad = [x for x in v if x not in allowed]
        if bad:
            p.error(f"{what}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if tp is None and tp_imps and args.part != "none":
        print(f"NOTE: torch_pruning is not installed: the Torch-Pruning rows are skipped. "
              f"Install it with: {TP_INSTALL}", flush=True)
    if args.reference in available() and args.reference not in methods:
        print(f"NOTE: '{args.reference}' is not among --methods: no Spearman column", flush=True)

    if args.work:
        work = Path(args.work)
    else:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="aofp-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), "command": "python bench/compare.py " + " ".join(argv),
              "available": available(), "torch_pruning": tp_version(),
              "reference": args.reference, "load_start": load()}
    results: dict = {**header, "config": asdict(cfg)}
    for path in args.merge or []:
        earlier = json.loads(Path(path).read_text())
        for part in MODELS:
            if earlier.get(part):  # (older files kept the run's details at the top level)
                results[part] = {**{k: earlier.get(k) for k in (
                    "config", "date", "command", "available", "load_start")}, **earlier[part]}
                results.setdefault("merged", []).append(
                    f"{part}: {earlier[part].get('date', earlier.get('date'))}, from {path}")
    parts = {"all": ["lenet", "resnet"], "none": []}.get(args.part, [args.part])
    for part in parts:
        results[part] = run_part(part, cfg, work, methods, tp_imps if tp else [], tp_scopes,
                                 header)
    results["load_end"] = load()
    for part in MODELS:
        if results.get(part):
            annotate(results[part], args.reference)
    _dump(work / "compare-results.json", results)
    png = None
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if plot(results, out.with_suffix(".png")):
            png = out.with_suffix(".png").name
    md = markdown(results, png)
    print("\n" + md)
    if args.out:
        Path(args.out).write_text(md)
        print(f"wrote {args.out}" + (f" and {png}" if png else "")
              + f" (raw results: {work / 'compare-results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
