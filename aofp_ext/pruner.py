"""``prune()``: AOFP filter pruning end to end.

The model trains on its task loss with the base masks applied (the *normal path*); every step,
every target layer that has started draws ``masks_per_step`` pruning attempts and prices them
all at once with :func:`aofp_ext.ops.masked_damage` on its follower (the *attempt paths*: the
same weights, no gradient); :mod:`aofp_ext.search` turns the damages into the authors' binary
search; when the model's MACs reach ``target_flops`` the masked filters are cut for real with
:func:`aofp_ext.prune_channels_`, and the model is optionally finetuned. See docs/prune.md.

Hooks: the base masks are applied at the input of every consumer (the conv/Linear that reads a
target's channels) by a forward pre-hook, which is exactly equivalent to zeroing them at the
group's mask point (the graph analysis guarantees that only zero-preserving ops lie between the
two) and also works where the mask point is a function rather than a module, or where a group
has none (coupled groups with ``targets="all"``). The same hooks capture the follower's input
for pricing, and the follower's unmasked output norm ``||Y_base||^2``.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .flops import count_flops
from .graph import ChannelGroup, Inputs, _as_tuple, analyze, run_quietly
from .search import LayerSearch, default_iters_per_half, default_warmup_iters, start_steps
from .surgery import prune_channels_

__all__ = ["prune", "PruneResult", "NonFiniteLossError", "accuracy"]

CHECKPOINT_NAME = "aofp-checkpoint.pt"
_FORMAT = "aofp_ext.prune_checkpoint"
_VERSION = 1
_BN_MODES = ("batch", "running")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped (and saved a checkpoint)."""


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: the pruned model (the object passed to ``prune``, cut in place).
        report: widths before/after per group, MACs and params before/after, steps, seconds,
            the per-layer move history, accuracies (see docs/prune.md for every key).
    """

    model: nn.Module
    report: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Followers: where a target's attempts are priced
# --------------------------------------------------------------------------------------------

_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_}


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


@dataclass(eq=False)
class _Consumer:
    """A conv/Linear that reads target channels: its base mask and what one step captured."""

    name: str
    module: nn.Module
    width: int                      # size of its input dim
    norm: str                       # "none" | "batch" | "affine"
    bn: nn.Module | None
    post: str                       # "none" | "relu"
    keep: torch.Tensor | None = None   # (width,) float, the base masks at its input
    capture: bool = False
    calls: list[tuple[torch.Tensor, float]] = field(default_factory=list)  # (x, ||Y_base||^2)
    _x: torch.Tensor | None = None

    def geometry(self) -> dict[str, Any]:
        m = self.module
        if isinstance(m, nn.Linear):
            return {}
        return {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}

    def norm_terms(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(scale, shift, eps) of the follower's BN in the pricing mode."""
        bn = self.bn
        if bn is None:
            return None, None, 1e-5
        n = bn.num_features
        ref = next(self.module.parameters())
        w = bn.weight.detach() if bn.weight is not None else torch.ones(n, device=ref.device)
        b = bn.bias.detach() if bn.bias is not None else torch.zeros(n, device=ref.device)
        if self.norm == "affine":
            inv = torch.rsqrt(bn.running_var.detach() + bn.eps)
            return w * inv, b - bn.running_mean.detach() * w * inv, bn.eps
        return w, b, bn.eps

    def output_norm2(self, y: torch.Tensor) -> float:
        """``||f(y)||^2`` of the unmasked follower output, ``f`` = norm then post."""
        y = y.detach().float()
        scale, shift, eps = self.norm_terms()
        if self.norm == "batch" and self.post == "none":
            # sum over positions of (g z + b)^2 with z normalised: mean 0, mean z^2 = v/(v+eps)
            dims = [0, *range(2, y.dim())]
            var = y.double().var(dim=dims, unbiased=False)
            positions = y.numel() // y.shape[1]
            return float((positions * (scale.double() ** 2 * var / (var + eps)
                                       + shift.double() ** 2)).sum())
        if self.norm == "batch":
            y = F.batch_norm(y, None, None, scale, shift, training=True, eps=eps)
        elif self.norm == "affine":
            shape = (1, -1) + (1,) * (y.dim() - 2)
            y = y * scale.view(shape) + shift.view(shape)
        if self.post == "relu":
            y = torch.relu(y)
        return float(y.double().pow(2).sum())

    # -- hooks ---------------------------------------------------------------------------------

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if self.keep is not None:
            x = x * self.keep.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))
        if self.capture:
            self._x = x.detach()
        return (x, *args[1:]) if self.keep is not None else None

    def post_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.capture and self._x is not None:
            with torch.no_grad():
                self.calls.append((self._x, self.output_norm2(out)))
            self._x = None


@dataclass
class _Link:
    """A target's channels at one consumer input: masks ``(K, size)`` -> ``(K, channels)`` of the
    (possibly viewed) consumer input by ``full[:, pos] = masks[:, chan]``."""

    consumer: _Consumer
    chan: torch.Tensor       # group channel per masked position
    pos: torch.Tensor        # position in the viewed input
    pos_full: torch.Tensor   # positions in the consumer's input dim (block-expanded)
    chan_full: torch.Tensor  # group channel of each of them
    view_block: int          # Linear after flatten viewed as a conv with a (block, 1) kernel


@dataclass
class _Target:
    group: ChannelGroup
    search: LayerSearch
    links: list[_Link]

    @property
    def name(self) -> str:
        return self.group.name


def _find_follower(gm: fx.GraphModule, name: str, bn_mode: str) -> tuple[str, Any, str]:
    """(norm, bn module, post) after the consumer module ``name``: its BN (if its only user is
    one) and ReLU (if that is the next op)."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name), None)
    norm, bn, post = "none", None, "none"
    if node is None:
        return norm, bn, post
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(
            gm.get_submodule(users[0].target), nn.modules.batchnorm._BatchNorm):
        bn = gm.get_submodule(users[0].target)
        has_stats = bn.track_running_stats and bn.running_var is not None
        norm = "affine" if bn_mode == "running" and has_stats else "batch"
        node = users[0]
        users = list(node.users)
    if len(users) == 1 and _is_relu(users[0], gm):
        post = "relu"
    return norm, bn, post


def _consumer_for(model: nn.Module, gm: fx.GraphModule, name: str, bn_mode: str,
                  target: str) -> _Consumer:
    m = model.get_submodule(name)
    if isinstance(m, nn.Linear):
        width = m.in_features
    elif isinstance(m, (nn.Conv2d, nn.Conv1d)):
        if isinstance(m.padding, str) and m.padding != "valid":
            raise ValueError(f"target '{target}': its follower '{name}' uses padding="
                             f"{m.padding!r}; AOFP prices followers with explicit padding only")
        if m.padding_mode != "zeros":
            raise ValueError(f"target '{target}': its follower '{name}' uses padding_mode="
                             f"{m.padding_mode!r}; only zero padding is priced")
        width = m.in_channels
    else:
        raise ValueError(f"target '{target}': its follower '{name}' is a {type(m).__name__}; "
                         "masked_damage prices Conv1d/Conv2d and Linear followers only (pass "
                         "targets= without this group)")
    norm, bn, post = _find_follower(gm, name, bn_mode)
    return _Consumer(name, m, width, norm, bn, post)


def _link(group: ChannelGroup, consumer: _Consumer) -> _Link:
    slots = [s for s in group.consumers if s.module == consumer.name]
    pos_full, chan_full = [], []
    for s in slots:
        c = torch.arange(s.length)
        pos_full.append((s.start + c[:, None] * s.block + torch.arange(s.block)).reshape(-1))
        chan_full.append((s.group_start + c).repeat_interleave(s.block))
    pos_full_t, chan_full_t = torch.cat(pos_full), torch.cat(chan_full)
    blocks = {s.block for s in slots}
    b = blocks.pop() if len(blocks) == 1 else 1
    if (b > 1 and isinstance(consumer.module, nn.Linear) and consumer.width % b == 0
            and all(s.start % b == 0 for s in slots)):
        pos, chan = pos_full_t[::b] // b, chan_full_t[::b]
    else:
        b, pos, chan = 1, pos_full_t, chan_full_t
    return _Link(consumer, chan, pos, pos_full_t, chan_full_t, b)


#: How attempts are priced: "fused" (``ops.masked_damage``, one pass for all K attempts) or
#: "loop" (the authors' way: one masked follower forward per attempt, float32, via
#: ``ops.masked_damage_reference``). The same numbers up to float32 rounding; bench/prune.py uses
#: "loop" to time the authors' one-attempt-per-step setting at its own cost.
PRICING = "fused"


def _price(target: _Target, masks: torch.Tensor) -> torch.Tensor:
    """``t = sum damage / sum ||Y_base||^2`` over the target's consumers (and their calls)."""
    damage = torch.zeros(masks.shape[0], dtype=torch.float64)
    base = 0.0
    for link in target.links:
        c = link.consumer
        m = c.module
        w = m.weight.detach()
        bias = m.bias.detach() if m.bias is not None else None
        scale, shift, eps = c.norm_terms()
        geo = c.geometry()
        for x, b2 in c.calls:
            if link.view_block > 1:     # Linear after flatten: a conv with a (block, 1) kernel
                b = link.view_block
                xv = x.reshape(x.shape[0], -1, b, 1)
                wv = w.reshape(w.shape[0], -1, b, 1)
                kw: dict[str, Any] = {}
            elif isinstance(m, nn.Conv1d):  # as a conv2d of width 1
                xv, wv = x.unsqueeze(-1), w.unsqueeze(-1)
                kw = {"stride": (geo["stride"][0], 1), "padding": (geo["padding"][0], 0),
                      "dilation": (geo["dilation"][0], 1)}
            else:
                xv, wv, kw = x, w, dict(geo)
            full = torch.ones(masks.shape[0], xv.shape[1], dtype=torch.bool, device=x.device)
            full[:, link.pos.to(x.device)] = masks[:, link.chan.to(masks.device)].to(x.device)
            if PRICING == "loop":
                d = ops.masked_damage_reference(xv.float(), wv.float(), full, bias=bias, **kw,
                                                norm=c.norm, scale=scale, shift=shift, eps=eps,
                                                post=c.post, dtype=torch.float32)
            else:
                d = ops.masked_damage(xv.float(), wv.float(), full, bias=bias, **kw,
                                      norm=c.norm, scale=scale, shift=shift, eps=eps,
                                      post=c.post)
            damage += d.to("cpu", torch.float64)
            base += b2
    return damage / max(base, 1e-30)


# --------------------------------------------------------------------------------------------
# MACs of the masked model, without cutting it
# --------------------------------------------------------------------------------------------


class _Macs:
    """MACs as :func:`aofp_ext.count_flops` would count them after cutting the current base
    masks: each conv/Linear's MACs scale with its kept input and output fractions."""

    def __init__(self, model: nn.Module, example_inputs: Inputs, targets: list[_Target]):
        base: dict[str, int] = {}

        def hook(name: str) -> Callable:
            def fn(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
                if isinstance(m, nn.Linear):
                    base[name] = base.get(name, 0) + out.numel() * m.in_features
                else:
                    base[name] = base.get(name, 0) + out.numel() * (
                        m.in_channels // m.groups) * prod(m.kernel_size)
            return fn

        handles = []
        for name, m in model.named_modules():
            if (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed) or isinstance(
                    m, nn.Linear):
                handles.append(m.register_forward_hook(hook(name)))
        try:
            run_quietly(model, lambda *x: model(*x), _as_tuple(example_inputs))
        finally:
            for h in handles:
                h.remove()
        self.base = base
        self.total = sum(base.values())
        # module -> [(dim size, [(target index, channel per position)])] for its in / out dims
        self.terms: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(targets):
            for s in (*t.group.producers, *t.group.consumers):
                if s.role not in ("out", "in", "depthwise") or s.module not in base:
                    continue
                m = model.get_submodule(s.module)
                entry = self.terms.setdefault(s.module, {"in": [], "out": [], "depthwise": []})
                chan = (s.group_start + torch.arange(s.length)).repeat_interleave(s.block)
                entry[s.role].append((i, chan))
                entry.setdefault("in_size", m.in_features if isinstance(m, nn.Linear)
                                 else m.in_channels)
                entry.setdefault("out_size", m.out_features if isinstance(m, nn.Linear)
                                 else m.out_channels)
        self.targets = targets

    def _removed(self, refs: list, alive: list[torch.Tensor]) -> int:
        return sum(int((~alive[i][chan]).sum()) for i, chan in refs)

    def current(self, alive: list[torch.Tensor] | None = None) -> int:
        alive = alive if alive is not None else [t.search.alive for t in self.targets]
        total = 0
        for name, m0 in self.base.items():
            entry = self.terms.get(name)
            if entry is None:
                total += m0
                continue
            if entry["depthwise"]:
                f = 1 - self._removed(entry["depthwise"], alive) / entry["out_size"]
            else:
                f = ((1 - self._removed(entry["in"], alive) / entry["in_size"])
                     * (1 - self._removed(entry["out"], alive) / entry["out_size"]))
            total += m0 * f
        return int(round(total))

    def smallest(self) -> int:
        """MACs with one filter left in every target (the lowest the search can go)."""
        alive = []
        for t in self.targets:
            a = torch.zeros(t.group.size, dtype=torch.bool)
            a[0] = True
            alive.append(a)
        return self.current(alive)


# --------------------------------------------------------------------------------------------
# Data, RNG and checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], gen: torch.Generator | None = None) -> None:
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


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _loader_generator(loader: Iterable) -> torch.Generator | None:
    """A DataLoader's own ``generator`` (it decides the shuffling order), if it has one."""
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


class _Batches:
    """Cycles through ``loader`` epoch after epoch, remembering where it is, so that a resumed
    run sees the same batches: the RNG state at the start of the epoch (which decides a shuffling
    DataLoader's order) and the batches consumed since."""

    def __init__(self, loader: Iterable, example: tuple[torch.Tensor, ...],
                 device: torch.device):
        self.loader, self.example, self.device = loader, example, device
        self.epoch, self.index = 0, 0
        self.it: Any = None
        self.epoch_rng: dict[str, Any] | None = None

    def _loader_gen(self) -> torch.Generator | None:
        return _loader_generator(self.loader)

    def _start_epoch(self) -> None:
        self.epoch_rng = _rng_state(self._loader_gen())
        self.it = iter(self.loader)

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
        return _to(inputs, self.device), _to(labels, self.device)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "epoch_rng": self.epoch_rng}

    def restore(self, state: dict[str, Any]) -> None:
        """Re-create the iterator of the saved epoch and skip the batches already used. The
        caller restores the step's RNG state afterwards."""
        self.epoch, self.index, self.epoch_rng = state["epoch"], 0, state["epoch_rng"]
        self.it = None
        if self.epoch_rng is None:
            return
        _set_rng_state(self.epoch_rng, self._loader_gen())
        self.it = iter(self.loader)
        for _ in range(state["index"]):
            try:
                next(self.it)
            except StopIteration:
                raise ValueError("resuming: train_loader yields fewer batches per epoch than "
                                 "in the interrupted run; resume with the same loader") from None
            self.index += 1


class _Checkpoints:
    def __init__(self, folder: str | os.PathLike | None):
        self.path = Path(folder) / CHECKPOINT_NAME if folder is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{self.path} is not an aofp_ext.prune checkpoint")
        if state.get("version") != _VERSION:
            raise ValueError(f"{self.path}: unsupported checkpoint version {state.get('version')}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Atomic: a temporary file in the same folder, then ``os.replace``."""
        if self.path is None:
            return
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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    """The authors' optimizer: SGD, momentum 0.9, weight decay 1e-4 on weights, 0 on BN and
    biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                            {"params": rest, "weight_decay": 0.0}], lr=lr, momentum=0.9)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], float] | None) -> float | None:
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
        dev = torch.device(device) if device is not None else _model_device(model)
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                out = model(_to(x, dev))
                correct += int((out.argmax(dim=1).cpu() == y).sum())
                total += int(y.numel())
        return 100.0 * correct / max(total, 1)

    return eval_fn


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _select_targets(groups: Sequence[ChannelGroup], targets: Any,
                    model: nn.Module) -> list[ChannelGroup]:
    def conv_made(g: ChannelGroup) -> bool:
        return any(s.role == "out" and isinstance(model.get_submodule(s.module),
                                                  nn.modules.conv._ConvNd) for s in g.producers)

    if isinstance(targets, str):
        if targets not in ("auto", "all"):
            raise ValueError(f"targets must be 'auto', 'all' or a list of group names, got "
                             f"{targets!r}")
        chosen = [g for g in groups if g.prunable and g.consumers and g.size >= 2
                  and conv_made(g) and (targets == "all" or g.mask_point is not None)]
        if not chosen:
            why = "; ".join(f"'{g.name}': {g.reason or 'meets a residual add'}"
                            for g in groups if conv_made(g))[:600]
            raise ValueError(
                f"no prunable channel group to search in {type(model).__name__} with "
                f"targets={targets!r}" + (f" ({why})" if why else " (it has no conv layer)")
                + (". targets='all' also searches groups coupled through residual adds"
                   if targets == "auto" else ""))
        return chosen
    by_name = {g.name: g for g in groups}
    names = list(targets)
    if not names:
        raise ValueError("targets is an empty list: name at least one channel group")
    out = []
    for n in names:
        if n not in by_name:
            known = ", ".join(g.name for g in groups if g.prunable)
            raise ValueError(f"unknown channel group {n!r} in targets; prunable groups: {known}")
        g = by_name[n]
        if not g.prunable:
            raise ValueError(f"channel group {n!r} is not prunable: {g.reason}")
        if not g.consumers:
            raise ValueError(f"channel group {n!r} has no conv/Linear consumer to price it on")
        if g.size < 2:
            raise ValueError(f"channel group {n!r} has a single channel: nothing to search")
        out.append(g)
    return out


def _config(targets: list[_Target], **kw: Any) -> dict[str, Any]:
    return {"targets": [[t.name, t.group.size] for t in targets], **kw}


# --------------------------------------------------------------------------------------------
# prune()
# --------------------------------------------------------------------------------------------


def prune(
    model: nn.Module,
    train_loader: Iterable,
    *,
    example_inputs: Inputs,
    target_flops: float = 0.5,
    method: str = "aofp",
    masks_per_step: int = 64,
    thresh: float = 0.01,
    iters_per_half: int | None = None,
    warmup_iters: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    targets: str | Sequence[str] = "auto",
    max_steps: int | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    eval_fn: Callable[[nn.Module], float] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    bn_mode: str = "batch",
    checkpoint_every: int | None = None,
    out_dir: str | os.PathLike | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> PruneResult:
    """Prune the filters of ``model`` with AOFP until its MACs fall to ``target_flops``.

    Args:
        model: a trained CNN (``torch.fx``-traceable). Cut IN PLACE and returned as
            ``result.model``.
        train_loader: yields ``(inputs, targets)`` batches (re-iterated epoch after epoch).
        example_inputs: a tensor (or tuple) of the model's input shape; MACs are counted for it
            (pass a batch of one for per-image MACs).
        target_flops: stop when MACs <= this fraction of the MACs before, in (0, 1].
        method: ``"aofp"`` (the only one).
        masks_per_step: attempts per target layer per step (the authors: 1).
        thresh: a half is pruned when its largest average damage is below this.
        iters_per_half: steps per half; default ``ceil(1000 / masks_per_step)`` (each filter gets
            about as many attempts per half as with the authors' 1000 steps of one attempt).
        warmup_iters: steps before the first layer starts; default ``ceil(500 / masks_per_step)``.
        optimizer: the normal path's optimizer; default SGD(lr, momentum 0.9, weight decay 1e-4
            on weights, 0 on BN and biases), the authors' setting.
        lr: learning rate of the default optimizer (constant during the search).
        loss_fn: ``loss_fn(model_output, targets)``.
        targets: ``"auto"`` (every prunable conv group whose channels do not meet a residual add:
            the authors' rule), ``"all"`` (also groups coupled through adds; their damage is summed
            over all their consumers) or a list of group names.
        max_steps: stop the search after this many steps (default
            ``warmup + 200 * iters_per_half``) even if the target is not reached.
        finetune_epochs: epochs of SGD (momentum 0.9, cosine lr from ``finetune_lr`` to 0) after
            the cut.
        finetune_lr: the finetune's initial learning rate.
        eval_fn: ``eval_fn(model) -> float`` (e.g. :func:`accuracy`), reported before the search,
            after the cut and after finetuning; called in eval mode under ``no_grad``.
        device: where to run (default: the model's device).
        seed: seeds the attempt generator and, on a fresh run, torch's global RNG (data order,
            dropout).
        checkpoint_dir: folder for atomic periodic checkpoints; calling ``prune`` again with the
            same folder (and a fresh copy of the original model) resumes.
        progress: show tqdm progress bars.
        bn_mode: how a follower's BN is applied when pricing: ``"batch"`` (batch statistics, as
            the authors and as the normal path trains) or ``"running"`` (running statistics).
        checkpoint_every: save every this many search steps (default: every 60 seconds), and
            after every finetune epoch.
        out_dir: if given, ``report.json``, ``report.md``, ``widths.png`` (with matplotlib) and
            ``model.pt`` (:func:`aofp_ext.save`) are written there.
        callback: ``callback(step, info)`` after every search step (``info``: MACs fraction,
            loss, widths); an exception raised there stops the run (the last checkpoint stays).

    Raises:
        ValueError: bad arguments, a loader yielding the wrong shapes, no prunable groups, a
            target below what the searched layers can reach, or a checkpoint from other settings.
        NonFiniteLossError: the loss became NaN/inf (a checkpoint of the step before is saved).
    """
    # ---- arguments ------------------------------------------------------------------------
    if method != "aofp":
        raise ValueError(f"method must be 'aofp', got {method!r}")
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
    for v, n in ((thresh, "thresh"), (lr, "lr"), (finetune_lr, "finetune_lr")):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{n} must be a finite number >= 0, got {v!r}")
    if bn_mode not in _BN_MODES:
        raise ValueError(f"bn_mode must be one of {_BN_MODES}, got {bn_mode!r}")
    iph = iters_per_half if iters_per_half is not None else default_iters_per_half(masks_per_step)
    warmup = warmup_iters if warmup_iters is not None else default_warmup_iters(masks_per_step)
    step_limit = max_steps if max_steps is not None else warmup + 200 * iph

    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    example = tuple(t.to(dev) for t in _as_tuple(example_inputs))
    was_training = model.training

    # ---- targets, followers, MACs ---------------------------------------------------------
    analysis = analyze(model, example)
    groups = _select_targets(analysis.groups, targets, model)
    starts = start_steps(len(groups), iph, warmup)
    consumers: dict[str, _Consumer] = {}
    tgts: list[_Target] = []
    for g, start in zip(groups, starts):
        links = []
        for name in dict.fromkeys(s.module for s in g.consumers):
            if name not in consumers:
                consumers[name] = _consumer_for(model, analysis.gm, name, bn_mode, g.name)
            links.append(_link(g, consumers[name]))
        tgts.append(_Target(g, LayerSearch(g.name, g.size, start=start, iters_per_half=iph,
                                           thresh=float(thresh)), links))
    macs_model = _Macs(model, example, tgts)
    macs_before, params_before = count_flops(model, example)
    smallest = macs_model.smallest() / max(macs_model.total, 1)
    if target_flops < smallest:
        raise ValueError(
            f"target_flops={target_flops} cannot be reached: with one filter left in each of the "
            f"{len(tgts)} searched groups the model keeps {smallest:.3f} of its MACs (the rest "
            "is in layers that are not searched); raise target_flops or pass targets='all'")
    widths_before = {t.name: t.group.size for t in tgts}
    config = _config(tgts, masks_per_step=masks_per_step, iters_per_half=iph,
                     warmup_iters=warmup, thresh=float(thresh), target_flops=float(target_flops),
                     seed=seed, bn_mode=bn_mode, method=method)

    if optimizer is None:
        optimizer = _sgd(model, lr)
        own_optimizer = True
    else:
        own_optimizer = False
    gen = torch.Generator().manual_seed(seed)
    ckpt = _Checkpoints(checkpoint_dir)
    saved = ckpt.load()
    history: list[dict[str, Any]] = []
    timing = {"search": 0.0, "finetune": 0.0}
    info: dict[str, Any] = {"resumed_from": None}

    if saved is not None:
        if saved["config"] != config:
            diff = [k for k in config if saved["config"].get(k) != config[k]]
            raise ValueError(
                f"{ckpt.path} holds a run with other settings ({', '.join(diff)} differ: "
                f"{ {k: saved['config'].get(k) for k in diff} } there, "
                f"{ {k: config[k] for k in diff} } here); use another checkpoint_dir, or the "
                "same settings and a fresh copy of the same original model to resume")
        history = list(saved["history"])
        timing = dict(saved["timing"])
        info = dict(saved["info"])
        info["resumed_from"] = f"{saved['phase']} step {saved['step']}"
    else:
        torch.manual_seed(seed)
        info["accuracy_before"] = _evaluate(model, eval_fn)

    phase = saved["phase"] if saved is not None else "search"
    step = int(saved["step"]) if saved is not None else 0
    loss_value = float("nan")
    stop_reason = saved.get("stop_reason") if saved is not None else None

    # ---- the search -----------------------------------------------------------------------
    if phase == "search":
        batches = _Batches(train_loader, example, dev)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if own_optimizer:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            for t, s in zip(tgts, saved["search"]):
                t.search.load_state_dict(s)
            batches.restore(saved["loader"])
            _set_rng_state(saved["rng"], gen)

        def update_keep() -> None:
            for c in consumers.values():
                keep = torch.ones(c.width)
                for t in tgts:
                    for link in t.links:
                        if link.consumer is c:
                            keep[link.pos_full] = t.search.alive[link.chan_full].float()
                c.keep = None if bool((keep == 1).all()) else keep.to(dev)

        def snapshot(rng: dict[str, Any], loader_state: dict[str, Any]) -> dict[str, Any]:
            return {"phase": "search", "step": step, "config": config,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "search": [t.search.state_dict() for t in tgts], "loader": loader_state,
                    "rng": rng, "history": history, "timing": timing, "info": info,
                    "stop_reason": None}

        update_keep()
        macs_now = macs_model.current()
        if macs_now <= target_flops * macs_model.total:
            stop_reason = "target"
        handles = []
        for c in consumers.values():
            handles.append(c.module.register_forward_pre_hook(c.pre_hook))
            handles.append(c.module.register_forward_hook(c.post_hook))
        bar = _bar(progress, total=step_limit, initial=step, desc="AOFP search", unit="step")
        t_start, t_saved = time.perf_counter(), time.perf_counter()
        base_elapsed = timing["search"]
        try:
            while stop_reason is None:
                if step >= step_limit:
                    stop_reason = "max_steps"
                    break
                rng_before, loader_before = _rng_state(gen), batches.state()
                inputs, labels = batches.next()
                active = [t for t in tgts if t.search.active(step)]
                live = {id(link.consumer) for t in active for link in t.links}
                for c in consumers.values():
                    c.capture, c.calls = id(c) in live, []
                model.train()
                loss = loss_fn(model(*inputs), labels)
                if not torch.isfinite(loss.detach()).all():
                    state = snapshot(rng_before, loader_before)
                    state["nonfinite"] = True
                    ckpt.save(state)
                    where = (f"the state before this step is saved in {ckpt.path}; "
                             "resume from it with a lower lr" if ckpt.path is not None else
                             "pass checkpoint_dir= to keep the state of the step before")
                    raise NonFiniteLossError(
                        f"the loss is {float(loss.detach().float().mean())} at search step "
                        f"{step}: the search stopped ({where}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for t in active:
                        masks = t.search.draw(masks_per_step, gen)
                        tt = _price(t, masks.to(dev))
                        if not bool(torch.isfinite(tt).all()):
                            raise NonFiniteLossError(
                                f"non-finite damage for '{t.name}' at step {step}: the "
                                "follower's activations are not finite")
                        t.search.record(masks, tt)
                optimizer.step()
                for c in consumers.values():
                    c.capture, c.calls = False, []
                loss_value = float(loss.detach())
                pruned_now = False
                for t in tgts:
                    move = t.search.end_step(step)
                    if move is None:
                        continue
                    history.append(move.as_dict())
                    if move.action == "prune":
                        pruned_now = True
                        macs_now = macs_model.current()
                        if macs_now <= target_flops * macs_model.total:
                            stop_reason = "target"
                            break
                if pruned_now:
                    update_keep()
                step += 1
                timing["search"] = base_elapsed + time.perf_counter() - t_start
                frac = macs_now / max(macs_model.total, 1)
                removed = sum(t.group.size - t.search.width for t in tgts)
                bar.update(1)
                bar.set_postfix(macs=f"{frac:.3f}", pruned=removed, loss=f"{loss_value:.3f}",
                                refresh=False)
                now = time.perf_counter()
                if ckpt.path is not None and stop_reason is None and (
                        (checkpoint_every is not None and step % checkpoint_every == 0)
                        or (checkpoint_every is None and now - t_saved >= 60)):
                    ckpt.save(snapshot(_rng_state(gen), batches.state()))
                    t_saved = now
                if callback is not None:
                    callback(step, {"macs_fraction": frac, "loss": loss_value,
                                    "widths": {t.name: t.search.width for t in tgts}})
        finally:
            for h in handles:
                h.remove()
            for c in consumers.values():
                c.capture, c.calls, c.keep = False, [], None
            bar.close()
        if stop_reason == "max_steps":
            warnings.warn(f"AOFP search stopped at max_steps={step_limit} with the model at "
                          f"{macs_model.current() / macs_model.total:.3f} of its MACs, above "
                          f"target_flops={target_flops}", stacklevel=2)

        # ---- the cut ----------------------------------------------------------------------
        plan = {t.name: t.search.alive.nonzero().flatten() for t in tgts
                if t.search.width < t.group.size}
        if plan:
            prune_channels_(model, plan, optimizer=optimizer, example_inputs=example)
        info["macs_search_estimate"] = macs_model.current()
        info["widths_after"] = {t.name: t.search.width for t in tgts}
        info["plan"] = {k: v.clone() for k, v in plan.items()}
        info["accuracy_after_search"] = _evaluate(model, eval_fn)
        info["stop_reason"] = stop_reason
        info["steps"] = step
        phase = "finetune"
        ft_state: dict[str, Any] | None = None
        ckpt.save(_finetune_state(model, None, 0, step, config, history, timing, info,
                                  rng=_rng_state(_loader_generator(train_loader))))
    else:
        plan = dict(saved["info"]["plan"])
        if plan:
            prune_channels_(model, plan, example_inputs=example)
        model.load_state_dict(saved["model"])
        ft_state = saved if phase == "finetune" else None

    # ---- finetune -------------------------------------------------------------------------
    if phase == "finetune":
        _finetune(model, train_loader, example, dev, finetune_epochs, finetune_lr, loss_fn,
                  ft_state, ckpt, config, step, history, timing, info, progress)
        info["accuracy_after_finetune"] = (_evaluate(model, eval_fn) if finetune_epochs else
                                           info.get("accuracy_after_search"))
        phase = "done"
        ckpt.save(_finetune_state(model, None, finetune_epochs, step, config, history, timing,
                                  info, phase="done"))

    model.train(was_training)
    macs_after, params_after = count_flops(model, example)
    report = _report(model, tgts, widths_before, info, history, timing, config,
                     macs_before, params_before, macs_after, params_after, target_flops,
                     finetune_epochs, dev, step_limit)
    if out_dir is not None:
        from .checkpoint import save
        from .report import write_report

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save(model, Path(out_dir) / "model.pt")
        write_report(report, out_dir)
    return PruneResult(model, report)


def _bar(progress: bool, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, file=sys.stderr, **kw)


def _finetune_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int,
                    step: int, config: dict, history: list, timing: dict, info: dict,
                    phase: str = "finetune", rng: dict | None = None) -> dict[str, Any]:
    return {"phase": phase, "step": step, "config": config, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "epoch": epoch, "rng": rng if rng is not None else _rng_state(),
            "history": history, "timing": timing, "info": info, "stop_reason": info.get(
                "stop_reason")}


def _finetune(model: nn.Module, loader: Iterable, example: tuple[torch.Tensor, ...],
              dev: torch.device, epochs: int, lr: float, loss_fn: Callable, saved: dict | None,
              ckpt: _Checkpoints, config: dict, step: int, history: list, timing: dict,
              info: dict, progress: bool) -> None:
    """SGD (momentum 0.9, weight decay 1e-4 on weights), lr cosine from ``lr`` to 0 per step;
    a checkpoint after every epoch."""
    if epochs == 0:
        return
    opt = _sgd(model, lr)
    first = 0
    if saved is not None:
        first = int(saved["epoch"])
        if saved["optimizer"] is not None:
            opt.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"], _loader_generator(loader))
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    total = epochs * per_epoch if per_epoch else None
    bar = _bar(progress, total=total, initial=first * (per_epoch or 0), desc="finetune",
               unit="step")
    batches = _Batches(loader, example, dev)
    t0, base = time.perf_counter(), timing["finetune"]
    try:
        for epoch in range(first, epochs):
            batches.epoch, batches.index, batches.it = epoch, 0, None
            batches._start_epoch()
            i = 0
            while True:
                try:
                    batch = next(batches.it)
                except StopIteration:
                    break
                inputs, labels = batches.check(batch)
                frac = ((epoch * per_epoch + i) / total) if total else (epoch / epochs)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
                model.train()
                loss = loss_fn(model(*inputs), labels)
                if not torch.isfinite(loss.detach()).all():
                    raise NonFiniteLossError(
                        f"the loss is {float(loss.detach().float().mean())} in finetune epoch "
                        f"{epoch}: finetuning stopped"
                        + (f" (the state after epoch {epoch} - 1 is in {ckpt.path})"
                           if ckpt.path is not None else "") + "; lower finetune_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                i += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}",
                                lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
            timing["finetune"] = base + time.perf_counter() - t0
            ckpt.save(_finetune_state(model, opt, epoch + 1, step, config, history, timing, info,
                                      rng=_rng_state(_loader_generator(loader))))
    finally:
        bar.close()
    timing["finetune"] = base + time.perf_counter() - t0


def _report(model: nn.Module, tgts: list[_Target], widths_before: dict[str, int],
            info: dict, history: list, timing: dict, config: dict, macs_before: int,
            params_before: int, macs_after: int, params_after: int, target_flops: float,
            finetune_epochs: int, dev: torch.device, step_limit: int) -> dict[str, Any]:
    widths_after = dict(info["widths_after"])
    return {
        "model": type(model).__name__,
        "method": config["method"],
        "settings": {k: v for k, v in config.items() if k != "targets"}
        | {"max_steps": step_limit, "finetune_epochs": finetune_epochs},
        "device": str(dev),
        "targets": list(widths_before),
        "widths_before": widths_before,
        "widths_after": widths_after,
        "channels_pruned": sum(widths_before[k] - widths_after[k] for k in widths_before),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_fraction": macs_after / max(macs_before, 1),
        "params_before": params_before,
        "params_after": params_after,
        "target_flops": target_flops,
        "reached_target": macs_after <= target_flops * macs_before,
        "stop_reason": info.get("stop_reason"),
        "steps": info.get("steps"),
        "search_seconds": timing["search"],
        "finetune_seconds": timing["finetune"],
        "accuracy_before": info.get("accuracy_before"),
        "accuracy_after_search": info.get("accuracy_after_search"),
        "accuracy_after_finetune": info.get("accuracy_after_finetune"),
        "resumed_from": info.get("resumed_from"),
        "history": list(history),
    }
