"""The AOFP binary search of one target layer: pure decision logic (no ``torch.nn``).

This is the authors' rule (docs/prune.md, ../shared/docs/aofp-method.md), with one change of
scale: each step draws ``K`` attempts instead of one. Per layer:

- ``alive`` is the base mask ``b`` (True = filter kept), ``space`` the search space ``S``;
- each step, every attempt zeroes ``g = floor(|S| / 2)`` filters drawn uniformly from ``S``
  (on top of those already zero in ``b``); the caller prices the attempts and passes their
  damages ``t`` back, and every filter zeroed by an attempt gets ``acc += t``, ``cnt += 1``;
- after ``iters_per_half`` steps the half ends: ``avg = acc / cnt`` (a filter never drawn counts
  as infinitely damaging), the accumulators are reset, ``S`` is sorted by ``avg`` ascending and
  ``P`` is its first ``g`` filters; then
    * if ``max(avg[P]) < thresh``: prune ``P`` (``b = 0`` there) and reset ``S`` to the filters
      still alive;
    * elif ``g > 1``: ``S := P`` (halve);
    * else: reset ``S`` to the filters still alive.

Ties in ``avg`` are broken by filter index (a stable sort), so a run is reproducible. A layer with
one filter left has ``g = 0``: it draws nothing and never decides again.

Parts (a channel group with a granularity rule: the channel groups of a grouped conv, the pieces
of ``chunk``; docs/prune.md): with ``parts = n``, the filters form ``n`` equal consecutive parts
and every keep-set must keep the same number in each. The rule above then runs per part, in
lockstep: ``S`` holds the same number ``s`` of filters in every part; each attempt zeroes
``h = floor(s / 2)`` filters drawn uniformly within each part (``g = n * h`` in all); at the end
of a half each part's filters of ``S`` are sorted by ``avg`` and ``P`` is the first ``h`` of every
part; the threshold test is over the whole ``P``, and prune / halve / reset apply to all parts at
once. So ``alive`` and ``S`` always hold equal counts per part, and one filter per part is the
floor. ``parts = 1`` is exactly the rule above (the same random draws and decisions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Move", "LayerSearch", "start_steps", "default_iters_per_half",
           "default_warmup_iters", "AUTHORS_ITERS_PER_HALF", "AUTHORS_WARMUP_ITERS"]

#: The authors' settings with one attempt per layer per step (their PyTorch demo).
AUTHORS_ITERS_PER_HALF = 1000
AUTHORS_WARMUP_ITERS = 500


def default_iters_per_half(masks_per_step: int) -> int:
    """Steps per half such that each filter of ``S`` gets about as many attempts per half as with
    the authors' one attempt per step over 1000 steps: a filter is in an attempt with probability
    ``g / |S|`` (about 1/2), so it gets ``K / 2`` attempts per step and 500 per half when
    ``iters_per_half = ceil(1000 / K)``."""
    _positive_int(masks_per_step, "masks_per_step")
    return max(1, math.ceil(AUTHORS_ITERS_PER_HALF / masks_per_step))


def default_warmup_iters(masks_per_step: int) -> int:
    """The authors' 500 warm-up steps, scaled like :func:`default_iters_per_half`."""
    _positive_int(masks_per_step, "masks_per_step")
    return math.ceil(AUTHORS_WARMUP_ITERS / masks_per_step)


def start_steps(n_targets: int, iters_per_half: int, warmup_iters: int) -> list[int]:
    """Staggered start steps: layer ``j`` starts after ``warmup + (iters_per_half // n) * j``
    steps, the authors' rule, whenever ``iters_per_half >= n``. With fewer steps per half than
    layers (e.g. 16 steps per half over ResNet-56's 27 layers at 64 masks per step) that rule
    would start every layer at once; then layer ``j`` starts after
    ``warmup + (iters_per_half * j) // n``, which still spreads the starts over one half."""
    n = max(1, n_targets)
    if iters_per_half >= n:
        return [warmup_iters + (iters_per_half // n) * j for j in range(n_targets)]
    return [warmup_iters + (iters_per_half * j) // n for j in range(n_targets)]


def _positive_int(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class Move:
    """One end-of-half decision of one layer.

    Attributes:
        step: the global step at whose end the half ended.
        layer: the layer's (channel group's) name.
        action: ``"prune"``, ``"halve"`` or ``"reset"``.
        space: ``|S|`` before the decision; ``g = space // 2``.
        worst: the largest average damage in ``P`` (``inf`` when a filter of ``P`` was never
            drawn).
        width: filters alive after the decision.
        pruned: the filters pruned by this move (original indices; empty unless ``"prune"``).
        parts: the layer's equal parts (1: no granularity rule); ``g`` is ``parts`` times
            ``floor(space / parts / 2)``.
    """

    step: int
    layer: str
    action: str
    space: int
    worst: float
    width: int
    pruned: list[int] = field(default_factory=list)
    parts: int = 1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["g"] = self.parts * (self.space // self.parts // 2)
        d["worst"] = None if math.isinf(self.worst) else self.worst  # JSON has no inf
        return d


class LayerSearch:
    """The search state of one target layer (channel group) of ``size`` filters.

    Args:
        name: the layer's name (used in moves and errors).
        size: number of filters.
        start: the first global step at which the layer draws attempts.
        iters_per_half: steps per half.
        thresh: a half's ``P`` is pruned when its largest average damage is below this.
        parts: the number of equal consecutive parts that must keep equal counts (the group's
            ``granularity``; 1 for no rule); must divide ``size``.
    """

    def __init__(self, name: str, size: int, *, start: int, iters_per_half: int,
                 thresh: float, parts: int = 1) -> None:
        _positive_int(size, "size")
        _positive_int(iters_per_half, "iters_per_half")
        _positive_int(parts, "parts")
        if size % parts:
            raise ValueError(f"layer '{name}': parts={parts} does not divide size={size}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        if not math.isfinite(thresh) or thresh < 0:
            raise ValueError(f"thresh must be a finite number >= 0, got {thresh!r}")
        self.name, self.size, self.start = name, size, start
        self.iters_per_half, self.thresh = iters_per_half, float(thresh)
        self.parts = parts
        self.alive = torch.ones(size, dtype=torch.bool)    # the base mask b
        self.space = torch.ones(size, dtype=torch.bool)    # S
        self.acc = torch.zeros(size, dtype=torch.float64)
        self.cnt = torch.zeros(size, dtype=torch.float64)
        self.steps_in_half = 0

    # -- queries -------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """Filters still alive."""
        return int(self.alive.sum())

    @property
    def h(self) -> int:
        """Filters zeroed by each attempt in each part: ``floor(|S| / parts / 2)``."""
        return int(self.space.sum()) // self.parts // 2

    @property
    def g(self) -> int:
        """Filters zeroed by each attempt: ``parts * h`` (``floor(|S| / 2)`` with one part)."""
        return self.parts * self.h

    def _space_by_part(self) -> torch.Tensor:
        """The indices of ``S``, ``(parts, |S| / parts)``: row ``i`` holds part ``i``'s."""
        idx = self.space.nonzero().flatten()
        part = idx // (self.size // self.parts)
        if bool((torch.bincount(part, minlength=self.parts) != idx.numel() // self.parts).any()):
            raise RuntimeError(f"layer '{self.name}': the search space does not hold the same "
                               f"number of filters in each of its {self.parts} parts")
        return idx.view(self.parts, -1)

    def active(self, step: int) -> bool:
        """Whether the layer draws attempts at global step ``step``."""
        return step >= self.start and self.g >= 1

    def averages(self) -> torch.Tensor:
        """``acc / cnt`` per filter, ``inf`` where ``cnt == 0``."""
        return torch.where(self.cnt > 0, self.acc / self.cnt.clamp_min(1), math.inf)

    # -- one step ------------------------------------------------------------------------------

    def draw(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """``k`` attempts, ``(k, size)`` bool, True = kept: each zeroes the base-masked filters and
        ``h`` filters of each part drawn uniformly, without replacement, from that part of ``S``
        (``g`` filters from ``S`` with one part)."""
        _positive_int(k, "k")
        h = self.h
        if h < 1:
            raise RuntimeError(f"layer '{self.name}' has one filter left"
                               + (" per part" if self.parts > 1 else "") + ": nothing to draw")
        idx = self._space_by_part()                                     # (parts, s)
        order = torch.rand(k, *idx.shape, generator=generator).argsort(dim=-1)[..., :h]
        zeroed = torch.gather(idx.expand(k, *idx.shape), 2, order)      # (k, parts, h)
        masks = self.alive.expand(k, self.size).clone()
        masks.scatter_(1, zeroed.reshape(k, -1), False)
        return masks

    def record(self, masks: torch.Tensor, t: torch.Tensor) -> None:
        """Accumulate the damages ``t`` (``(k,)``) of the attempts ``masks`` (``(k, size)``, True =
        kept) on the filters of ``S`` that each attempt zeroed."""
        if masks.shape != (masks.shape[0], self.size) or t.shape != (masks.shape[0],):
            raise ValueError(f"layer '{self.name}': masks must be (k, {self.size}) and t (k,), got "
                             f"{tuple(masks.shape)} and {tuple(t.shape)}")
        t = t.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"layer '{self.name}': non-finite damage {t[~torch.isfinite(t)][:3]}")
        hit = (~masks.to("cpu", torch.bool) & self.space).to(torch.float64)
        self.acc += t @ hit
        self.cnt += hit.sum(dim=0)

    def end_step(self, step: int) -> Move | None:
        """Call once per global step after :meth:`record` (only for steps where the layer was
        active). Returns the decision when the half ends with this step, else None."""
        if not self.active(step):
            return None
        self.steps_in_half += 1
        if self.steps_in_half < self.iters_per_half:
            return None
        return self.decide(step)

    def decide(self, step: int) -> Move:
        """End the current half now (see the module docstring)."""
        h, space = self.h, int(self.space.sum())
        if h < 1:
            raise RuntimeError(f"layer '{self.name}' has one filter left"
                               + (" per part" if self.parts > 1 else "") + ": nothing to decide")
        idx = self._space_by_part()                                     # (parts, s)
        avg, order = torch.sort(self.averages()[idx], dim=1, stable=True)
        p = torch.gather(idx, 1, order[:, :h]).flatten()                # h per part
        worst = float(avg[:, h - 1].max())
        self.acc.zero_()
        self.cnt.zero_()
        self.steps_in_half = 0
        pruned: list[int] = []
        if worst < self.thresh:
            self.alive[p] = False
            self.space = self.alive.clone()
            action, pruned = "prune", sorted(p.tolist())
        elif h > 1:
            self.space = torch.zeros_like(self.alive)
            self.space[p] = True
            action = "halve"
        else:
            self.space = self.alive.clone()
            action = "reset"
        return Move(step, self.name, action, space, worst, self.width, pruned, self.parts)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "start": self.start,
                "iters_per_half": self.iters_per_half, "thresh": self.thresh,
                "parts": self.parts, "alive": self.alive.clone(), "space": self.space.clone(),
                "acc": self.acc.clone(), "cnt": self.cnt.clone(),
                "steps_in_half": self.steps_in_half}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("name", "size", "start", "iters_per_half", "thresh"):
            if state[key] != getattr(self, key):
                raise ValueError(f"layer '{self.name}': checkpoint has {key}={state[key]!r}, "
                                 f"this search {getattr(self, key)!r}")
        parts = state.get("parts", 1)  # checkpoints written before parts existed have none
        if parts != self.parts:
            raise ValueError(f"layer '{self.name}': checkpoint has parts={parts!r}, this search "
                             f"{self.parts!r}")
        self.alive = state["alive"].clone()
        self.space = state["space"].clone()
        self.acc = state["acc"].clone()
        self.cnt = state["cnt"].clone()
        self.steps_in_half = int(state["steps_in_half"])
