"""The settings of one :func:`aofp_ext.prune` run: checked once, then frozen.

:meth:`Settings.validate` checks every scalar argument of ``prune`` (a ``ValueError`` naming the
argument) and resolves the defaults that depend on others (``iters_per_half``, ``warmup_iters``,
``max_steps``). :meth:`Settings.config` is what a run checkpoint stores and compares on resume;
:meth:`Settings.check_same_on_every_rank` is what distributed ranks must agree on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import distributed as ddist
from ..criteria import get_criterion
from ..pricing import Target
from ..search import default_iters_per_half, default_warmup_iters

__all__ = ["Settings", "BN_MODES"]

BN_MODES = ("batch", "running")


@dataclass(frozen=True)
class Settings:
    """``prune``'s arguments that are plain values, validated; ``criterion`` is the criterion
    object for ``method != "aofp"`` (else None). ``iters_per_half``, ``warmup_iters`` and
    ``max_steps`` hold the resolved values (never None)."""

    method: str
    criterion: Any
    target_flops: float
    masks_per_step: int
    thresh: float
    iters_per_half: int
    warmup_iters: int
    max_steps: int
    lr: float
    targets: Any
    finetune_epochs: int
    finetune_lr: float
    seed: int
    bn_mode: str
    checkpoint_every: int | None
    calibration_batches: int

    @classmethod
    def validate(cls, *, method: str, method_options: dict[str, Any] | None,
                 calibration_batches: int, target_flops: float, masks_per_step: int,
                 iters_per_half: int | None, warmup_iters: int | None, max_steps: int | None,
                 checkpoint_every: int | None, finetune_epochs: int, thresh: float, lr: float,
                 finetune_lr: float, bn_mode: str, targets: Any, seed: int) -> Settings:
        """The checks of ``prune``'s arguments, in this order; raises ``ValueError``."""
        criterion = _criterion(method, method_options)
        _check_counts(calibration_batches, target_flops, masks_per_step, iters_per_half,
                      max_steps, checkpoint_every, warmup_iters, finetune_epochs)
        for v, n in ((thresh, "thresh"), (lr, "lr"), (finetune_lr, "finetune_lr")):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{n} must be a finite number >= 0, got {v!r}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        iph = iters_per_half if iters_per_half is not None else default_iters_per_half(
            masks_per_step)
        warmup = warmup_iters if warmup_iters is not None else default_warmup_iters(
            masks_per_step)
        return cls(method, criterion, target_flops, masks_per_step, thresh, iph, warmup,
                   max_steps if max_steps is not None else warmup + 200 * iph, lr, targets,
                   finetune_epochs, finetune_lr, seed, bn_mode, checkpoint_every,
                   calibration_batches)

    @property
    def pricing_bn_mode(self) -> str:
        """How followers' BN is applied when pricing: criteria score without training, on BN
        running statistics; the search as set."""
        return self.bn_mode if self.criterion is None else "running"

    def config(self, targets: list[Target]) -> dict[str, Any]:
        """What a run checkpoint stores and a resumed run must match (the checkpoint format:
        do not change it without a new checkpoint version)."""
        config = {"targets": [[t.name, t.group.size] for t in targets],
                  "masks_per_step": self.masks_per_step, "iters_per_half": self.iters_per_half,
                  "warmup_iters": self.warmup_iters, "thresh": float(self.thresh),
                  "target_flops": float(self.target_flops), "seed": self.seed,
                  "bn_mode": self.bn_mode, "method": self.method}
        if self.criterion is not None:
            config["method_options"] = self.criterion.options()
            config["calibration_batches"] = self.calibration_batches
        if ddist.is_distributed():  # a checkpoint resumes with the same number of processes
            config["world_size"] = ddist.world_size()
        return config

    def check_same_on_every_rank(self, config: dict[str, Any], own_optimizer: bool,
                                 checkpoint_dir: Any) -> None:
        """Distributed: every rank must run with these settings (a ``ValueError`` if not)."""
        ddist.check_same({**config, "max_steps": self.max_steps,
                          "finetune_epochs": self.finetune_epochs, "lr": self.lr,
                          "finetune_lr": self.finetune_lr, "own_optimizer": own_optimizer,
                          "checkpoint_dir": checkpoint_dir is not None,
                          "checkpoint_every": self.checkpoint_every}, "prune() settings")


def _criterion(method: Any, method_options: dict[str, Any] | None) -> Any:
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {method!r}")
    if method != "aofp":
        return get_criterion(method, method_options)
    if method_options:
        raise ValueError("method_options applies to the criteria (method != 'aofp'); the AOFP "
                         "search takes its settings as prune() arguments")
    return None


def _check_counts(calibration_batches: Any, target_flops: Any, masks_per_step: Any,
                  iters_per_half: Any, max_steps: Any, checkpoint_every: Any,
                  warmup_iters: Any, finetune_epochs: Any) -> None:
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or (
            calibration_batches < 1):
        raise ValueError(f"calibration_batches must be a positive integer, got "
                         f"{calibration_batches!r}")
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not (
            0 < target_flops <= 1):
        raise ValueError(f"target_flops must be a fraction in (0, 1] of the model's MACs, got "
                         f"{target_flops!r}")
    for v, n in ((masks_per_step, "masks_per_step"), (iters_per_half, "iters_per_half"),
                 (max_steps, "max_steps"), (checkpoint_every, "checkpoint_every")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{n} must be a positive integer, got {v!r}")
    if warmup_iters is not None and (not isinstance(warmup_iters, int) or warmup_iters < 0):
        raise ValueError(f"warmup_iters must be an integer >= 0, got {warmup_iters!r}")
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
