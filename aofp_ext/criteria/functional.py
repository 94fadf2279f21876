"""``method="functional"``: functionality-oriented filter pruning (after Qin et al.,
"Functionality-oriented convolutional filter pruning", arXiv 1810.07322, and "Demystifying neural
network filter pruning", arXiv 1811.02639).

A filter is described by what it does on data, not by its size: its activation maps at the input
of the next layer (the consumers), on the calibration batches. Two filters have the same function
when their maps are the same up to a positive scale and an offset; their similarity is the
correlation of their maps over every sample and position (:func:`response_similarity`). Filters
of one layer whose pairwise similarities are all >= ``threshold`` form a group (complete-linkage
clustering, :func:`cluster_filters`); each group keeps one representative (the member the next
layer weights most) and its other members are removed first. Beyond the redundancy the same
agglomeration continues below the threshold: each merge of two clusters removes the weaker of
their two representatives (:func:`functional_order`). Every constant: docs/methods.md,
"## functional".
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Criterion, SelectionContext, register, relative
from .ranking import select_by_ranking

__all__ = ["Functional", "response_similarity", "merge_sequence", "cluster_filters",
           "functional_order", "consumer_weight_norm"]


def _channel_index(link: Any, size: int) -> torch.Tensor:
    """``(size, block)`` positions of each channel in the (flattened) consumer input."""
    counts = torch.bincount(link.chan_full, minlength=size)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError("functional: the channels of a target are read at unequal numbers of "
                         "positions by their consumer; their activation maps cannot be compared")
    order = torch.argsort(link.chan_full, stable=True)
    return link.pos_full[order].view(size, int(counts[0]))


def response_similarity(ctx: SelectionContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per target: ``S`` ``(size, size)`` float64, the Pearson correlation of the channels'
    activation maps at their (first) consumer's input over every calibration sample and position
    (each channel's maps centred and scaled to unit variance: the normalised activation maps), and
    ``constant`` ``(size,)`` bool: channels whose activation never varies (dead ReLUs; their rows
    and columns of ``S`` are 0)."""
    n_t = len(ctx.targets)
    s1 = [torch.zeros(s, dtype=torch.float64) for s in ctx.sizes]
    s2 = [torch.zeros(s, s, dtype=torch.float64) for s in ctx.sizes]
    count = [0] * n_t
    index = [_channel_index(t.links[0], t.group.size) for t in ctx.targets]
    for _ in ctx.captured():
        for i, t in enumerate(ctx.targets):
            for x, *_ in t.links[0].consumer.calls:
                xv = x.detach().double().cpu()
                xv = xv.reshape(xv.shape[0], xv.shape[1], -1)           # (N, width, L)
                m = xv[:, index[i]].flatten(2)                          # (N, size, block * L)
                r = m.transpose(0, 1).reshape(m.shape[1], -1)           # (size, N * block * L)
                s1[i] += r.sum(dim=1)
                s2[i] += r @ r.T
                count[i] += r.shape[1]
    sims, constant = [], []
    for i in range(n_t):
        n = max(count[i], 1)
        mean = s1[i] / n
        cov = s2[i] / n - mean[:, None] * mean[None, :]
        var = torch.diagonal(cov).clamp_min(0)
        const = var <= 1e-12 * max(float(var.max()) if var.numel() else 0.0, 1e-300)
        sd = var.sqrt().masked_fill(const, 1.0)
        corr = (cov / sd[:, None] / sd[None, :]).clamp(-1, 1)
        corr[const] = 0
        corr[:, const] = 0
        sims.append(corr)
        constant.append(const)
    return sims, constant


def consumer_weight_norm(ctx: SelectionContext, i: int) -> torch.Tensor:
    """``(size,)`` float64: the L2 norm of all consumer weights that read each channel of target
    ``i`` (how strongly the next layers use the channel)."""
    t = ctx.targets[i]
    sq = torch.zeros(t.group.size, dtype=torch.float64)
    for ln in t.links:
        w = ln.consumer.module.weight.detach()
        cols = w.transpose(0, 1).reshape(w.shape[1], -1).double().pow(2).sum(dim=1).cpu()
        sq.index_add_(0, ln.chan_full, cols[ln.pos_full])
    return sq.sqrt()


def merge_sequence(sim: torch.Tensor, members: torch.Tensor | None = None
                   ) -> list[tuple[list[int], list[int], float]]:
    """Complete-linkage agglomeration of the filters ``members`` (bool mask, default all) down
    to one cluster: repeatedly merge the two clusters whose LEAST similar pair is the most
    similar. Returns the merges in order, ``(cluster_a, cluster_b, height)`` with ``height`` the
    similarity of that least similar pair (non-increasing along the sequence). Ties: the first
    pair in row-major order of the smallest member indices."""
    idx = list(range(sim.shape[0])) if members is None else [
        int(c) for c in torch.nonzero(members).flatten()]
    clusters = [[c] for c in idx]
    merges: list[tuple[list[int], list[int], float]] = []
    if len(idx) < 2:
        return merges
    link = sim[idx][:, idx].to(torch.float64).clone()      # cluster-to-cluster linkage
    n = len(idx)
    active = torch.ones(n, dtype=torch.bool)
    for _ in range(n - 1):
        masked = link.masked_fill(~(active[:, None] & active[None, :]), -math.inf)
        masked.fill_diagonal_(-math.inf)
        k = int(torch.argmax(masked))
        a, b = sorted(divmod(k, n))
        merges.append((list(clusters[a]), list(clusters[b]), float(masked.view(-1)[k])))
        clusters[a] = sorted(clusters[a] + clusters[b])
        clusters[b] = []
        active[b] = False
        merged = torch.minimum(link[a], link[b])
        link[a] = merged
        link[:, a] = merged
    return merges


def cluster_filters(sim: torch.Tensor, threshold: float,
                    members: torch.Tensor | None = None) -> list[list[int]]:
    """The groups of same-function filters: the complete-linkage clusters (:func:`merge_sequence`)
    after every merge of height >= ``threshold``, so every pair inside a group has similarity
    >= ``threshold``. Sorted lists (singletons included), ordered by their first index."""
    idx = list(range(sim.shape[0])) if members is None else [
        int(c) for c in torch.nonzero(members).flatten()]
    of = {c: [c] for c in idx}
    for a, b, h in merge_sequence(sim, members):
        if not h >= threshold:
            break
        merged = sorted(of[a[0]] + of[b[0]])
        for c in merged:
            of[c] = merged
    return [list(c) for c in sorted({tuple(v) for v in of.values()}, key=lambda c: c[0])]


def functional_order(sim: torch.Tensor, constant: torch.Tensor, reliance: torch.Tensor,
                     threshold: float) -> tuple[list[tuple[int, int, float]], list[list[int]]]:
    """The removal order of one layer, ``[(channel, tier, value)]``, and the groups found
    (clusters of two or more at ``threshold``).

    Every cluster of :func:`merge_sequence` has one representative: the member with the largest
    ``reliance`` (ties: the lower index). Each merge keeps the stronger of the two
    representatives and demotes the other: that filter's function is represented by a kept
    filter. Tier 0: constant filters (value: reliance); tier 1: filters demoted by a merge of
    height >= ``threshold``, the redundant members of the groups (value: minus the height, most
    similar first); tier 2: the others in the order the merges demote them (value 1, 2, ...; the
    last representative last)."""
    n = sim.shape[0]
    out: list[tuple[int, int, float]] = []
    for c in torch.nonzero(constant).flatten().tolist():
        out.append((c, 0, float(reliance[c])))

    def rep(cl: list[int]) -> int:
        best = cl[0]
        for c in cl[1:]:
            if float(reliance[c]) > float(reliance[best]):
                best = c
        return best

    pos = 0
    members = ~constant
    for a, b, h in merge_sequence(sim, members):
        ra, rb = rep(a), rep(b)
        drop = rb if (float(reliance[ra]), -ra) > (float(reliance[rb]), -rb) else ra
        if h >= threshold:
            out.append((drop, 1, -h))
        else:
            pos += 1
            out.append((drop, 2, float(pos)))
    survivors = torch.nonzero(members).flatten().tolist()
    if survivors:
        out.append((rep(survivors), 2, float(pos + 1)))
    assert sorted(c for c, _, _ in out) == list(range(n))
    groups = [c for c in cluster_filters(sim, threshold, members) if len(c) > 1]
    return out, groups


def _number(name: str, v: Any, low: float, high: float) -> float:
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            or not low < v <= high):
        raise ValueError(f"functional option {name} must be a number in ({low}, {high}], got "
                         f"{v!r}")
    return float(v)


@register("functional")
class Functional(Criterion):
    """Functionality-oriented selection (docs/methods.md, "## functional").

    Options (``method_options``):
        threshold: two filters have the same function when the correlation of their activation
            maps is >= this (default 0.9); a group is a set of filters that pairwise all are.
    """

    needs_data = True

    def __init__(self, threshold: float = 0.9):
        self.threshold = _number("threshold", threshold, 0.0, 1.0)

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        """The global removal order as scores (rank, higher = removed later): constant filters,
        then redundant group members (most similar to their representative first), then the
        pair rule's order, per layer normalised by its mean as in the shared ranking."""
        sims, constant = response_similarity(ctx)
        keys: list[tuple[int, float, int, int]] = []
        info: dict[str, Any] = {}
        for i, t in enumerate(ctx.targets):
            order, groups = functional_order(sims[i], constant[i], consumer_weight_norm(ctx, i),
                                             self.threshold)
            tier2 = [(c, v) for c, tier, v in order if tier == 2]
            rel = relative(torch.tensor([v for _, v in tier2], dtype=torch.float64))
            rel_of = {c: float(r) for (c, _), r in zip(tier2, rel, strict=True)}
            for c, tier, v in order:
                keys.append((tier, rel_of[c] if tier == 2 else v, i, c))
            info[t.name] = {"groups": groups, "constant": int(constant[i].sum()),
                            "redundant": sum(len(g) - 1 for g in groups)}
        keys.sort()
        scores = [torch.zeros(s, dtype=torch.float64) for s in ctx.sizes]
        for rank, (_, _, i, c) in enumerate(keys):
            scores[i][c] = float(rank + 1)
        ctx.info["functional"] = info
        return scores

    def select(self, ctx: SelectionContext, target_flops: float) -> list[torch.Tensor]:
        """The shared ranking of :meth:`scores` (already one global order: not re-normalised)."""
        scores = self.scores(ctx)
        ctx.check_scores(scores)
        ctx.info["scores"] = scores
        return select_by_ranking(scores, ctx.macs, target_flops, normalise=False)
