"""What a run prunes: the target groups, their followers (the consumers that price them), and
the MACs model; computed once from the model's channel graph before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..flops import count_flops
from ..graph import analyze
from ..pricing import Consumer, MacsModel, Target, base_keep, build_targets, select_targets
from ..search import LayerSearch, start_steps
from .settings import Settings

__all__ = ["Plan", "make_plan"]


@dataclass
class Plan:
    """The targets (each with its :class:`~aofp_ext.search.LayerSearch`), the consumers whose
    hooks mask and capture (by module name), the MACs model, the model's size before, and the
    settings a checkpoint stores (``config``)."""

    targets: list[Target]
    consumers: dict[str, Consumer]
    macs: MacsModel
    macs_before: int
    params_before: int
    widths_before: dict[str, int]
    config: dict[str, Any]

    def reached(self, target_flops: float) -> bool:
        """The MACs with the current keep-sets are at most ``target_flops`` of the original."""
        return self.macs.current() <= target_flops * self.macs.total

    def apply_keep(self, device: torch.device) -> None:
        """Every consumer's base mask from its targets' current keep-sets."""
        base_keep(self.targets, self.consumers, [t.search.alive for t in self.targets], device)


def make_plan(model: nn.Module, example: tuple[torch.Tensor, ...], s: Settings) -> Plan:
    """Targets (``s.targets``), followers, MACs; a ``ValueError`` when ``s.target_flops`` is
    below what the searched groups can reach."""
    analysis = analyze(model, example)
    groups = select_targets(analysis.groups, s.targets, model, search_parts=s.criterion is None)
    starts = start_steps(len(groups), s.iters_per_half, s.warmup_iters)
    searches = [LayerSearch(g.name, g.size, start=start, iters_per_half=s.iters_per_half,
                            thresh=float(s.thresh), parts=g.granularity)
                for g, start in zip(groups, starts)]
    targets, consumers = build_targets(model, analysis.gm, groups, s.pricing_bn_mode, searches)
    macs = MacsModel(model, example, targets)
    macs_before, params_before = count_flops(model, example)
    smallest = macs.smallest() / max(macs.total, 1)
    if s.target_flops < smallest:
        raise ValueError(
            f"target_flops={s.target_flops} cannot be reached: with one filter left in each of "
            f"the {len(targets)} searched groups (one per part in grouped-conv and chunk groups) "
            f"the model keeps {smallest:.3f} of its MACs (the rest is in layers that are not "
            "searched); raise target_flops or pass targets='all'")
    return Plan(targets, consumers, macs, macs_before, params_before,
                {t.name: t.group.size for t in targets}, s.config(targets))
