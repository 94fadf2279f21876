"""Exact single-filter ablation: the damage at the follower ("oracle") or the change of the
task loss ("oracle-loss") when one filter alone is removed."""

from __future__ import annotations

import torch

from .base import Criterion, SelectionContext, register

__all__ = ["Oracle", "OracleLoss"]


@register("oracle")
class Oracle(Criterion):
    """Each filter's relative damage at its followers when it alone is removed (AOFP's damage
    ``||f(Y) - f(Y_try)||^2 / ||f(Y)||^2`` with the one-hot mask), averaged over the calibration
    batches. Exact: the Gram form (``ops.channel_gram``) at linear followers, ``ops.masked_damage``
    with all one-hot masks of a layer in one pass elsewhere."""

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        from tqdm.auto import tqdm

        acc = [torch.zeros(n, dtype=torch.float64) for n in ctx.sizes]
        n_batches = 0
        for _ in tqdm(ctx.captured(), total=len(ctx.batches), desc="oracle", unit="batch",
                      disable=not ctx.progress):
            for i in range(len(ctx.targets)):
                acc[i] += ctx.single_damage(i)
            n_batches += 1
        if n_batches == 0:
            raise ValueError("method 'oracle' needs at least one calibration batch")
        return [a / n_batches for a in acc]


@register("oracle-loss")
class OracleLoss(Criterion):
    """``loss(filter removed alone) - loss(all kept)`` per filter, averaged over the calibration
    batches; the one-hot masks of a layer run as one batched masked forward
    (:meth:`SelectionContext.masked_losses`). Negative where removing the filter lowers the loss."""

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        from tqdm.auto import tqdm

        if not ctx.batches:
            raise ValueError("method 'oracle-loss' needs at least one calibration batch")
        acc = [torch.zeros(n, dtype=torch.float64) for n in ctx.sizes]
        bar = tqdm(total=len(ctx.batches) * sum(ctx.sizes), desc="oracle-loss", unit="mask",
                   disable=not ctx.progress)
        with bar:
            for inputs, labels in ctx.batches:
                full = ctx.masked_losses(inputs, labels,
                                         {0: torch.ones(1, ctx.sizes[0], dtype=torch.bool)})[0]
                for i, n in enumerate(ctx.sizes):
                    one_hot = ~torch.eye(n, dtype=torch.bool)   # row c: channel c removed
                    acc[i] += ctx.masked_losses(inputs, labels, {i: one_hot}) - full
                    bar.update(n)
        return [a / len(ctx.batches) for a in acc]
