"""The checkpoint of a :func:`aofp_ext.prune` run (``checkpoint_dir/aofp-checkpoint.pt``): how
it is written (atomically, by rank 0, with every rank's data position and RNG state), read back,
and what it holds in each phase. Not to be confused with :mod:`aofp_ext.checkpoint`, which saves
and loads a finished pruned *model*.

A checkpoint is a dict ``{"format", "version", "phase", "step", "config", "model", "optimizer",
"rng", "history", "timing", "info", "stop_reason", ...}``; the ``"search"`` phase adds
``"search"`` (every target's search state) and ``"loader"`` (the data position), the
``"finetune"`` and ``"done"`` phases add ``"epoch"``; a distributed run adds ``"ranks"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import distributed as ddist
from ..pricing import Target
from .batches import Batches, rng_state, set_rng_state

__all__ = ["CHECKPOINT_NAME", "RunCheckpoint", "RunState", "start_or_resume"]

CHECKPOINT_NAME = "aofp-checkpoint.pt"
_FORMAT = "aofp_ext.prune_checkpoint"
_VERSION = 1


class RunCheckpoint:
    """The checkpoint file of a run in ``folder`` (None: no checkpoints; every call is a no-op).

    In a distributed run only rank 0 reads and writes the file: a checkpoint holds every rank's
    data position and RNG state (``"ranks"``), and on resume rank 0 hands it to every rank, each
    taking its own entry."""

    def __init__(self, folder: str | os.PathLike | None):
        self.path = Path(folder) / CHECKPOINT_NAME if folder is not None else None
        if self.path is not None and ddist.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, Any] | None:
        if self.path is None:
            return None
        state = ddist.broadcast_call(self._load)
        ranks = state.get("ranks") if state is not None else None
        if ranks is not None and len(ranks) == ddist.world_size():
            state = {**state, **{k: v for k, v in ranks[ddist.rank()].items() if v is not None}}
        return state

    def _load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{self.path} is not an aofp_ext.prune checkpoint")
        if state.get("version") != _VERSION:
            raise ValueError(f"{self.path}: unsupported checkpoint version {state.get('version')}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Atomic: a temporary file in the same folder, then ``os.replace``. Distributed: every
        rank must call it at the same step; rank 0 writes."""
        if self.path is None:
            return
        if ddist.is_distributed():
            ranks = ddist.all_gather({"rng": state.get("rng"), "loader": state.get("loader")})
            if not ddist.is_main():
                return
            state = {**state, "ranks": ranks}
        state = {"format": _FORMAT, "version": _VERSION, **state}
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()


@dataclass
class RunState:
    """Where a run is: what a checkpoint records besides the model, optimizer and data.

    ``phase``: ``"search"`` (selecting), ``"finetune"`` (cut, finetuning) or ``"done"``;
    ``saved``: the checkpoint this run resumed from (None: a fresh run)."""

    config: dict[str, Any]
    phase: str = "search"
    step: int = 0
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=lambda: {"search": 0.0, "finetune": 0.0})
    info: dict[str, Any] = field(default_factory=lambda: {"resumed_from": None})
    saved: dict[str, Any] | None = None

    def search_snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        targets: list[Target], rng: dict[str, Any],
                        loader: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint during the search (``rng`` and ``loader``: the data position to resume
        from)."""
        return {"phase": "search", "step": self.step, "config": self.config,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "search": [t.search.state_dict() for t in targets], "loader": loader,
                "rng": rng, "history": self.history, "timing": self.timing, "info": self.info,
                "stop_reason": None}

    def restore_search(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       targets: list[Target], batches: Batches, gen: torch.Generator,
                       lr: float | None) -> None:
        """Resuming during the search: what :meth:`search_snapshot` saved back in place (the
        optimizer's lr reset to ``lr`` unless None: the caller's own optimizer)."""
        saved = self.saved
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        for t, state in zip(targets, saved["search"]):
            t.search.load_state_dict(state)
        batches.restore(saved["loader"])
        set_rng_state(saved["rng"], gen)

    def cut_snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     epoch: int, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        """A checkpoint after the cut (``phase`` "finetune" or "done"), after ``epoch`` finetune
        epochs; ``rng`` defaults to the global RNG state."""
        return {"phase": self.phase, "step": self.step, "config": self.config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "epoch": epoch, "rng": rng if rng is not None else rng_state(),
                "history": self.history, "timing": self.timing, "info": self.info,
                "stop_reason": self.info.get("stop_reason")}


def start_or_resume(store: RunCheckpoint, config: dict[str, Any], seed: int,
                    evaluate: Callable[[], float | None]) -> RunState:
    """The saved run in ``store`` if any (a ``ValueError`` if its settings differ from
    ``config``); else a fresh one: torch's RNG seeded with ``seed``, ``evaluate()`` recorded as
    the accuracy before."""
    saved = store.load()
    if saved is None:
        run = RunState(config)
        torch.manual_seed(seed)
        run.info["accuracy_before"] = evaluate()
        return run
    if saved["config"] != config:
        diff = [k for k in config if saved["config"].get(k) != config[k]]
        raise ValueError(
            f"{store.path} holds a run with other settings ({', '.join(diff)} differ: "
            f"{ {k: saved['config'].get(k) for k in diff} } there, "
            f"{ {k: config[k] for k in diff} } here); use another checkpoint_dir, or the "
            "same settings and a fresh copy of the same original model to resume")
    info = dict(saved["info"])
    info["resumed_from"] = f"{saved['phase']} step {saved['step']}"
    return RunState(config, saved["phase"], int(saved["step"]), saved.get("stop_reason"),
                    list(saved["history"]), dict(saved["timing"]), info, saved)
