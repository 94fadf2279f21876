"""Linear filter ensembles (Sándor, Pável and Csató, arXiv 2001.08142): random masks over all
target layers at once, the task loss of each, and a ridge fit of the loss against the
removed-filter indicators; a filter's importance is its fitted coefficient."""

from __future__ import annotations

import math

import torch

from .base import Criterion, SelectionContext, register

__all__ = ["LinearFilterEnsembles", "fit_additive"]


def fit_additive(removed: torch.Tensor, losses: torch.Tensor, blocks: torch.Tensor | None = None,
                 ridge: float = 1e-3) -> torch.Tensor:
    """The coefficients ``w`` of ``loss_k ~ b[blocks_k] + sum_j w_j removed_kj``, float64.

    Args:
        removed: ``(M, F)`` 0/1 (bool or float): filter ``j`` removed in mask ``k``.
        losses: ``(M,)`` the loss of each mask.
        blocks: ``(M,)`` int, which data block (calibration batch) mask ``k`` was measured on;
            every block gets its own intercept ``b`` (not penalised), so differences between
            batches do not leak into the coefficients. ``None``: one intercept.
        ridge: ``lambda / mean_j ||x_j||^2`` (``x_j`` the centred indicator column), i.e. the
            penalty relative to the average column energy, so it means the same whatever the
            number of masks; 0 gives the minimum-norm least-squares solution.

    Returns:
        ``(F,)`` float64: ``w`` minimising ``||y - B b - X w||^2 + lambda ||w||^2`` (``torch.linalg``,
        Cholesky of the ``F x F`` normal matrix). Columns that never vary get 0.
    """
    X = torch.as_tensor(removed).to("cpu", torch.float64)
    y = torch.as_tensor(losses).to("cpu", torch.float64).flatten()
    if X.dim() != 2 or X.shape[0] != y.numel():
        raise ValueError(f"removed must be (M, F) with M = len(losses) = {y.numel()}, got "
                         f"{tuple(X.shape)}")
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("losses contain NaN or infinite values")
    M, F = X.shape
    if blocks is None:
        blocks = torch.zeros(M, dtype=torch.long)
    blocks = torch.as_tensor(blocks).to("cpu", torch.long).flatten()
    if blocks.numel() != M:
        raise ValueError(f"blocks must have one entry per mask ({M}), got {blocks.numel()}")
    # project out the block intercepts: centre X and y within each block
    _, inv, counts = torch.unique(blocks, return_inverse=True, return_counts=True)
    nb = counts.numel()
    mx = torch.zeros(nb, F, dtype=torch.float64).index_add_(0, inv, X) / counts[:, None]
    my = torch.zeros(nb, dtype=torch.float64).index_add_(0, inv, y) / counts
    Xc, yc = X - mx[inv], y - my[inv]
    A = Xc.T @ Xc
    rhs = Xc.T @ yc
    if ridge == 0:
        return torch.linalg.lstsq(Xc, yc[:, None], driver="gelsd").solution[:, 0]
    diag = A.diagonal()
    energy = float(diag.mean())
    if energy <= 0:
        return torch.zeros(F, dtype=torch.float64)
    A = A + (ridge * energy) * torch.eye(F, dtype=torch.float64)
    L = torch.linalg.cholesky(A)
    w = torch.cholesky_solve(rhs[:, None], L)[:, 0]
    return torch.where(diag > 0, w, torch.zeros_like(w))


@register("lfe")
class LinearFilterEnsembles(Criterion):
    """``n_masks`` random masks over all target channels at once (each channel kept
    independently with probability ``keep_prob``). The calibration batches are cut into blocks
    of ``samples_per_mask`` consecutive samples (None: one block per batch); mask ``k`` runs on
    block ``k mod (number of blocks)`` as part of a batched masked forward
    (:meth:`SelectionContext.masked_losses`); :func:`fit_additive` fits the losses against the
    removed-channel indicators with one intercept per block; score = the coefficient (the
    average increase of the loss when the channel is removed from a random sub-network).

    Options: ``keep_prob`` (0.9), ``n_masks`` (1024), ``ridge`` (1e-3, relative to the average
    column energy), ``samples_per_mask`` (32). See docs/methods.md.
    """

    def __init__(self, keep_prob: float = 0.9, n_masks: int = 1024, ridge: float = 1e-3,
                 samples_per_mask: int | None = 32):
        if not (isinstance(keep_prob, (int, float)) and 0 < keep_prob < 1):
            raise ValueError(f"lfe: keep_prob must be in (0, 1), got {keep_prob!r}")
        if isinstance(n_masks, bool) or not isinstance(n_masks, int) or n_masks < 2:
            raise ValueError(f"lfe: n_masks must be an integer >= 2, got {n_masks!r}")
        if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool)
                and math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"lfe: ridge must be a finite number >= 0, got {ridge!r}")
        if samples_per_mask is not None and (
                isinstance(samples_per_mask, bool) or not isinstance(samples_per_mask, int)
                or samples_per_mask < 1):
            raise ValueError(f"lfe: samples_per_mask must be a positive integer or None, got "
                             f"{samples_per_mask!r}")
        self.keep_prob = float(keep_prob)
        self.n_masks = n_masks
        self.ridge = float(ridge)
        self.samples_per_mask = samples_per_mask

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        from tqdm.auto import tqdm

        if not ctx.batches:
            raise ValueError("method 'lfe' needs at least one calibration batch")
        sizes = ctx.sizes
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        total = offsets[-1]
        data = []           # the blocks: samples_per_mask consecutive samples of a batch
        for inputs, labels in ctx.batches:
            n = inputs[0].shape[0]
            s = self.samples_per_mask or n
            data.extend((tuple(x[j:j + s] for x in inputs), labels[j:j + s])
                        for j in range(0, n, s))
        removed = torch.rand(self.n_masks, total, generator=ctx.generator) >= self.keep_prob
        blocks = torch.arange(self.n_masks) % len(data)
        losses = torch.empty(self.n_masks, dtype=torch.float64)
        bar = tqdm(total=self.n_masks, desc="lfe masks", unit="mask", disable=not ctx.progress)
        with bar:
            for b, (inputs, labels) in enumerate(data):
                idx = torch.nonzero(blocks == b).flatten()
                if idx.numel() == 0:
                    continue
                n = inputs[0].shape[0]
                step = max(1, ctx.sample_cap // max(n, 1))   # masks per batched forward
                for k0 in range(0, idx.numel(), step):
                    rows = idx[k0:k0 + step]
                    keep = ~removed[rows]
                    masks = {i: keep[:, offsets[i]:offsets[i + 1]] for i in range(len(sizes))}
                    losses[rows] = ctx.masked_losses(inputs, labels, masks)
                    bar.update(rows.numel())
        coef = fit_additive(removed, losses, blocks, self.ridge)
        ctx.info["lfe"] = {"blocks": len(data), "loss_mean": float(losses.mean()),
                           "loss_std": float(losses.std()),
                           "removed_per_mask": float(removed.sum(1).double().mean())}
        return [coef[offsets[i]:offsets[i + 1]].clone() for i in range(len(sizes))]
