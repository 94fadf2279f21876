"""The cut: the channels the selection masked are removed for real
(:func:`aofp_ext.prune_channels_`), and the run moves to its finetune phase (a checkpoint).
A run resumed after the cut repeats it from the recorded keep-sets."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from .. import distributed as ddist
from ..surgery import prune_channels_
from .batches import loader_generator, rng_state
from .common import evaluate
from .plan import Plan
from .run_checkpoint import RunCheckpoint, RunState
from .settings import Settings

__all__ = ["cut", "redo_cut"]


def cut(model: nn.Module, plan: Plan, s: Settings, run: RunState,
        optimizer: torch.optim.Optimizer, example: tuple[torch.Tensor, ...],
        eval_fn: Callable[[nn.Module], float] | None, store: RunCheckpoint,
        train_loader: Iterable) -> None:
    """Cut every target to its keep-set (``optimizer``'s state follows), record the outcome in
    ``run.info``, and save the first finetune-phase checkpoint."""
    ddist.note("the cut")
    ddist.sync_buffers(model)  # rank 0's BN statistics everywhere: identical models
    if run.stop_reason == "max_steps" and ddist.is_main():
        warnings.warn(f"AOFP search stopped at max_steps={s.max_steps} with the model at "
                      f"{plan.macs.current() / plan.macs.total:.3f} of its MACs, above "
                      f"target_flops={s.target_flops}", stacklevel=3)  # the caller of prune()
    keep = {t.name: t.search.alive.nonzero().flatten() for t in plan.targets
            if t.search.width < t.group.size}
    if keep:
        prune_channels_(model, keep, optimizer=optimizer, example_inputs=example)
    info = run.info
    info["macs_search_estimate"] = plan.macs.current()
    info["widths_after"] = {t.name: t.search.width for t in plan.targets}
    info["plan"] = {k: v.clone() for k, v in keep.items()}
    info["accuracy_after_search"] = evaluate(model, eval_fn)
    info["stop_reason"] = run.stop_reason
    info["steps"] = run.step
    run.phase = "finetune"
    store.save(run.cut_snapshot(model, None, 0, rng=rng_state(loader_generator(train_loader))))


def redo_cut(model: nn.Module, run: RunState, example: tuple[torch.Tensor, ...]) -> None:
    """A run resumed after the cut: cut the fresh model as recorded, load the saved weights."""
    keep = dict(run.info["plan"])
    if keep:
        prune_channels_(model, keep, example_inputs=example)
    model.load_state_dict(run.saved["model"])
