"""``prune()``: AOFP filter pruning end to end.

The model trains on its task loss with the base masks applied (the *normal path*); every step,
every target layer that has started draws ``masks_per_step`` pruning attempts and prices them
all at once with :func:`aofp_ext.ops.masked_damage` on its follower (the *attempt paths*: the
same weights, no gradient); :mod:`aofp_ext.search` turns the damages into the authors' binary
search; when the model's MACs reach ``target_flops`` the masked filters are cut for real with
:func:`aofp_ext.prune_channels_`, and the model is optionally finetuned. See docs/prune.md.

Hooks: the base masks are applied at the input of every consumer (the conv/Linear that reads a
target's channels) by a forward pre-hook, which is exactly equivalent to zeroing them at the
group's mask point (the graph analysis guarantees that only zero-preserving ops lie between the
two) and also works where the mask point is a function rather than a module, or where a group
has none (coupled groups with ``targets="all"``). The same hooks capture the follower's input
for pricing, and the follower's unmasked output norm ``||Y_base||^2``.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as ddist
from .flops import count_flops
from .graph import Inputs, _as_tuple, analyze
from .pricing import (MacsModel, Target, base_keep, build_targets, price,
                      select_targets)
from .criteria import SelectionContext, get_criterion
from .search import LayerSearch, default_iters_per_half, default_warmup_iters, start_steps
from .surgery import prune_channels_

__all__ = ["prune", "PruneResult", "NonFiniteLossError", "accuracy"]

CHECKPOINT_NAME = "aofp-checkpoint.pt"
_FORMAT = "aofp_ext.prune_checkpoint"
_VERSION = 1
_BN_MODES = ("batch", "running")
_CHECKPOINT_SECONDS = 60.0  # checkpoint_every=None: save when this long since the last save


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped (and saved a checkpoint)."""


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: the pruned model (the object passed to ``prune``, cut in place).
        report: widths before/after per group, MACs and params before/after, steps, seconds,
            the per-layer move history, accuracies (see docs/prune.md for every key).
    """

    model: nn.Module
    report: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Data, RNG and checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos),
                          int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover
        pass
    if gen is not None:
        state["gen"] = gen.get_state()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if gen is not None and "gen" in state:
        gen.set_state(state["gen"])


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _loader_generator(loader: Iterable) -> torch.Generator | None:
    """A DataLoader's own ``generator`` (it decides the shuffling order), if it has one."""
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


class _Batches:
    """Cycles through ``loader`` epoch after epoch, remembering where it is, so that a resumed
    run sees the same batches: the RNG state at the start of the epoch (which decides a shuffling
    DataLoader's order) and the batches consumed since."""

    def __init__(self, loader: Iterable, example: tuple[torch.Tensor, ...],
                 device: torch.device):
        self.loader, self.example, self.device = loader, example, device
        self.epoch, self.index = 0, 0
        self.it: Any = None
        self.epoch_rng: dict[str, Any] | None = None

    def _loader_gen(self) -> torch.Generator | None:
        return _loader_generator(self.loader)

    def _set_sampler_epoch(self) -> None:
        """A sampler with ``set_epoch`` (``DistributedSampler``) shuffles by epoch number."""
        sampler = getattr(self.loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(self.epoch)

    def _start_epoch(self) -> None:
        self.epoch_rng = _rng_state(self._loader_gen())
        self._set_sampler_epoch()
        self.it = iter(self.loader)

    def next(self) -> tuple[tuple[torch.Tensor, ...], Any]:
        if self.it is None:
            self._start_epoch()
        try:
            batch = next(self.it)
        except StopIteration:
            if self.index == 0:
                raise ValueError("train_loader yields no batches") from None
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
            try:
                batch = next(self.it)
            except StopIteration:
                raise ValueError("train_loader yields no batches") from None
        self.index += 1
        return self.check(batch)

    def check(self, batch: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("train_loader must yield (inputs, targets) pairs, got a "
                             f"{type(batch).__name__}"
                             + (f" of length {len(batch)}" if hasattr(batch, '__len__') else ""))
        inputs, labels = batch[0], batch[1]
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        if len(inputs) != len(self.example) or not all(
                isinstance(t, torch.Tensor) for t in inputs):
            raise ValueError(f"train_loader yields {len(inputs)} input tensor(s); the model "
                             f"takes {len(self.example)} (as example_inputs)")
        for i, (t, e) in enumerate(zip(inputs, self.example)):
            if t.dim() != e.dim() or t.shape[1:] != e.shape[1:]:
                raise ValueError(
                    f"train_loader yields inputs of shape {tuple(t.shape)} (batch "
                    f"{self.index} of epoch {self.epoch}, input {i}), but example_inputs has "
                    f"{tuple(e.shape)}: each sample must be {tuple(e.shape[1:])}")
            if t.dtype.is_floating_point != e.dtype.is_floating_point:
                raise ValueError(f"train_loader yields inputs of dtype {t.dtype}, "
                                 f"example_inputs has {e.dtype}")
        if isinstance(labels, torch.Tensor) and labels.dim() > 0 and (
                labels.shape[0] != inputs[0].shape[0]):
            raise ValueError(f"train_loader yields {inputs[0].shape[0]} inputs but "
                             f"{labels.shape[0]} targets in one batch")
        return _to(inputs, self.device), _to(labels, self.device)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "epoch_rng": self.epoch_rng}

    def restore(self, state: dict[str, Any]) -> None:
        """Re-create the iterator of the saved epoch and skip the batches already used. The
        caller restores the step's RNG state afterwards."""
        self.epoch, self.index, self.epoch_rng = state["epoch"], 0, state["epoch_rng"]
        self.it = None
        if self.epoch_rng is None:
            return
        _set_rng_state(self.epoch_rng, self._loader_gen())
        self._set_sampler_epoch()
        self.it = iter(self.loader)
        for _ in range(state["index"]):
            try:
                next(self.it)
            except StopIteration:
                raise ValueError("resuming: train_loader yields fewer batches per epoch than "
                                 "in the interrupted run; resume with the same loader") from None
            self.index += 1


class _Checkpoints:
    """In a distributed run only rank 0 reads and writes the file: a checkpoint holds every
    rank's data position and RNG state (``"ranks"``), and on resume rank 0 hands it to every
    rank, each taking its own entry."""

    def __init__(self, folder: str | os.PathLike | None):
        self.path = Path(folder) / CHECKPOINT_NAME if folder is not None else None
        if self.path is not None and ddist.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, Any] | None:
        if self.path is None:
            return None
        state = ddist.broadcast_call(self._load)
        ranks = state.get("ranks") if state is not None else None
        if ranks is not None and len(ranks) == ddist.world_size():
            state = {**state, **{k: v for k, v in ranks[ddist.rank()].items() if v is not None}}
        return state

    def _load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{self.path} is not an aofp_ext.prune checkpoint")
        if state.get("version") != _VERSION:
            raise ValueError(f"{self.path}: unsupported checkpoint version {state.get('version')}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Atomic: a temporary file in the same folder, then ``os.replace``. Distributed: every
        rank must call it at the same step; rank 0 writes."""
        if self.path is None:
            return
        if ddist.is_distributed():
            ranks = ddist.all_gather({"rng": state.get("rng"), "loader": state.get("loader")})
            if not ddist.is_main():
                return
            state = {**state, "ranks": ranks}
        state = {"format": _FORMAT, "version": _VERSION, **state}
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    """The authors' optimizer: SGD, momentum 0.9, weight decay 1e-4 on weights, 0 on BN and
    biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                            {"params": rest, "weight_decay": 0.0}], lr=lr, momentum=0.9)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], float] | None) -> float | None:
    if eval_fn is None:
        return None
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return float(eval_fn(model))
    finally:
        for m, mode in modes:
            m.training = mode


def accuracy(loader: Iterable, device: str | torch.device | None = None
             ) -> Callable[[nn.Module], float]:
    """An ``eval_fn`` for :func:`prune`: top-1 accuracy (percent) of the model over ``loader``
    (``(inputs, labels)`` batches), on ``device`` (default: the model's)."""

    def eval_fn(model: nn.Module) -> float:
        dev = torch.device(device) if device is not None else _model_device(model)
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                out = model(_to(x, dev))
                correct += int((out.argmax(dim=1).cpu() == y).sum())
                total += int(y.numel())
        return 100.0 * correct / max(total, 1)

    return eval_fn


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _config(targets: list[Target], **kw: Any) -> dict[str, Any]:
    return {"targets": [[t.name, t.group.size] for t in targets], **kw}


# --------------------------------------------------------------------------------------------
# prune()
# --------------------------------------------------------------------------------------------


@ddist.clear_errors
def prune(
    model: nn.Module,
    train_loader: Iterable,
    *,
    example_inputs: Inputs,
    target_flops: float = 0.5,
    method: str = "aofp",
    masks_per_step: int = 64,
    thresh: float = 0.01,
    iters_per_half: int | None = None,
    warmup_iters: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    targets: str | Sequence[str] = "auto",
    max_steps: int | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    eval_fn: Callable[[nn.Module], float] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    bn_mode: str = "batch",
    checkpoint_every: int | None = None,
    out_dir: str | os.PathLike | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    method_options: dict[str, Any] | None = None,
    calibration_batches: int = 8,
    calibration_loader: Iterable | None = None,
) -> PruneResult:
    """Prune the filters of ``model`` with AOFP until its MACs fall to ``target_flops``.

    Args:
        model: a trained CNN (``torch.fx``-traceable). Cut IN PLACE and returned as
            ``result.model``.
        train_loader: yields ``(inputs, targets)`` batches (re-iterated epoch after epoch).
        example_inputs: a tensor (or tuple) of the model's input shape; MACs are counted for it
            (pass a batch of one for per-image MACs).
        target_flops: stop when MACs <= this fraction of the MACs before, in (0, 1].
        method: ``"aofp"`` (the search) or a registered criterion
            (:func:`aofp_ext.criteria.available`; docs/methods.md): the criterion scores the
            channels on ``calibration_batches`` batches of ``train_loader`` (eval mode, no
            training) and the shared global ranking removes the lowest until ``target_flops``.
        masks_per_step: attempts per target layer per step (the authors: 1).
        thresh: a half is pruned when its largest average damage is below this.
        iters_per_half: steps per half; default ``ceil(1000 / masks_per_step)`` (each filter gets
            about as many attempts per half as with the authors' 1000 steps of one attempt).
        warmup_iters: steps before the first layer starts; default ``ceil(500 / masks_per_step)``.
        optimizer: the normal path's optimizer; default SGD(lr, momentum 0.9, weight decay 1e-4
            on weights, 0 on BN and biases), the authors' setting.
        lr: learning rate of the default optimizer (constant during the search).
        loss_fn: ``loss_fn(model_output, targets)``.
        targets: ``"auto"`` (every prunable conv group whose channels do not meet a residual add:
            the authors' rule), ``"all"`` (also groups coupled through adds; their damage is summed
            over all their consumers) or a list of group names.
        max_steps: stop the search after this many steps (default
            ``warmup + 200 * iters_per_half``) even if the target is not reached.
        finetune_epochs: epochs of SGD (momentum 0.9, cosine lr from ``finetune_lr`` to 0) after
            the cut.
        finetune_lr: the finetune's initial learning rate.
        eval_fn: ``eval_fn(model) -> float`` (e.g. :func:`accuracy`), reported before the search,
            after the cut and after finetuning; called in eval mode under ``no_grad``.
        device: where to run (default: the model's device).
        seed: seeds the attempt generator and, on a fresh run, torch's global RNG (data order,
            dropout).
        checkpoint_dir: folder for atomic periodic checkpoints; calling ``prune`` again with the
            same folder (and a fresh copy of the original model) resumes.
        progress: show tqdm progress bars.
        bn_mode: how a follower's BN is applied when pricing: ``"batch"`` (batch statistics, as
            the authors and as the normal path trains) or ``"running"`` (running statistics).
        checkpoint_every: save every this many search steps (default: every 60 seconds), and
            after every finetune epoch.
        out_dir: if given, ``report.json``, ``report.md``, ``widths.png`` (with matplotlib) and
            ``model.pt`` (:func:`aofp_ext.save`) are written there.
        callback: ``callback(step, info)`` after every search step (``info``: MACs fraction,
            loss, widths); an exception raised there stops the run (the last checkpoint stays).
        method_options: keyword arguments of the criterion (``method != "aofp"``), e.g.
            ``{"keep_prob": 0.7}`` for ``"lfe"``; recorded in the report.
        calibration_batches: batches a criterion reads (``method != "aofp"``).
        calibration_loader: where a criterion reads them (default: the first batches of
            ``train_loader``). Loss-based criteria need batches the model has not memorised:
            with a net that fits its training set, pass held-out or augmented data here.

    Under ``torch.distributed`` (a process group of several processes, e.g. ``torchrun``) every
    rank calls ``prune`` with the same arguments and its own shard of the data: the ranks train
    through DDP, sum their damages before every decision and take identical decisions; only rank
    0 writes files (docs/prune.md, "Distributed").

    Raises:
        ValueError: bad arguments, a loader yielding the wrong shapes, no prunable groups, a
            target below what the searched layers can reach, a checkpoint from other settings, or
            settings that differ between distributed ranks.
        NonFiniteLossError: the loss became NaN/inf (a checkpoint of the step before is saved).
        aofp_ext.distributed.DistributedError: a collective failed (another rank crashed or
            stopped responding within the process group's timeout).
    """
    # ---- arguments ------------------------------------------------------------------------
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {method!r}")
    criterion = None
    if method != "aofp":
        criterion = get_criterion(method, method_options)
    elif method_options:
        raise ValueError("method_options applies to the criteria (method != 'aofp'); the AOFP "
                         "search takes its settings as prune() arguments")
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or (
            calibration_batches < 1):
        raise ValueError(f"calibration_batches must be a positive integer, got "
                         f"{calibration_batches!r}")
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not (
            0 < target_flops <= 1):
        raise ValueError(f"target_flops must be a fraction in (0, 1] of the model's MACs, got "
                         f"{target_flops!r}")
    for v, n in ((masks_per_step, "masks_per_step"), (iters_per_half, "iters_per_half"),
                 (max_steps, "max_steps"), (checkpoint_every, "checkpoint_every")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{n} must be a positive integer, got {v!r}")
    if warmup_iters is not None and (not isinstance(warmup_iters, int) or warmup_iters < 0):
        raise ValueError(f"warmup_iters must be an integer >= 0, got {warmup_iters!r}")
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
    for v, n in ((thresh, "thresh"), (lr, "lr"), (finetune_lr, "finetune_lr")):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{n} must be a finite number >= 0, got {v!r}")
    if bn_mode not in _BN_MODES:
        raise ValueError(f"bn_mode must be one of {_BN_MODES}, got {bn_mode!r}")
    iph = iters_per_half if iters_per_half is not None else default_iters_per_half(masks_per_step)
    warmup = warmup_iters if warmup_iters is not None else default_warmup_iters(masks_per_step)
    step_limit = max_steps if max_steps is not None else warmup + 200 * iph

    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    example = tuple(t.to(dev) for t in _as_tuple(example_inputs))
    was_training = model.training

    # ---- targets, followers, MACs ---------------------------------------------------------
    analysis = analyze(model, example)
    groups = select_targets(analysis.groups, targets, model)
    starts = start_steps(len(groups), iph, warmup)
    searches = [LayerSearch(g.name, g.size, start=start, iters_per_half=iph, thresh=float(thresh))
                 for g, start in zip(groups, starts)]
    # criteria price followers on BN running statistics (they score without training)
    tgts, consumers = build_targets(model, analysis.gm, groups,
                                    bn_mode if criterion is None else "running", searches)
    macs_model = MacsModel(model, example, tgts)
    macs_before, params_before = count_flops(model, example)
    smallest = macs_model.smallest() / max(macs_model.total, 1)
    if target_flops < smallest:
        raise ValueError(
            f"target_flops={target_flops} cannot be reached: with one filter left in each of the "
            f"{len(tgts)} searched groups the model keeps {smallest:.3f} of its MACs (the rest "
            "is in layers that are not searched); raise target_flops or pass targets='all'")
    widths_before = {t.name: t.group.size for t in tgts}
    config = _config(tgts, masks_per_step=masks_per_step, iters_per_half=iph,
                     warmup_iters=warmup, thresh=float(thresh), target_flops=float(target_flops),
                     seed=seed, bn_mode=bn_mode, method=method)
    if criterion is not None:
        config["method_options"] = criterion.options()
        config["calibration_batches"] = calibration_batches
    if ddist.is_distributed():  # a checkpoint resumes with the same number of processes only
        config["world_size"] = ddist.world_size()
    ddist.check_same({**config, "max_steps": step_limit, "finetune_epochs": finetune_epochs,
                      "lr": lr, "finetune_lr": finetune_lr, "own_optimizer": optimizer is None,
                      "checkpoint_dir": checkpoint_dir is not None,
                      "checkpoint_every": checkpoint_every}, "prune() settings")

    if optimizer is None:
        optimizer = _sgd(model, lr)
        own_optimizer = True
    else:
        own_optimizer = False
    gen = torch.Generator().manual_seed(seed)
    ckpt = _Checkpoints(checkpoint_dir)
    saved = ckpt.load()
    history: list[dict[str, Any]] = []
    timing = {"search": 0.0, "finetune": 0.0}
    info: dict[str, Any] = {"resumed_from": None}

    if saved is not None:
        if saved["config"] != config:
            diff = [k for k in config if saved["config"].get(k) != config[k]]
            raise ValueError(
                f"{ckpt.path} holds a run with other settings ({', '.join(diff)} differ: "
                f"{ {k: saved['config'].get(k) for k in diff} } there, "
                f"{ {k: config[k] for k in diff} } here); use another checkpoint_dir, or the "
                "same settings and a fresh copy of the same original model to resume")
        history = list(saved["history"])
        timing = dict(saved["timing"])
        info = dict(saved["info"])
        info["resumed_from"] = f"{saved['phase']} step {saved['step']}"
    else:
        torch.manual_seed(seed)
        info["accuracy_before"] = _evaluate(model, eval_fn)

    phase = saved["phase"] if saved is not None else "search"
    step = int(saved["step"]) if saved is not None else 0
    loss_value = float("nan")
    stop_reason = saved.get("stop_reason") if saved is not None else None

    # ---- the search -----------------------------------------------------------------------
    if phase == "search":
        batches = _Batches(train_loader, example, dev)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if own_optimizer:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            for t, s in zip(tgts, saved["search"]):
                t.search.load_state_dict(s)
            batches.restore(saved["loader"])
            _set_rng_state(saved["rng"], gen)

        def update_keep() -> None:
            base_keep(tgts, consumers, [t.search.alive for t in tgts], dev)

        def snapshot(rng: dict[str, Any], loader_state: dict[str, Any]) -> dict[str, Any]:
            return {"phase": "search", "step": step, "config": config,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "search": [t.search.state_dict() for t in tgts], "loader": loader_state,
                    "rng": rng, "history": history, "timing": timing, "info": info,
                    "stop_reason": None}

        if criterion is not None:  # selection by a criterion instead of the AOFP search
            calib_src = (batches if calibration_loader is None
                         else _Batches(calibration_loader, example, dev))
            alive = _run_criterion(criterion, model, tgts, consumers, calib_src,
                                   calibration_batches, loss_fn, dev, seed, macs_model,
                                   target_flops, progress and ddist.is_main(), info, timing)
            # every rank scored its own calibration batches: rank 0's selection for all
            alive, info["selection"] = ddist.broadcast((alive, info.get("selection")))
            for t, a in zip(tgts, alive):
                t.search.alive = a.clone()
            stop_reason = "target"
        update_keep()
        macs_now = macs_model.current()
        if macs_now <= target_flops * macs_model.total:
            stop_reason = "target"
        handles = []
        for c in consumers.values():
            handles.append(c.module.register_forward_pre_hook(c.pre_hook))
            handles.append(c.module.register_forward_hook(c.post_hook))
        bar = _bar(progress and criterion is None and ddist.is_main(), total=step_limit,
                   initial=step, desc="AOFP search", unit="step")
        t_start, t_saved = time.perf_counter(), time.perf_counter()
        base_elapsed = timing["search"]
        net = ddist.wrap(model, dev)  # DDP when distributed (identical weights on every rank)
        try:
            while stop_reason is None:
                if step >= step_limit:
                    stop_reason = "max_steps"
                    break
                ddist.note(f"search step {step}")
                rng_before, loader_before = _rng_state(gen), batches.state()
                inputs, labels = batches.next()
                active = [t for t in tgts if t.search.active(step)]
                live = {id(link.consumer) for t in active for link in t.links}
                for c in consumers.values():
                    c.capture, c.calls = id(c) in live, []
                net.train()
                loss = loss_fn(net(*inputs), labels)
                if not ddist.all_finite(loss.detach()):  # on every rank: all stop together
                    state = snapshot(rng_before, loader_before)
                    state["nonfinite"] = True
                    ckpt.save(state)
                    where = (f"the state before this step is saved in {ckpt.path}; "
                             "resume from it with a lower lr" if ckpt.path is not None else
                             "pass checkpoint_dir= to keep the state of the step before")
                    raise NonFiniteLossError(
                        f"the loss is {float(loss.detach().float().mean())} at search step "
                        f"{step}: the search stopped ({where}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    drawn = [(t, t.search.draw(masks_per_step, gen)) for t in active]
                    parts = [price(t, masks.to(dev), parts=True) for t, masks in drawn]
                    # distributed: damage sums and norms of every rank's batch, summed
                    for (t, masks), (damage, base) in zip(drawn, ddist.sum_damages(parts)):
                        tt = damage / max(base, 1e-30)
                        if not bool(torch.isfinite(tt).all()):
                            raise NonFiniteLossError(
                                f"non-finite damage for '{t.name}' at step {step}: the "
                                "follower's activations are not finite")
                        t.search.record(masks, tt)
                optimizer.step()
                for c in consumers.values():
                    c.capture, c.calls = False, []
                loss_value = float(loss.detach())
                pruned_now = False
                for t in tgts:
                    move = t.search.end_step(step)
                    if move is None:
                        continue
                    history.append(move.as_dict())
                    if move.action == "prune":
                        pruned_now = True
                        macs_now = macs_model.current()
                        if macs_now <= target_flops * macs_model.total:
                            stop_reason = "target"
                            break
                if pruned_now:
                    update_keep()
                step += 1
                timing["search"] = base_elapsed + time.perf_counter() - t_start
                frac = macs_now / max(macs_model.total, 1)
                removed = sum(t.group.size - t.search.width for t in tgts)
                bar.update(1)
                bar.set_postfix(macs=f"{frac:.3f}", pruned=removed, loss=f"{loss_value:.3f}",
                                refresh=False)
                now = time.perf_counter()
                if ckpt.path is not None and stop_reason is None and (
                        (checkpoint_every is not None and step % checkpoint_every == 0)
                        or (checkpoint_every is None
                            and ddist.agree(now - t_saved >= _CHECKPOINT_SECONDS))):
                    ckpt.save(snapshot(_rng_state(gen), batches.state()))
                    t_saved = now
                if callback is not None:
                    callback(step, {"macs_fraction": frac, "loss": loss_value,
                                    "widths": {t.name: t.search.width for t in tgts}})
        finally:
            net = model  # drops the DDP wrapper (its hooks) even when an exception propagates
            for h in handles:
                h.remove()
            for c in consumers.values():
                c.capture, c.calls, c.keep = False, [], None
            bar.close()
        ddist.note("the cut")
        ddist.sync_buffers(model)  # rank 0's BN statistics everywhere: identical models
        if stop_reason == "max_steps" and ddist.is_main():
            warnings.warn(f"AOFP search stopped at max_steps={step_limit} with the model at "
                          f"{macs_model.current() / macs_model.total:.3f} of its MACs, above "
                          f"target_flops={target_flops}", stacklevel=2)

        # ---- the cut ----------------------------------------------------------------------
        plan = {t.name: t.search.alive.nonzero().flatten() for t in tgts
                if t.search.width < t.group.size}
        if plan:
            prune_channels_(model, plan, optimizer=optimizer, example_inputs=example)
        info["macs_search_estimate"] = macs_model.current()
        info["widths_after"] = {t.name: t.search.width for t in tgts}
        info["plan"] = {k: v.clone() for k, v in plan.items()}
        info["accuracy_after_search"] = _evaluate(model, eval_fn)
        info["stop_reason"] = stop_reason
        info["steps"] = step
        phase = "finetune"
        ft_state: dict[str, Any] | None = None
        ckpt.save(_finetune_state(model, None, 0, step, config, history, timing, info,
                                  rng=_rng_state(_loader_generator(train_loader))))
    else:
        plan = dict(saved["info"]["plan"])
        if plan:
            prune_channels_(model, plan, example_inputs=example)
        model.load_state_dict(saved["model"])
        ft_state = saved if phase == "finetune" else None

    # ---- finetune -------------------------------------------------------------------------
    if phase == "finetune":
        _finetune(model, train_loader, example, dev, finetune_epochs, finetune_lr, loss_fn,
                  ft_state, ckpt, config, step, history, timing, info, progress)
        info["accuracy_after_finetune"] = (_evaluate(model, eval_fn) if finetune_epochs else
                                           info.get("accuracy_after_search"))
        phase = "done"
        ckpt.save(_finetune_state(model, None, finetune_epochs, step, config, history, timing,
                                  info, phase="done"))

    model.train(was_training)
    macs_after, params_after = count_flops(model, example)
    report = _report(model, tgts, widths_before, info, history, timing, config,
                     macs_before, params_before, macs_after, params_after, target_flops,
                     finetune_epochs, dev, step_limit)
    if out_dir is not None and ddist.is_main():
        from .checkpoint import save
        from .report import write_report

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save(model, Path(out_dir) / "model.pt")
        write_report(report, out_dir)
    ddist.note("the end")
    ddist.barrier()  # distributed: rank 0 has written everything when prune returns anywhere
    return PruneResult(model, report)


def _run_criterion(criterion: Any, model: nn.Module, tgts: list[Target], consumers: dict,
                   batches: _Batches, n_batches: int, loss_fn: Callable, dev: torch.device,
                   seed: int, macs_model: MacsModel, target_flops: float, progress: bool,
                   info: dict, timing: dict) -> list[torch.Tensor]:
    """Score with ``criterion`` on ``n_batches`` calibration batches and select keep-sets."""
    t0 = time.perf_counter()
    calib = [batches.next() for _ in range(n_batches)] if criterion.needs_data else []
    gen = torch.Generator().manual_seed(seed)
    ctx = SelectionContext(model, tgts, consumers, calib, loss_fn, dev, gen, macs_model,
                           progress=progress)
    alive = criterion.select(ctx, target_flops)
    if len(alive) != len(tgts) or any(a.shape != (t.group.size,) or a.dtype != torch.bool
                                      or not bool(a.any()) for a, t in zip(alive, tgts)):
        raise ValueError(f"criterion {criterion.name!r} returned invalid keep-sets (one bool "
                         "tensor per target, at least one channel kept in each)")
    timing["search"] = time.perf_counter() - t0
    extra = {k: v for k, v in ctx.info.items() if k != "scores"}
    info["selection"] = {"method": criterion.name, "options": criterion.options(),
                         "calibration_batches": len(calib), "seconds": timing["search"],
                         **extra}
    if "scores" in ctx.info:
        info["selection"]["scores"] = {t.name: [float(v) for v in s]
                                       for t, s in zip(tgts, ctx.info["scores"])}
    return alive


def _bar(progress: bool, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, file=sys.stderr, **kw)


def _finetune_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int,
                    step: int, config: dict, history: list, timing: dict, info: dict,
                    phase: str = "finetune", rng: dict | None = None) -> dict[str, Any]:
    return {"phase": phase, "step": step, "config": config, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "epoch": epoch, "rng": rng if rng is not None else _rng_state(),
            "history": history, "timing": timing, "info": info, "stop_reason": info.get(
                "stop_reason")}


def _finetune(model: nn.Module, loader: Iterable, example: tuple[torch.Tensor, ...],
              dev: torch.device, epochs: int, lr: float, loss_fn: Callable, saved: dict | None,
              ckpt: _Checkpoints, config: dict, step: int, history: list, timing: dict,
              info: dict, progress: bool) -> None:
    """SGD (momentum 0.9, weight decay 1e-4 on weights), lr cosine from ``lr`` to 0 per step;
    a checkpoint after every epoch."""
    if epochs == 0:
        return
    opt = _sgd(model, lr)
    first = 0
    if saved is not None:
        first = int(saved["epoch"])
        if saved["optimizer"] is not None:
            opt.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"], _loader_generator(loader))
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    total = epochs * per_epoch if per_epoch else None
    bar = _bar(progress and ddist.is_main(), total=total, initial=first * (per_epoch or 0),
               desc="finetune", unit="step")
    batches = _Batches(loader, example, dev)
    t0, base = time.perf_counter(), timing["finetune"]
    net = ddist.wrap(model, dev)  # a new DDP: the cut changed the parameters' shapes
    try:
        for epoch in range(first, epochs):
            ddist.note(f"finetune epoch {epoch}")
            batches.epoch, batches.index, batches.it = epoch, 0, None
            batches._start_epoch()
            i = 0
            while True:
                try:
                    batch = next(batches.it)
                except StopIteration:
                    break
                inputs, labels = batches.check(batch)
                frac = ((epoch * per_epoch + i) / total) if total else (epoch / epochs)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
                net.train()
                loss = loss_fn(net(*inputs), labels)
                if not ddist.all_finite(loss.detach()):
                    raise NonFiniteLossError(
                        f"the loss is {float(loss.detach().float().mean())} in finetune epoch "
                        f"{epoch}: finetuning stopped"
                        + (f" (the state after epoch {epoch} - 1 is in {ckpt.path})"
                           if ckpt.path is not None else "") + "; lower finetune_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                i += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}",
                                lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
            timing["finetune"] = base + time.perf_counter() - t0
            ddist.sync_buffers(model)  # the state of rank 0 is the checkpoint of every rank
            ckpt.save(_finetune_state(model, opt, epoch + 1, step, config, history, timing, info,
                                      rng=_rng_state(_loader_generator(loader))))
    finally:
        net = model  # drops the DDP wrapper
        bar.close()
    timing["finetune"] = base + time.perf_counter() - t0


def _report(model: nn.Module, tgts: list[Target], widths_before: dict[str, int],
            info: dict, history: list, timing: dict, config: dict, macs_before: int,
            params_before: int, macs_after: int, params_after: int, target_flops: float,
            finetune_epochs: int, dev: torch.device, step_limit: int) -> dict[str, Any]:
    widths_after = dict(info["widths_after"])
    return {
        "model": type(model).__name__,
        "method": config["method"],
        "selection": info.get("selection"),
        "settings": {k: v for k, v in config.items() if k != "targets"}
        | {"max_steps": step_limit, "finetune_epochs": finetune_epochs},
        "device": str(dev),
        "targets": list(widths_before),
        "widths_before": widths_before,
        "widths_after": widths_after,
        "channels_pruned": sum(widths_before[k] - widths_after[k] for k in widths_before),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_fraction": macs_after / max(macs_before, 1),
        "params_before": params_before,
        "params_after": params_after,
        "target_flops": target_flops,
        "reached_target": macs_after <= target_flops * macs_before,
        "stop_reason": info.get("stop_reason"),
        "steps": info.get("steps"),
        "search_seconds": timing["search"],
        "finetune_seconds": timing["finetune"],
        "accuracy_before": info.get("accuracy_before"),
        "accuracy_after_search": info.get("accuracy_after_search"),
        "accuracy_after_finetune": info.get("accuracy_after_finetune"),
        "resumed_from": info.get("resumed_from"),
        "history": list(history),
    }
