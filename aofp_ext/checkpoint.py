"""Save and load pruned models as keep-sets plus a state dict (no pickled modules)."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

import torch
import torch.nn as nn

from .graph import ChannelGraphError, channel_groups, inputs_from_specs, last_trace
from .models.weights import WeightsFileError, load_state, read_weights
from .surgery import prune_channels_, pruning_record

__all__ = ["save", "load", "load_weights", "read_weights", "WeightsFileError"]

_FORMAT = "aofp_ext.pruned_model"
_VERSION = 1


def load_weights(model: nn.Module, path: str | PathLike) -> nn.Module:
    """Load ``path`` into ``model``: a file written by :func:`save` (the model is cut to its
    keep-sets first), or a state dict of the model's architecture (plain, or wrapped in
    ``{'state_dict': ...}``; ``num_batches_tracked`` may be missing). Returns ``model``.

    Raises:
        WeightsFileError: the file is missing, corrupt, holds pickled objects, or its tensors do
            not fit ``model`` (missing or unexpected keys, other shapes: all named).
    """
    payload = read_weights(path)
    if isinstance(payload, dict) and payload.get("format") == _FORMAT:
        return _restore(model, payload, path, ())
    return load_state(model, payload, path)


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
    return _restore(model, payload, path, leaf_modules)


def _restore(model: nn.Module, payload: dict, path: str | PathLike,
             leaf_modules: Iterable[type]) -> nn.Module:
    """Cut ``model`` to the keep-sets of a payload written by :func:`save`, load its weights."""
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
