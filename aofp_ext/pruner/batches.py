"""The training data as the run sees it, and the random state a resumed run restores.

:class:`Batches` cycles through a loader epoch after epoch and remembers where it is (the RNG
state at the start of the epoch, which decides a shuffling loader's order, and the batches used
since), so that a resumed run sees the same batches; it also checks every batch against the
model's example inputs. :func:`rng_state` / :func:`set_rng_state`: torch's, Python's, NumPy's
(and CUDA's) global RNG state and optionally a generator's, as a checkpoint stores them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["Batches", "rng_state", "set_rng_state", "loader_generator", "to_device"]


def rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos),
                          int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover
        pass
    if gen is not None:
        state["gen"] = gen.get_state()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if gen is not None and "gen" in state:
        gen.set_state(state["gen"])


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    return obj


def loader_generator(loader: Iterable) -> torch.Generator | None:
    """A DataLoader's own ``generator`` (it decides the shuffling order), if it has one."""
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


class Batches:
    """Cycles through ``loader`` epoch after epoch, remembering where it is, so that a resumed
    run sees the same batches: the RNG state at the start of the epoch (which decides a shuffling
    DataLoader's order) and the batches consumed since."""

    def __init__(self, loader: Iterable, example: tuple[torch.Tensor, ...],
                 device: torch.device):
        self.loader, self.example, self.device = loader, example, device
        self.epoch, self.index = 0, 0
        self.it: Any = None
        self.epoch_rng: dict[str, Any] | None = None
        self.seen_batch: int | None = None   # samples in the first batch this run checked

    def _loader_gen(self) -> torch.Generator | None:
        return loader_generator(self.loader)

    def _set_sampler_epoch(self) -> None:
        """A sampler with ``set_epoch`` (``DistributedSampler``) shuffles by epoch number."""
        sampler = getattr(self.loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(self.epoch)

    def _start_epoch(self) -> None:
        self.epoch_rng = rng_state(self._loader_gen())
        self._set_sampler_epoch()
        self.it = iter(self.loader)

    def epoch_batches(self, epoch: int) -> Iterator[tuple[tuple[torch.Tensor, ...], Any]]:
        """One whole epoch (numbered ``epoch``: a sampler's shuffling), checked and on the
        device; for the finetune, which counts in epochs."""
        self.epoch, self.index, self.it = epoch, 0, None
        self._start_epoch()
        for batch in self.it:
            yield self.check(batch)

    def next(self) -> tuple[tuple[torch.Tensor, ...], Any]:
        if self.it is None:
            self._start_epoch()
        try:
            batch = next(self.it)
        except StopIteration:
            if self.index == 0:
                raise ValueError("train_loader yields no batches") from None
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
            try:
                batch = next(self.it)
            except StopIteration:
                raise ValueError("train_loader yields no batches") from None
        self.index += 1
        return self.check(batch)

    def check(self, batch: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("train_loader must yield (inputs, targets) pairs, got a "
                             f"{type(batch).__name__}"
                             + (f" of length {len(batch)}" if hasattr(batch, '__len__') else ""))
        inputs, labels = batch[0], batch[1]
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        if len(inputs) != len(self.example) or not all(
                isinstance(t, torch.Tensor) for t in inputs):
            raise ValueError(f"train_loader yields {len(inputs)} input tensor(s); the model "
                             f"takes {len(self.example)} (as example_inputs)")
        for i, (t, e) in enumerate(zip(inputs, self.example)):
            if t.dim() != e.dim() or t.shape[1:] != e.shape[1:]:
                raise ValueError(
                    f"train_loader yields inputs of shape {tuple(t.shape)} (batch "
                    f"{self.index} of epoch {self.epoch}, input {i}), but example_inputs has "
                    f"{tuple(e.shape)}: each sample must be {tuple(e.shape[1:])}")
            if t.dtype.is_floating_point != e.dtype.is_floating_point:
                raise ValueError(f"train_loader yields inputs of dtype {t.dtype}, "
                                 f"example_inputs has {e.dtype}")
        if isinstance(labels, torch.Tensor) and labels.dim() > 0 and (
                labels.shape[0] != inputs[0].shape[0]):
            raise ValueError(f"train_loader yields {inputs[0].shape[0]} inputs but "
                             f"{labels.shape[0]} targets in one batch")
        if self.seen_batch is None:
            self.seen_batch = int(inputs[0].shape[0])
        return to_device(inputs, self.device), to_device(labels, self.device)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "epoch_rng": self.epoch_rng}

    def batch_size(self) -> int:
        """The training batch size: that of the first batch this run read, else (a run resumed
        after its search) of the loader's first batch, from a fresh iterator."""
        if self.seen_batch is None:
            self.check(next(iter(self.loader)))
        return self.seen_batch

    def restore(self, state: dict[str, Any]) -> None:
        """Re-create the iterator of the saved epoch and skip the batches already used. The
        caller restores the step's RNG state afterwards."""
        self.epoch, self.index, self.epoch_rng = state["epoch"], 0, state["epoch_rng"]
        self.it = None
        if self.epoch_rng is None:
            return
        set_rng_state(self.epoch_rng, self._loader_gen())
        self._set_sampler_epoch()
        self.it = iter(self.loader)
        for _ in range(state["index"]):
            try:
                next(self.it)
            except StopIteration:
                raise ValueError("resuming: train_loader yields fewer batches per epoch than "
                                 "in the interrupted run; resume with the same loader") from None
            self.index += 1
