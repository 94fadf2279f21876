"""First-order Taylor importance on a channel gate (Molchanov et al., 2017 and 2019)."""

from __future__ import annotations

import torch

from .base import Criterion, SelectionContext, register

__all__ = ["Taylor"]


@register("taylor")
class Taylor(Criterion):
    """``|dL/dg_c|`` for a gate ``g = 1`` on each channel at its mask point, i.e.
    ``|sum a * dL/da|`` over the batch and every position where the channel is read (the
    first-order estimate of the loss change when the channel is removed), averaged over the
    calibration batches. Eval mode, one forward and one backward per batch
    (:meth:`SelectionContext.gate_grads`)."""

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        from tqdm.auto import tqdm

        if not ctx.batches:
            raise ValueError("method 'taylor' needs at least one calibration batch")
        acc = [torch.zeros(n, dtype=torch.float64) for n in ctx.sizes]
        for inputs, labels in tqdm(ctx.batches, desc="taylor", unit="batch",
                                   disable=not ctx.progress):
            for a, g in zip(acc, ctx.gate_grads(inputs, labels)):
                a += g.abs()
        return [a / len(ctx.batches) for a in acc]
