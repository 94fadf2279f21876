"""From per-channel scores to keep-sets that meet a MACs target: the shared global ranking.

Scores of different layers live on different scales (a weight norm grows with fan-in, a damage
with the follower's size), so each layer's scores are first divided by their mean absolute value
(every layer's average channel then scores 1; the L2 normalisation of Molchanov et al., 2017,
would give a channel of a 64-wide layer half the score of one of a 16-wide layer and empty the
wide layers first). Then all channels of all targets are sorted
by normalised score, ascending (ties by target order, then channel index), and removed in that
order until the model's MACs reach the target; each group keeps at least its highest-scoring
channel. MACs fall monotonically along that order, so the shortest prefix that meets the target
is found by bisection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..pricing import MacsModel
from .base import relative

__all__ = ["select_by_ranking", "removal_order"]


def removal_order(scores: Sequence[torch.Tensor], normalise: bool = True
                  ) -> list[tuple[int, int]]:
    """``(target, channel)`` pairs in removal order (each group's best channel excluded)."""
    keys: list[tuple[float, int, int]] = []
    for i, s in enumerate(scores):
        s = s.to(torch.float64).flatten().cpu()
        v = relative(s) if normalise else s
        best = int(torch.argmax(s)) if s.numel() else -1  # first of the highest (stable)
        keys.extend((float(v[c]), i, c) for c in range(s.numel()) if c != best)
    keys.sort()
    return [(i, c) for _, i, c in keys]


def select_by_ranking(scores: Sequence[torch.Tensor], macs: MacsModel, target_flops: float,
                      normalise: bool = True) -> list[torch.Tensor]:
    """Keep-sets (bool, one per target) removing the lowest-ranked channels until
    ``macs.current(alive) <= target_flops * macs.total``."""
    order = removal_order(scores, normalise)
    goal = target_flops * macs.total
    full = [torch.ones(s.numel(), dtype=torch.bool) for s in scores]

    def alive_after(n: int) -> list[torch.Tensor]:
        alive = [a.clone() for a in full]
        for i, c in order[:n]:
            alive[i][c] = False
        return alive

    if macs.current(full) <= goal:
        return full
    lo, hi = 0, len(order)  # invariant: prefix hi meets the goal (checked), lo does not
    if macs.current(alive_after(hi)) > goal:
        raise ValueError(f"target_flops={target_flops} cannot be reached with one channel left "
                         "in every target group")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if macs.current(alive_after(mid)) <= goal:
            hi = mid
        else:
            lo = mid
    return alive_after(hi)
