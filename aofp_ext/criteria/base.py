"""The criterion interface: how ``prune(method=...)`` chooses filters without the AOFP search.

A criterion is one small class: it reads the model and a few calibration batches through a
:class:`SelectionContext` and returns a score per channel of every target group (higher = more
important). Unless it overrides :meth:`Criterion.select`, the shared global ranking
(:func:`aofp_ext.criteria.ranking.select_by_ranking`) turns the scores into keep-sets that meet the
MACs target. Everything that masks or prices channels goes through the context, which uses
:mod:`aofp_ext.ops` (``masked_damage``) and the same consumer hooks as the AOFP search
(:mod:`aofp_ext.pricing`): no criterion carries its own copy of the masking logic.

Conventions (docs/methods.md):

- calibration forwards run with the model in eval mode (BatchNorm on its running statistics), so a
  selection never changes the model, and the samples of a batch are independent, which is what
  makes :meth:`SelectionContext.masked_losses` (many masks as one batched forward) exact;
- followers are priced with their BN on the running statistics (``norm="affine"``) for the same
  reason;
- scores are float64 CPU tensors, one ``(group.size,)`` tensor per target, in target order.

Registering a new criterion::

    from aofp_ext.criteria import Criterion, register

    @register("my_norm")
    class MyNorm(Criterion):
        needs_data = False

        def scores(self, ctx):
            return [ctx.out_weight(i).flatten(1).norm(dim=1) for i in range(len(ctx.targets))]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..pricing import Consumer, MacsModel, Target, price, price_single

__all__ = ["Criterion", "SelectionContext", "register", "get_criterion", "available",
           "CRITERIA"]

#: name -> criterion class (filled by :func:`register`).
CRITERIA: dict[str, type[Criterion]] = {}


def register(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator: make ``prune(method=name)`` use this criterion."""

    def deco(cls: type[Criterion]) -> type[Criterion]:
        if name in CRITERIA and CRITERIA[name] is not cls:
            raise ValueError(f"criterion {name!r} is already registered "
                             f"({CRITERIA[name].__qualname__})")
        if name == "aofp":
            raise ValueError("'aofp' is the built-in search, not a criterion")
        cls.name = name
        CRITERIA[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Every ``method=`` value: ``"aofp"`` and the registered criteria."""
    return ["aofp", *sorted(CRITERIA)]


def get_criterion(name: str, options: dict[str, Any] | None = None) -> Criterion:
    """An instance of the criterion registered as ``name``, built with ``options``."""
    if name not in CRITERIA:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(available())}")
    cls = CRITERIA[name]
    try:
        return cls(**(options or {}))
    except TypeError as e:
        raise ValueError(f"bad method_options for method {name!r}: {e}") from None


class Criterion:
    """Base class of a filter-selection criterion (see the module docstring).

    Subclasses set ``needs_data`` (False: weights only, no calibration batch is read) and
    implement :meth:`scores`; constructor keyword arguments are the ``method_options`` of
    :func:`aofp_ext.prune`.
    """

    name: ClassVar[str] = "?"
    needs_data: ClassVar[bool] = True

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        """One ``(group.size,)`` tensor per target (higher = more important)."""
        raise NotImplementedError

    def select(self, ctx: SelectionContext, target_flops: float) -> list[torch.Tensor]:
        """Keep-sets (one bool ``(group.size,)`` tensor per target) with MACs <= the target.
        Default: the global ranking of :meth:`scores` with per-layer normalisation."""
        from .ranking import select_by_ranking

        scores = [torch.as_tensor(s, dtype=torch.float64).flatten().cpu()
                  for s in self.scores(ctx)]
        ctx.check_scores(scores)
        ctx.info["scores"] = scores
        return select_by_ranking(scores, ctx.macs, target_flops)

    def options(self) -> dict[str, Any]:
        """The settings of this instance (recorded in the report)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass(eq=False)
class SelectionContext:
    """What a criterion may read: the model, its target groups and calibration batches, and the
    shared masking/pricing machinery.

    Attributes:
        model: the model (not modified by a selection; kept in eval mode while scoring).
        targets: the target groups (:class:`aofp_ext.pricing.Target`), in order.
        consumers: the conv/Linear modules reading target channels, by name.
        batches: calibration batches ``(inputs tuple, labels)`` already on ``device``.
        loss_fn: ``loss_fn(output, labels)`` (mean over the batch).
        device: where the model runs.
        generator: a seeded CPU generator for any random draw of the criterion.
        macs: the MACs bookkeeping of the targets.
        progress: whether to show progress bars.
        max_samples: the most samples one batched forward of :meth:`masked_losses` runs
            (default: 256 on the CPU, where larger batches run slower per sample -- ResNet-56,
            one thread: 3 ms per sample at 256, 9 ms at 2048 -- and 2048 elsewhere).
        info: a dict the criterion may fill (saved in ``report["selection"]``).
    """

    model: nn.Module
    targets: list[Target]
    consumers: dict[str, Consumer]
    batches: list[tuple[tuple[torch.Tensor, ...], Any]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    device: torch.device
    generator: torch.Generator
    macs: MacsModel
    progress: bool = False
    max_samples: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    # -- model parts ---------------------------------------------------------------------------

    @property
    def sizes(self) -> list[int]:
        return [t.group.size for t in self.targets]

    @property
    def sample_cap(self) -> int:
        """The most samples one batched forward of :meth:`masked_losses` runs (``max_samples``,
        or its device default)."""
        return self.max_samples or (256 if self.device.type == "cpu" else 2048)

    def producer_modules(self, i: int, role: str = "out") -> list[tuple[nn.Module, Any]]:
        """``(module, slot)`` of every producer of target ``i`` with ``role`` ("out": the
        conv/Linear making the channels; "norm": their BatchNorm)."""
        return [(self.model.get_submodule(s.module), s) for s in self.targets[i].group.producers
                if s.role == role]

    def out_weight(self, i: int) -> torch.Tensor:
        """The producer weight rows of target ``i``: ``(size, ...)`` (the first producer conv)."""
        for m, s in self.producer_modules(i, "out"):
            w = m.weight.detach()
            rows = s.start + torch.arange(s.length) * s.block
            if s.length == self.targets[i].group.size and s.block == 1:
                return w[rows.to(w.device)].cpu()
        raise ValueError(f"target '{self.targets[i].name}' has no single producing conv/Linear")

    def bn_gamma(self, i: int) -> torch.Tensor | None:
        """``|gamma|``-ready BN weight of target ``i`` (``(size,)``), or None without a BN."""
        for m, s in self.producer_modules(i, "norm"):
            if getattr(m, "weight", None) is not None and s.length == self.targets[i].group.size:
                return m.weight.detach()[s.start:s.start + s.length].cpu()
        return None

    def check_scores(self, scores: Sequence[torch.Tensor]) -> None:
        if len(scores) != len(self.targets):
            raise ValueError(f"criterion returned {len(scores)} score vectors for "
                             f"{len(self.targets)} targets")
        for t, s in zip(self.targets, scores):
            if s.numel() != t.group.size:
                raise ValueError(f"criterion returned {s.numel()} scores for '{t.name}' "
                                 f"({t.group.size} channels)")
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"criterion returned non-finite scores for '{t.name}'")

    # -- calibration forwards ------------------------------------------------------------------

    @contextlib.contextmanager
    def _hooked(self, capture: bool = False) -> Iterator[None]:
        """The consumers' pre-hooks (base masks, ``keep``) on, with ``capture`` also their
        forward hooks (recording inputs), and the model in eval mode; on exit the hooks are
        removed, every consumer's ``keep``/``capture``/``calls`` cleared and the modes restored."""
        cons = list(self.consumers.values())
        handles = [c.module.register_forward_pre_hook(c.pre_hook) for c in cons]
        if capture:
            handles += [c.module.register_forward_hook(c.post_hook) for c in cons]
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for c in cons:
                c.keep, c.capture, c.calls = None, False, []
            for m, mode in modes:
                m.training = mode

    def captured(self, targets: Sequence[int] | None = None
                 ) -> Iterator[tuple[tuple[torch.Tensor, ...], Any]]:
        """For each calibration batch: run the model (eval, no grad) capturing the inputs of the
        consumers of ``targets`` (default all), and yield the batch; inside the loop body
        :meth:`damage` prices masks on that batch."""
        idx = range(len(self.targets)) if targets is None else targets
        live = {id(ln.consumer) for i in idx for ln in self.targets[i].links}
        with self._hooked(capture=True):
            for inputs, labels in self.batches:
                for c in self.consumers.values():
                    c.capture, c.calls = id(c) in live, []
                with torch.no_grad():
                    self.model(*inputs)
                yield inputs, labels

    def damage(self, i: int, masks: torch.Tensor) -> torch.Tensor:
        """``(K,)`` float64: the relative damage ``||f(Y_mask) - f(Y)||^2 / ||f(Y)||^2`` of the
        masks ``(K, size)`` (True = keep) of target ``i`` at its followers, on the batch of the
        current :meth:`captured` iteration (via :func:`aofp_ext.ops.masked_damage`)."""
        return price(self.targets[i], masks.to(torch.bool))

    def single_damage(self, i: int) -> torch.Tensor:
        """``(size,)`` float64: :meth:`damage` of each single-channel removal of target ``i``
        (the ``size`` one-hot masks) on the current :meth:`captured` batch; exact, through
        ``ops.channel_gram`` at linear followers and ``ops.masked_damage`` elsewhere
        (:func:`aofp_ext.pricing.price_single`)."""
        return price_single(self.targets[i])

    def gate_grads(self, inputs: tuple[torch.Tensor, ...], labels: Any) -> list[torch.Tensor]:
        """``dL/dg`` per channel of every target, ``(size,)`` float64 each, on one batch: ``g`` is
        a gate of ones multiplying the target's channels at its consumers' inputs (equivalent to
        the mask point, see :class:`aofp_ext.pricing.Consumer`), so ``dL/dg_c = sum a * dL/da``
        over the batch and every position where channel ``c`` is read. Eval mode; only the
        gates' gradients are computed (``torch.autograd.grad``), no parameter ``.grad`` is
        touched and the model is not changed."""
        gates: dict[str, torch.Tensor] = {}
        with self._hooked():
            for t in self.targets:
                for ln in t.links:
                    c = ln.consumer
                    if c.name not in gates:
                        gates[c.name] = torch.ones(c.width, device=self.device,
                                                   requires_grad=True)
                        c.keep = gates[c.name]
            with torch.enable_grad():
                loss = self.loss_fn(self.model(*inputs), labels)
                grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
        by_name = {n: (g if g is not None else torch.zeros_like(gates[n])).detach()
                   for n, g in zip(gates, grads)}
        out = []
        for t in self.targets:
            g = torch.zeros(t.group.size, dtype=torch.float64)
            for ln in t.links:
                g.index_add_(0, ln.chan_full, by_name[ln.consumer.name][ln.pos_full.to(
                    self.device)].to("cpu", torch.float64))
            out.append(g)
        return out

    def masked_losses(self, inputs: tuple[torch.Tensor, ...], labels: Any,
                      masks: dict[int, torch.Tensor],
                      alive: Sequence[torch.Tensor | None] | None = None,
                      grad: bool = False,
                      metric: Callable[[Any, Any], Any] | None = None) -> torch.Tensor:
        """``(K,)`` float64: ``loss_fn`` of the model on one batch under each of K mask sets
        (``metric(output, labels)`` instead, e.g. an accuracy, when given).

        ``masks[i]`` is ``(K, size_i)`` bool (True = keep) for target ``i``; targets not in
        ``masks`` keep ``alive[i]`` (default: all channels). The K masked models run as batched
        forwards of ``K * N`` samples (chunks of at most ``max_samples``) with per-sample masks at
        each consumer's input; eval mode makes every sample independent, so the result equals K
        separate masked forwards.
        """
        if not masks:
            raise ValueError("masked_losses needs at least one target's masks")
        K = next(iter(masks.values())).shape[0]
        for i, m in masks.items():
            if m.dim() != 2 or m.shape != (K, self.targets[i].group.size):
                raise ValueError(f"masks for '{self.targets[i].name}' must be "
                                 f"({K}, {self.targets[i].group.size}), got {tuple(m.shape)}")
        n = inputs[0].shape[0]
        out = torch.empty(K, dtype=torch.float64)
        if K == 0:
            return out
        chunk = max(1, self.sample_cap // max(n, 1))
        base = [a if a is not None else torch.ones(t.group.size, dtype=torch.bool)
                for a, t in zip(alive or [None] * len(self.targets), self.targets)]
        with self._hooked():
            for k0 in range(0, K, chunk):
                k1 = min(K, k0 + chunk)
                self._per_sample_keep(masks, base, k0, k1, n)
                rep = tuple(x.repeat((k1 - k0,) + (1,) * (x.dim() - 1)) for x in inputs)
                with torch.set_grad_enabled(grad):
                    y = self.model(*rep)
                fn = self.loss_fn if metric is None else metric
                for j in range(k1 - k0):
                    v = fn(y[j * n:(j + 1) * n], labels)
                    out[k0 + j] = float(v.detach() if isinstance(v, torch.Tensor) else v)
        return out

    def _per_sample_keep(self, masks: dict[int, torch.Tensor], base: list[torch.Tensor],
                         k0: int, k1: int, n: int) -> None:
        for c in self.consumers.values():
            keep = torch.ones(k1 - k0, c.width)
            touched = False
            for i, t in enumerate(self.targets):
                for ln in t.links:
                    if ln.consumer is not c:
                        continue
                    m = (masks[i][k0:k1] if i in masks
                         else base[i].expand(k1 - k0, -1)).to(torch.bool)
                    keep[:, ln.pos_full] = m[:, ln.chan_full].float()
                    touched = True
            c.keep = (keep.repeat_interleave(n, dim=0).to(self.device)
                      if touched and not bool((keep == 1).all()) else None)


def relative(scores: torch.Tensor) -> torch.Tensor:
    """``scores / mean(|scores|)`` (all zeros stay zeros): the per-layer normalisation. Dividing
    by the mean (not the L2 norm, whose per-channel share shrinks as ``1/sqrt(width)``) makes a
    layer's average channel score 1 whatever its width, so wide layers are not emptied first."""
    s = scores.to(torch.float64)
    m = float(s.abs().mean()) if s.numel() else 0.0
    return s / m if m > 0 and math.isfinite(m) else s
