"""Selection by a criterion (``method != "aofp"``) instead of the AOFP search: the criterion
scores the channels on calibration batches and picks the keep-sets in one go (no training);
see :mod:`aofp_ext.criteria` and docs/methods.md."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .. import distributed as ddist
from ..criteria import SelectionContext
from .batches import Batches
from .plan import Plan
from .run_checkpoint import RunState
from .settings import Settings

__all__ = ["select_by_criterion"]


def select_by_criterion(model: nn.Module, plan: Plan, s: Settings, run: RunState,
                        calibration: Batches, loss_fn: Callable, device: torch.device,
                        progress: bool) -> None:
    """Every target's keep-set (``t.search.alive``) from ``s.criterion`` on
    ``s.calibration_batches`` batches of ``calibration``; ``run.info["selection"]`` says how.
    Distributed: every rank scores its own batches; rank 0's selection is taken by all."""
    alive = _select(model, plan, s, run, calibration, loss_fn, device, progress)
    alive, run.info["selection"] = ddist.broadcast((alive, run.info.get("selection")))
    for t, a in zip(plan.targets, alive):
        t.search.alive = a.clone()
    run.stop_reason = "target"


def _select(model: nn.Module, plan: Plan, s: Settings, run: RunState, calibration: Batches,
            loss_fn: Callable, device: torch.device, progress: bool) -> list[torch.Tensor]:
    criterion, tgts = s.criterion, plan.targets
    t0 = time.perf_counter()
    calib = ([calibration.next() for _ in range(s.calibration_batches)]
             if criterion.needs_data else [])
    gen = torch.Generator().manual_seed(s.seed)
    ctx = SelectionContext(model, tgts, plan.consumers, calib, loss_fn, device, gen, plan.macs,
                           progress=progress)
    alive = criterion.select(ctx, s.target_flops)
    if len(alive) != len(tgts) or any(a.shape != (t.group.size,) or a.dtype != torch.bool
                                      or not bool(a.any()) for a, t in zip(alive, tgts)):
        raise ValueError(f"criterion {criterion.name!r} returned invalid keep-sets (one bool "
                         "tensor per target, at least one channel kept in each)")
    run.timing["search"] = time.perf_counter() - t0
    extra = {k: v for k, v in ctx.info.items() if k != "scores"}
    run.info["selection"] = {"method": criterion.name, "options": criterion.options(),
                             "calibration_batches": len(calib),
                             "seconds": run.timing["search"], **extra}
    if "scores" in ctx.info:
        run.info["selection"]["scores"] = {t.name: [float(v) for v in sc]
                                           for t, sc in zip(tgts, ctx.info["scores"])}
    return alive
