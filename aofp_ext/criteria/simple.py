"""Criteria that read the weights only: filter norm, BN scale and random."""

from __future__ import annotations

import torch

from .base import Criterion, SelectionContext, register

__all__ = ["L1Norm", "BNScale", "Random"]


@register("l1")
class L1Norm(Criterion):
    """``sum |W_c|`` of each filter's producer weights (Li et al., 2017)."""

    needs_data = False

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        return [ctx.out_weight(i).flatten(1).abs().sum(dim=1).double()
                for i in range(len(ctx.targets))]


@register("bn_scale")
class BNScale(Criterion):
    """``|gamma|`` of the BatchNorm after each filter (network slimming, Liu et al., 2017);
    targets without a BN fall back to the filter's L1 norm (recorded in the report)."""

    needs_data = False

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        out, fallback = [], []
        for i, t in enumerate(ctx.targets):
            g = ctx.bn_gamma(i)
            if g is None:
                fallback.append(t.name)
                g = ctx.out_weight(i).flatten(1).abs().sum(dim=1)
            out.append(g.abs().double())
        ctx.info["l1_fallback"] = fallback
        return out


@register("random")
class Random(Criterion):
    """Uniform random scores from the seeded generator (the baseline every criterion must beat)."""

    needs_data = False

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        return [torch.rand(n, generator=ctx.generator, dtype=torch.float64) for n in ctx.sizes]
