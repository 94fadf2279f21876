"""The finetune after the cut: SGD (momentum 0.9, weight decay 1e-4 on weights), the learning
rate on a cosine from ``finetune_lr`` to 0 per step, a checkpoint after every epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from .. import distributed as ddist
from .batches import Batches, loader_generator, rng_state, set_rng_state
from .common import NonFiniteLossError, evaluate, progress_bar, sgd
from .run_checkpoint import RunCheckpoint, RunState
from .settings import Settings

__all__ = ["finetune"]


def finetune(model: nn.Module, loader: Iterable, example: tuple[torch.Tensor, ...],
             device: torch.device, s: Settings, run: RunState, store: RunCheckpoint,
             loss_fn: Callable, eval_fn: Callable[[nn.Module], float] | None,
             progress: bool) -> None:
    """The finetune phase: ``s.finetune_epochs`` epochs over ``loader`` (continuing a resumed
    run's), the accuracy after, the run done (its last checkpoint)."""
    _epochs(model, loader, example, device, s, run, store, loss_fn, progress)
    run.info["accuracy_after_finetune"] = (evaluate(model, eval_fn) if s.finetune_epochs
                                           else run.info.get("accuracy_after_search"))
    run.phase = "done"
    store.save(run.cut_snapshot(model, None, s.finetune_epochs))


def _epochs(model: nn.Module, loader: Iterable, example: tuple[torch.Tensor, ...],
            device: torch.device, s: Settings, run: RunState, store: RunCheckpoint,
            loss_fn: Callable, progress: bool) -> None:
    """The epochs not yet done; a checkpoint after each."""
    if s.finetune_epochs == 0:
        return
    opt = sgd(model, s.finetune_lr)
    first = _resume(opt, run, loader)
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    schedule = _Cosine(s.finetune_lr, s.finetune_epochs, per_epoch)
    batches = Batches(loader, example, device)
    t0, base = time.perf_counter(), run.timing["finetune"]
    net = ddist.wrap(model, device)  # a new DDP: the cut changed the parameters' shapes
    with progress_bar(progress and ddist.is_main(), total=schedule.total,
                      initial=first * (per_epoch or 0), desc="finetune", unit="step") as bar:
        for epoch in range(first, s.finetune_epochs):
            ddist.note(f"finetune epoch {epoch}")
            for i, (inputs, labels) in enumerate(batches.epoch_batches(epoch)):
                schedule.set(opt, epoch, i)
                loss = _train_step(net, opt, loss_fn, inputs, labels, epoch, store)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}",
                                lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
            run.timing["finetune"] = base + time.perf_counter() - t0
            ddist.sync_buffers(model)  # the state of rank 0 is the checkpoint of every rank
            store.save(run.cut_snapshot(model, opt, epoch + 1,
                                        rng=rng_state(loader_generator(loader))))
    run.timing["finetune"] = base + time.perf_counter() - t0


def _resume(opt: torch.optim.Optimizer, run: RunState, loader: Iterable) -> int:
    """The first epoch to run: after those a resumed finetune-phase checkpoint holds (its
    optimizer and RNG state restored), else 0."""
    saved = run.saved if run.saved is not None and run.saved["phase"] == "finetune" else None
    if saved is None:
        return 0
    if saved["optimizer"] is not None:
        opt.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], loader_generator(loader))
    return int(saved["epoch"])


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable,
                inputs: tuple[torch.Tensor, ...], labels: Any, epoch: int,
                store: RunCheckpoint) -> torch.Tensor:
    net.train()
    loss = loss_fn(net(*inputs), labels)
    if not ddist.all_finite(loss.detach()):
        raise NonFiniteLossError(
            f"the loss is {float(loss.detach().float().mean())} in finetune epoch "
            f"{epoch}: finetuning stopped"
            + (f" (the state after epoch {epoch} - 1 is in {store.path})"
               if store.path is not None else "") + "; lower finetune_lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


class _Cosine:
    """lr = ``lr`` * (1 + cos(pi * done)) / 2, ``done`` the fraction of the finetune's steps
    taken (of its epochs when the loader has no length)."""

    def __init__(self, lr: float, epochs: int, per_epoch: int | None):
        self.lr, self.epochs, self.per_epoch = lr, epochs, per_epoch
        self.total = epochs * per_epoch if per_epoch else None

    def set(self, opt: torch.optim.Optimizer, epoch: int, i: int) -> None:
        frac = (((epoch * self.per_epoch + i) / self.total) if self.total
                else (epoch / self.epochs))
        for group in opt.param_groups:
            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * frac))
