"""Real channel removal, in place: the tensors shrink, the Parameter objects stay.

:func:`prune_channels_` cuts every tensor coupled to a channel group (conv/Linear weights and
biases, BN affine and running statistics, depthwise filters, the consumers' input dims, Flatten ->
Linear blocks) with :func:`aofp_ext.ops.compact_`, compacts the optimizer's per-parameter state and
the gradients along with them, and updates the module attributes (``out_channels``,
``num_features``, ``in_features``, ...). Training continues with the same optimizer.

Every cut is remembered on the model (keep-sets relative to the original widths), so that
:func:`aofp_ext.save` can store a pruned model as keep-sets plus a state dict.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import ops
from .graph import (
    ChannelGraphError,
    Inputs,
    Plan,
    Specs,
    analyze,
    axis_positions,
    input_specs,
    inputs_from_specs,
    last_trace,
    resolve_plan,
)

__all__ = ["prune_channels_", "PruningRecord", "pruning_record"]

_RECORD = "_aofp_pruning"


@dataclass
class PruningRecord:
    """What has been cut from a model: kept channels per group, relative to the original widths.

    Attributes:
        input_specs: shapes and dtypes of the example inputs the model is traced with.
        leaf_modules: extra fx leaf module types the model is traced with.
        sizes: original size of every group that has been cut.
        keep: the original indices of the channels still present, per group.
    """

    input_specs: Specs
    leaf_modules: tuple[type, ...] = ()
    sizes: dict[str, int] = field(default_factory=dict)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)


def pruning_record(model: nn.Module) -> PruningRecord | None:
    """The record of what :func:`prune_channels_` has cut from ``model``, if anything."""
    return model.__dict__.get(_RECORD)


def _role_tensors(module: nn.Module, role: str) -> list[tuple[torch.Tensor, int]]:
    """The tensors (and their dims) that one role of a module cuts."""
    if role == "in":
        names, dim = ("weight",), 1
    elif role == "norm":
        names, dim = ("weight", "bias", "running_mean", "running_var"), 0
    elif role == "prelu":
        names, dim = ("weight",), 0
    else:  # "out", "depthwise"
        names, dim = ("weight", "bias"), 0
    return [(t, dim) for t in (getattr(module, n, None) for n in names)
            if isinstance(t, torch.Tensor)]


def _set_attributes(module: nn.Module, role: str, n: int) -> None:
    """Keep the module's size attributes in step with its tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if role == "depthwise":
            module.in_channels = module.out_channels = module.groups = n
        elif role == "out":
            module.out_channels = n
        else:  # "in": only convs with groups == 1 are consumers
            module.in_channels = n
    elif isinstance(module, nn.Linear):
        if role == "out":
            module.out_features = n
        else:
            module.in_features = n
    elif isinstance(module, nn.PReLU):
        module.num_parameters = n
    elif isinstance(getattr(module, "num_features", None), int):  # BatchNorm, timm's norm-act
        module.num_features = n


def _grouped(module: nn.Module, role: str) -> int:
    """The conv groups when a cut of this role must be done group by group, else 0."""
    groups = getattr(module, "groups", 1)
    return groups if role == "in" and isinstance(module, nn.modules.conv._ConvNd) and \
        groups > 1 else 0


def _cut_grouped_in_(tensors: list[torch.Tensor], kept: torch.Tensor, groups: int) -> None:
    """Input channels of a grouped conv, in place: the weight holds ``in / groups`` input
    channels per output channel, those of its own group; each group keeps its own channels
    (the same count in every group, checked by the plan's granularity)."""
    with torch.no_grad():
        for t in tensors:
            per_in, per_out = t.shape[1], t.shape[0] // groups
            local = [kept[(kept // per_in) == g] - g * per_in for g in range(groups)]
            idx = torch.stack(local).to(t.device).repeat_interleave(per_out, 0)
            idx = idx.view(*idx.shape, *(1,) * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
            t.set_(t.gather(1, idx).contiguous())


def _trace_setup(model: nn.Module, example_inputs: Inputs | None,
                 leaf_modules: Iterable[type] | None) -> tuple[Specs, tuple[type, ...]]:
    record, last = pruning_record(model), last_trace(model)
    if example_inputs is not None:
        specs = input_specs(example_inputs)
    elif record is not None:
        specs = record.input_specs
    elif last is not None:
        specs = last[0]
    else:
        raise ChannelGraphError(
            "prune_channels_ needs the model's input shapes: call "
            "aofp_ext.channel_groups(model, example_inputs) first, or pass example_inputs=")
    if leaf_modules is None:
        leaf_modules = record.leaf_modules if record else (last[1] if last else ())
    return specs, tuple(leaf_modules)


def prune_channels_(model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer | None = None,
                    *, example_inputs: Inputs | None = None,
                    leaf_modules: Iterable[type] | None = None) -> None:
    """Remove, in place, every channel not in ``plan[group.name]``.

    Args:
        model: the model; its Parameter and buffer objects stay the same objects.
        plan: group name (see :func:`aofp_ext.channel_groups`) -> keep indices (int tensor or
            sequence; order does not matter). Groups not in the plan are left whole.
        optimizer: if given, every per-parameter state tensor shaped like its parameter
            (SGD momentum, Adam/AdamW moments, ...) is compacted with it.
        example_inputs: inputs to trace with; by default the shapes of the last
            ``channel_groups`` call on this model (or of its first cut) are reused.
        leaf_modules: fx leaf module types, by default as in that call.

    Gradients (``.grad``) are compacted with their parameters.

    Raises:
        ChannelGraphError: an unknown or not prunable group, an empty keep-set, indices out of
            range or repeated, or a plan that leaves some module without channels. Everything
            is checked before the first tensor is cut.
    """
    specs, leaf = _trace_setup(model, example_inputs, leaf_modules)
    analysis = analyze(model, inputs_from_specs(specs, model), leaf)
    keeps = resolve_plan(analysis, plan)
    cuts = []
    for axis in analysis.axes:
        kept = axis_positions(analysis, axis.layout, keeps)
        if kept is None:
            continue
        if kept.numel() == 0:
            raise ChannelGraphError(
                f"the plan leaves module '{axis.module}' with no channels (its {axis.role} dim): "
                "keep at least one channel of each of its groups' producers")
        cuts.append((model.get_submodule(axis.module), axis.role, kept))

    state = optimizer.state if optimizer is not None else {}
    for module, role, kept in cuts:
        tensors: dict[int, tuple[torch.Tensor, int]] = {}
        for t, dim in _role_tensors(module, role):
            extra = [t.grad] if t.grad is not None else []
            extra += [v for v in (state[t].values() if t in state else ())
                      if isinstance(v, torch.Tensor) and v.shape == t.shape]
            for u in (t, *extra):
                tensors.setdefault(id(u), (u, dim))
        if tensors and _grouped(module, role):
            _cut_grouped_in_([u for u, _ in tensors.values()], kept, _grouped(module, role))
        elif tensors:
            ops.compact_([u for u, _ in tensors.values()], [d for _, d in tensors.values()], kept)
        _set_attributes(module, role, kept.numel())

    record = pruning_record(model) or PruningRecord(specs, leaf)
    sizes = {g.name: g.size for g in analysis.groups}
    names = {analysis.roots[name]: name for name in plan}
    for root, keep in keeps.items():
        name = names[root]
        record.sizes.setdefault(name, sizes[name])
        record.keep[name] = record.keep.get(name, torch.arange(sizes[name]))[keep]
    model.__dict__[_RECORD] = record
