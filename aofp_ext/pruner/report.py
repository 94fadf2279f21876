"""The report of a run (the dict ``PruneResult.report``; every key in docs/prune.md), and the
files ``out_dir`` receives (written by :mod:`aofp_ext.report` and :func:`aofp_ext.save`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..flops import count_flops
from .batches import Batches
from .plan import Plan
from .run_checkpoint import RunState
from .settings import Settings

__all__ = ["build_report", "measure_latency", "write_outputs"]


def build_report(model: nn.Module, example: tuple[torch.Tensor, ...], plan: Plan, s: Settings,
                 run: RunState, device: torch.device) -> dict[str, Any]:
    """Widths, MACs and params before and after (counted on the cut model), accuracies, steps,
    seconds, the history of decisions, the settings."""
    macs_after, params_after = count_flops(model, example)
    info, widths_before = run.info, plan.widths_before
    widths_after = dict(info["widths_after"])
    return {
        "model": type(model).__name__,
        "method": run.config["method"],
        "selection": info.get("selection"),
        "settings": {k: v for k, v in run.config.items() if k != "targets"}
        | {"max_steps": s.max_steps, "finetune_epochs": s.finetune_epochs},
        "device": str(device),
        "targets": list(widths_before),
        "widths_before": widths_before,
        "widths_after": widths_after,
        "channels_pruned": sum(widths_before[k] - widths_after[k] for k in widths_before),
        "macs_before": plan.macs_before,
        "macs_after": macs_after,
        "macs_fraction": macs_after / max(plan.macs_before, 1),
        "params_before": plan.params_before,
        "params_after": params_after,
        "target_flops": s.target_flops,
        "reached_target": macs_after <= s.target_flops * plan.macs_before,
        "stop_reason": info.get("stop_reason"),
        "steps": info.get("steps"),
        "search_seconds": run.timing["search"],
        "finetune_seconds": run.timing["finetune"],
        "accuracy_before": info.get("accuracy_before"),
        "accuracy_after_search": info.get("accuracy_after_search"),
        "accuracy_after_finetune": info.get("accuracy_after_finetune"),
        "resumed_from": info.get("resumed_from"),
        "history": list(run.history),
    }


#: Forwards of :func:`measure_latency` (per model and batch size): cheap next to any search.
LATENCY_REPEATS, LATENCY_WARMUP = 10, 2


def measure_latency(original: nn.Module, pruned: nn.Module, example: tuple[torch.Tensor, ...],
                    batches: Batches) -> dict[str, Any] | None:
    """``report["latency"]``: :func:`aofp_ext.latency.compare` of the original and the pruned
    model at batch 1 and the training batch (the size of the loader's first batch), built from
    the example's samples; ``None`` for a model with several inputs."""
    from ..latency import compare

    if len(example) != 1:
        return None
    train_batch = batches.batch_size()
    r = compare(original, pruned, example[0], batch=train_batch, repeats=LATENCY_REPEATS,
                warmup=LATENCY_WARMUP)
    r["training_batch"] = train_batch
    return r


def write_outputs(model: nn.Module, report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """``model.pt`` (:func:`aofp_ext.save`), ``report.json``, ``report.md``, ``widths.png``."""
    from ..checkpoint import save
    from ..report import write_report

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save(model, Path(out_dir) / "model.pt")
    write_report(report, out_dir)
