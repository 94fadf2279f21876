"""``prune()``: AOFP filter pruning end to end, as a short pipeline of named parts.

settings (:mod:`.settings`) -> plan: targets, followers, MACs (:mod:`.plan`) -> resume or start
(:mod:`.run_checkpoint`) -> select: the AOFP search (:mod:`.search_loop`) or a criterion
(:mod:`.criterion`) -> cut (:mod:`.cut`) -> finetune (:mod:`.finetune`) -> report
(:mod:`.report`). The model trains on its task loss with the base masks applied (the *normal
path*); every step, every target layer that has started draws ``masks_per_step`` pruning
attempts and prices them all at once with :func:`aofp_ext.ops.masked_damage` on its follower
(the *attempt paths*: the same weights, no gradient); :mod:`aofp_ext.search` turns the damages
into the authors' binary search; when the model's MACs reach ``target_flops`` the masked filters
are cut for real with :func:`aofp_ext.prune_channels_`, and the model is optionally finetuned.
See docs/prune.md and docs/architecture.md.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as ddist
from ..graph import Inputs, _as_tuple
from .batches import Batches
from .common import NonFiniteLossError, accuracy, evaluate, model_device, sgd
from .criterion import select_by_criterion
from .cut import cut, redo_cut
from .finetune import finetune
from .plan import make_plan
from .report import build_report, measure_latency, write_outputs
from .run_checkpoint import CHECKPOINT_NAME, RunCheckpoint, start_or_resume
from .search_loop import AofpSearch
from .settings import Settings

__all__ = ["prune", "PruneResult", "NonFiniteLossError", "accuracy", "CHECKPOINT_NAME"]

_CHECKPOINT_SECONDS = 60.0  # checkpoint_every=None: save when this long since the last save
_Batches = Batches  # the former name (tests/test_distributed.py)


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


@ddist.clear_errors
def prune(
    model: nn.Module,
    train_loader: Iterable,
    *,
    example_inputs: Inputs,
    target_flops: float = 0.5,
    method: str = "aofp",
    masks_per_step: int = 64,
    thresh: float = 0.05,
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
    latency: bool = True,
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
        thresh: a half is pruned when its largest average damage is below this. Default 0.05:
            the authors used 0.01 for ResNet/VGG, which on the shipped ResNet-56 still stood at
            69 % of the MACs after 2,000 steps, where 0.05 reaches 50 % in 310 (docs/prune.md).
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
        latency: time the pruned model's inference against the original's, side by side in
            one run (:func:`aofp_ext.latency.compare`: eval mode, interleaved forwards, the
            median of 10 after 2 warm-up ones, at batch 1 and the training batch; threads and
            timer stated) into ``report["latency"]``. It keeps a copy of the original model
            (its weights, on ``device``) for the run and costs about 20 forwards of each model
            per batch size; ``False``: none of it (``report["latency"]`` is ``None``).

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
    s = Settings.validate(
        method=method, method_options=method_options, calibration_batches=calibration_batches,
        target_flops=target_flops, masks_per_step=masks_per_step, iters_per_half=iters_per_half,
        warmup_iters=warmup_iters, max_steps=max_steps, checkpoint_every=checkpoint_every,
        finetune_epochs=finetune_epochs, thresh=thresh, lr=lr, finetune_lr=finetune_lr,
        bn_mode=bn_mode, targets=targets, seed=seed)
    dev = torch.device(device) if device is not None else model_device(model)
    example, was_training = _to_device(model, example_inputs, dev), model.training
    original = copy.deepcopy(model) if latency else None   # the reference of the latency
    plan = make_plan(model, example, s)
    s.check_same_on_every_rank(plan.config, optimizer is None, checkpoint_dir)
    own_optimizer = optimizer is None
    optimizer = sgd(model, lr) if own_optimizer else optimizer
    gen = torch.Generator().manual_seed(seed)  # draws the attempts
    store = RunCheckpoint(checkpoint_dir)
    run = start_or_resume(store, plan.config, seed, lambda: evaluate(model, eval_fn))

    batches = Batches(train_loader, example, dev)
    if run.phase == "search":
        if run.saved is not None:
            run.restore_search(model, optimizer, plan.targets, batches, gen,
                               lr if own_optimizer else None)
        if s.criterion is not None:  # select: by a criterion, or by the AOFP search
            calibration = (batches if calibration_loader is None
                           else Batches(calibration_loader, example, dev))
            select_by_criterion(model, plan, s, run, calibration, loss_fn, dev,
                                progress and ddist.is_main())
        else:
            AofpSearch(model, plan, s, run, optimizer, loss_fn, batches, gen, store, dev,
                       callback=callback, checkpoint_seconds=_CHECKPOINT_SECONDS,
                       progress=progress and ddist.is_main()).run()
        cut(model, plan, s, run, optimizer, example, eval_fn, store, train_loader)
    else:
        redo_cut(model, run, example)
    if run.phase == "finetune":
        finetune(model, train_loader, example, dev, s, run, store, loss_fn, eval_fn, progress)

    model.train(was_training)
    report = build_report(model, example, plan, s, run, dev)
    report["latency"] = (measure_latency(original, model, example, batches)
                         if original is not None else None)
    if out_dir is not None and ddist.is_main():
        write_outputs(model, report, out_dir)
    ddist.note("the end")
    ddist.barrier()  # distributed: rank 0 has written everything when prune returns anywhere
    return PruneResult(model, report)


def _to_device(model: nn.Module, example_inputs: Inputs,
               device: torch.device) -> tuple[torch.Tensor, ...]:
    """Moves ``model`` to ``device``; returns the example inputs there, as a tuple."""
    model.to(device)
    return tuple(t.to(device) for t in _as_tuple(example_inputs))
