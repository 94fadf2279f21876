"""Save and load pruned models as keep-sets plus a state dict (no pickled modules)."""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path

import torch
import torch.nn as nn

from .graph import ChannelGraphError, channel_groups, inputs_from_specs, last_trace
from .surgery import prune_channels_, pruning_record

__all__ = ["save", "load", "load_weights", "read_weights", "WeightsFileError"]

_FORMAT = "aofp_ext.pruned_model"
_VERSION = 1


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


def _state_dict_of(payload: object, path: Path) -> dict:
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


def load_weights(model: nn.Module, path: str | PathLike) -> nn.Module:
    """Load ``path`` into ``model``: a file written by :func:`save` (the model is cut to its
    keep-sets first), or a state dict of the model's architecture (plain, or wrapped in
    ``{'state_dict': ...}``; ``num_batches_tracked`` may be missing). Returns ``model``.

    Raises:
        WeightsFileError: the file is missing, corrupt, holds pickled objects, or its tensors do
            not fit ``model`` (missing or unexpected keys, other shapes: all named).
    """
    path = Path(path)
    payload = read_weights(path)
    if isinstance(payload, dict) and payload.get("format") == _FORMAT:
        return load(model, path)
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


def save(model: nn.Module, path: str | PathLike) -> None:
    """Store ``model`` as its keep-sets per group (relative to the original widths), the input
    shapes it is traced with, and its state dict. Loads with ``torch.load(weights_only=True)``."""
    record = pruning_record(model)
    last = last_trace(model)
    specs = record.input_specs if record else (last[0] if last else ())
    torch.save({
        "format": _FORMAT,
        "version": _VERSION,
        "input_specs": [{"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
                        for shape, dtype in specs],
        "sizes": dict(record.sizes) if record else {},
        "keep": {k: v.clone() for k, v in record.keep.items()} if record else {},
        "state_dict": model.state_dict(),
    }, path)


def load(model: nn.Module, path: str | PathLike, *,
         leaf_modules: Iterable[type] = ()) -> nn.Module:
    """Cut a freshly built model of the ORIGINAL architecture with the keep-sets stored in
    ``path`` and load the stored weights into it. Returns ``model``.

    Raises:
        WeightsFileError: the file is missing, corrupt or holds pickled objects.
        ChannelGraphError: the file is not a saved aofp_ext model, ``model`` has been pruned
            already, or its group sizes differ from those the keep-sets were made for.
    """
    payload = read_weights(path)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ChannelGraphError(f"{path} is not a model saved by aofp_ext.save")
    if payload.get("version") != _VERSION:
        raise ChannelGraphError(f"{path}: unsupported format version {payload.get('version')}")
    record = pruning_record(model)
    if record is not None and record.keep:
        raise ChannelGraphError("aofp_ext.load needs a freshly built model of the original "
                                "architecture; this one has been pruned already")
    if payload["keep"]:
        specs = []
        for spec in payload["input_specs"]:
            dtype = getattr(torch, spec["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ChannelGraphError(f"{path}: unknown input dtype {spec['dtype']!r}")
            specs.append((tuple(spec["shape"]), dtype))
        inputs = inputs_from_specs(specs, model)
        groups = {g.name: g for g in channel_groups(model, inputs, leaf_modules=leaf_modules)}
        for name, size in payload["sizes"].items():
            if name not in groups or groups[name].size != size:
                found = groups[name].size if name in groups else "no such group"
                raise ChannelGraphError(
                    f"{path} was saved from a model whose group '{name}' had {size} channels; "
                    f"the model given has {found}. Pass a freshly built model of the original "
                    "architecture.")
        prune_channels_(model, payload["keep"], example_inputs=inputs,
                        leaf_modules=leaf_modules)
    model.load_state_dict(payload["state_dict"])
    return model
