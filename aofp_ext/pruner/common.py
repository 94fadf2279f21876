"""Small pieces shared by the parts of :func:`aofp_ext.prune`: the error for a non-finite loss,
the authors' optimizer, evaluation (and the public :func:`accuracy`), the progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from .batches import to_device

__all__ = ["NonFiniteLossError", "accuracy", "evaluate", "sgd", "model_device", "progress_bar"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped (and saved a checkpoint)."""


NonFiniteLossError.__module__ = "aofp_ext.pruner"  # where it is documented and imported from


def sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    """The authors' optimizer: SGD, momentum 0.9, weight decay 1e-4 on weights, 0 on BN and
    biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                            {"params": rest, "weight_decay": 0.0}], lr=lr, momentum=0.9)


def evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], float] | None) -> float | None:
    """``eval_fn(model)`` in eval mode under ``no_grad`` (every module's mode restored after);
    None without an ``eval_fn``."""
    if eval_fn is None:
        return None
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return float(eval_fn(model))
    finally:
        for m, mode in modes:
            m.training = mode


def accuracy(loader: Iterable, device: str | torch.device | None = None
             ) -> Callable[[nn.Module], float]:
    """An ``eval_fn`` for :func:`prune`: top-1 accuracy (percent) of the model over ``loader``
    (``(inputs, labels)`` batches), on ``device`` (default: the model's)."""

    def eval_fn(model: nn.Module) -> float:
        dev = torch.device(device) if device is not None else model_device(model)
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                out = model(to_device(x, dev))
                correct += int((out.argmax(dim=1).cpu() == y).sum())
                total += int(y.numel())
        return 100.0 * correct / max(total, 1)

    return eval_fn


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def progress_bar(progress: bool, **kw: Any) -> Any:
    """A tqdm bar on stderr (``progress=False``: a disabled one)."""
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, file=sys.stderr, **kw)
