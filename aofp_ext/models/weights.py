"""Weights files of a model's architecture: read safely (``weights_only``), unwrap, check that
they fit, load. One clear error, naming the file, for whatever goes wrong."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["WeightsFileError", "read_weights", "load_state", "load_pretrained"]


class WeightsFileError(ValueError):
    """A weights file that is missing, unreadable, unsafe to load, or does not fit the model."""


def read_weights(path: str | PathLike) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear error naming the file
    for a missing, corrupt or foreign file, or one that holds pickled Python objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise WeightsFileError(
                f"{path} holds pickled Python objects (a whole model saved with torch.save(model)?); "
                "only tensors are loaded (weights_only=True). Save model.state_dict() instead."
            ) from None
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if "Unpickler error" in ln),
                   lines[0] if lines else "")
        raise WeightsFileError(f"{path} is corrupt or not a PyTorch file ({why[:200]})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise WeightsFileError(f"{path} is corrupt or not a PyTorch file "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _state_dict_of(payload: object, path: str | PathLike) -> dict:
    """A plain state dict, or one wrapped in {'state_dict' | 'model' | 'state_dict_ema': ...}, with
    a DataParallel ``module.`` prefix removed."""
    state = payload
    if isinstance(payload, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(payload.get(key), Mapping):
                state = payload[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{path} holds no state dict of tensors (got {type(payload).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state(model: nn.Module, payload: object, path: str | PathLike) -> nn.Module:
    """Load ``payload`` (what :func:`read_weights` read from ``path``) into ``model``: a state
    dict of the model's architecture, plain or wrapped; ``num_batches_tracked`` may be missing.

    Raises:
        WeightsFileError: no state dict, or tensors that do not fit ``model`` (missing or
            unexpected keys, other shapes: all named).
    """
    state = _state_dict_of(payload, path)
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        parts = [f"{len(wrong)} of other shapes ({'; '.join(wrong[:3])})" if wrong else "",
                 f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})" if unexpected else ""]
        raise WeightsFileError(f"{path} does not fit {type(model).__name__}: tensors "
                               + ", ".join(p for p in parts if p))
    model.load_state_dict(state, strict=False)
    return model


def load_pretrained(model: nn.Module, path: str | PathLike) -> nn.Module:
    """Load a checkpoint into ``model`` (``weights_only``; a ``{'state_dict': ...}`` wrapper and a
    ``module.`` prefix are handled; ``num_batches_tracked`` may be missing). Returns ``model``.

    Raises:
        WeightsFileError (a ValueError): the file is missing, corrupt, holds no state dict, or
            does not fit ``model``.
    """
    return load_state(model, read_weights(path), path)
