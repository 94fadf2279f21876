"""Where a target group's attempts are priced, and what a set of base masks costs in MACs.

Shared by every selection method (:mod:`aofp_ext.pruner`, :mod:`aofp_ext.criteria`):

- :class:`Consumer`: a conv/Linear reading target channels, with forward hooks that apply the
  base masks at its input and capture that input (and ``||Y_base||^2`` of its output) for pricing;
- :class:`Link` / :class:`Target`: a channel group's channels at each consumer input;
- :func:`price`: the damage of K masks of one target, summed over its consumers and captured
  batches, through :func:`aofp_ext.ops.masked_damage`; :func:`price_single`: that of every
  single-channel removal (the Gram diagonal at linear followers);
- :class:`MacsModel`: the MACs the model would have after cutting given base masks, without
  cutting it; :func:`select_targets`: the ``targets=`` rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .flops import forward_macs, layer_macs
from .graph import ChannelGroup, Inputs
from .search import LayerSearch

__all__ = ["Call", "Consumer", "Link", "Target", "find_follower", "consumer_for", "link", "price",
           "price_parts", "price_single", "channel_variance", "follower_view", "is_linear",
           "PRICING", "MacsModel", "select_targets", "build_targets"]

# --------------------------------------------------------------------------------------------
# Followers: where a target's attempts are priced
# --------------------------------------------------------------------------------------------

_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_}


def is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def channel_variance(y: torch.Tensor) -> torch.Tensor:
    """``(C,)`` float64 biased variance of ``y`` ``(N, C, ...)`` over every dim but 1 (BN's batch
    statistics), from the sums of ``y`` and ``y^2`` per channel: two contiguous per-sample
    reductions accumulated in float64, no temporary (several times faster than a float64
    ``var`` over the strided dims; 1.2-3x faster than centring first). The float64 sums make
    the subtraction ``E[y^2] - E[y]^2`` lose about ``1e-16 E[y]^2 / var`` relative, far below
    float32 data's own resolution (``1e-7 |E[y]|``, squared: ``1e-14 E[y]^2``)."""
    n, c = y.shape[:2]
    v = y.reshape(n, c, -1)
    positions = v.shape[0] * v.shape[2]
    mean = v.sum(dim=2, dtype=torch.float64).sum(dim=0) / positions
    sq = torch.linalg.vector_norm(v, dim=2, dtype=torch.float64).square().sum(dim=0)
    return (sq / positions - mean.square()).clamp_min_(0)


class Call(NamedTuple):
    """One captured forward of a consumer: its (base-masked) input, ``||f(Y_base)||^2`` and,
    where BN runs on batch statistics, the output ``Y_base`` itself (the moments path may
    price only the channels the masks vary from it: ``ops.masked_damage(output=)``)."""
    x: torch.Tensor
    norm2: torch.Tensor
    y: torch.Tensor | None
    y_version: int = 0     # y._version when captured: changed in place since, it is not used

    def output(self) -> torch.Tensor | None:
        return self.y if self.y is not None and self.y._version == self.y_version else None


@dataclass(eq=False)
class Consumer:
    """A conv/Linear that reads target channels: its base mask and what one step captured."""

    name: str
    module: nn.Module
    width: int                      # size of its input dim
    norm: str                       # "none" | "batch" | "affine"
    bn: nn.Module | None
    post: str                       # "none" | "relu"
    keep: torch.Tensor | None = None   # (width,) float, the base masks at its input
    capture: bool = False
    calls: list[Call] = field(default_factory=list)
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

    def output_norm2(self, y: torch.Tensor) -> torch.Tensor:
        """``||f(y)||^2`` of the unmasked follower output, ``f`` = norm then post: a 0-d float64
        tensor on ``y``'s device (no device sync here; the search reads it once per step)."""
        y = y.detach().float()
        if isinstance(self.module, nn.Linear):
            y = y.reshape(-1, y.shape[-1])
        scale, shift, eps = self.norm_terms()
        if self.norm == "batch" and self.post == "none":
            # sum over positions of (g z + b)^2 with z normalised: mean 0, mean z^2 = v/(v+eps)
            var = channel_variance(y)
            positions = y.numel() // y.shape[1]
            return (positions * (scale.double() ** 2 * var / (var + eps)
                                 + shift.double() ** 2)).sum()
        if self.norm == "batch":
            y = F.batch_norm(y, None, None, scale, shift, training=True, eps=eps)
        elif self.norm == "affine":
            shape = (1, -1) + (1,) * (y.dim() - 2)
            y = y * scale.view(shape) + shift.view(shape)
        if self.post == "relu":
            y = torch.relu(y)
        return torch.linalg.vector_norm(y, dtype=torch.float64).square()

    # -- hooks ---------------------------------------------------------------------------------

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        last = isinstance(self.module, nn.Linear)  # channels in the last dim, else in dim 1
        if self.keep is not None:  # (width,) for the whole batch, or (N, width) per sample
            k = self.keep.to(x.dtype)
            if last:
                x = x * (k if k.dim() == 1 else
                         k.view(k.shape[:1] + (1,) * (x.dim() - 2) + k.shape[1:]))
            else:
                x = x * (k.view((1, -1) + (1,) * (x.dim() - 2)) if k.dim() == 1
                         else k.view(k.shape + (1,) * (x.dim() - 2)))
        if self.capture:  # a Linear over maps or tokens prices as one over every position
            self._x = (x.reshape(-1, x.shape[-1]) if last else x).detach()
        return (x, *args[1:]) if self.keep is not None else None

    def post_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.capture and self._x is not None:
            with torch.no_grad():
                y = out.detach() if self.norm == "batch" and out.dtype == torch.float32 else None
                self.calls.append(Call(self._x, self.output_norm2(out), y,
                                       0 if y is None else y._version))
            self._x = None


@dataclass
class Link:
    """A target's channels at one consumer input: masks ``(K, size)`` -> ``(K, channels)`` of the
    (possibly viewed) consumer input by ``full[:, pos] = masks[:, chan]``."""

    consumer: Consumer
    chan: torch.Tensor       # group channel per masked position
    pos: torch.Tensor        # position in the viewed input
    pos_full: torch.Tensor   # positions in the consumer's input dim (block-expanded)
    chan_full: torch.Tensor  # group channel of each of them
    view_block: int          # Linear after flatten viewed as a conv with a (block, 1) kernel


@dataclass
class Target:
    group: ChannelGroup
    search: LayerSearch | None
    links: list[Link]

    @property
    def name(self) -> str:
        return self.group.name


def find_follower(gm: fx.GraphModule, name: str, bn_mode: str) -> tuple[str, Any, str]:
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
    if len(users) == 1 and is_relu(users[0], gm):
        post = "relu"
    return norm, bn, post


def consumer_for(model: nn.Module, gm: fx.GraphModule, name: str, bn_mode: str,
                  target: str) -> Consumer:
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
    norm, bn, post = find_follower(gm, name, bn_mode)
    return Consumer(name, m, width, norm, bn, post)


def link(group: ChannelGroup, consumer: Consumer) -> Link:
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
    return Link(consumer, chan, pos, pos_full_t, chan_full_t, b)


#: How attempts are priced: "fused" (``ops.masked_damage``, one pass for all K attempts) or
#: "loop" (the authors' way: one masked follower forward per attempt, float32, via
#: ``ops.masked_damage_reference``). The same numbers up to float32 rounding; bench/prune.py uses
#: "loop" to time the authors' one-attempt-per-step setting at its own cost.
PRICING = "fused"


def follower_view(link: Link, x: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(x, weight, geometry)`` of the link's consumer as :mod:`aofp_ext.ops` prices it: a Linear
    after ``flatten`` as a conv with a ``(block, 1)`` kernel, a Conv1d as a Conv2d of width 1, a
    grouped conv with its ``groups`` (priced conv group by conv group)."""
    m = link.consumer.module
    w = m.weight.detach()
    geo = link.consumer.geometry()
    if link.view_block > 1:     # Linear after flatten: a conv with a (block, 1) kernel
        b = link.view_block
        return x.reshape(x.shape[0], -1, b, 1), w.reshape(w.shape[0], -1, b, 1), {}
    groups = {"groups": m.groups} if getattr(m, "groups", 1) > 1 else {}
    if isinstance(m, nn.Conv1d):  # as a conv2d of width 1
        return x.unsqueeze(-1), w.unsqueeze(-1), {
            "stride": (geo["stride"][0], 1), "padding": (geo["padding"][0], 0),
            "dilation": (geo["dilation"][0], 1), **groups}
    return x, w, {**geo, **groups}


def output_view(link: Link, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The captured output ``y`` as :func:`follower_view` views the consumer (``x``: its
    captured input): a Linear after ``flatten`` as a conv's ``(N, O, 1, 1)``, a Conv1d's with
    width 1, a Linear over maps or tokens as one over every position."""
    if y is None:
        return None
    m = link.consumer.module
    if link.view_block > 1:
        return y.reshape(x.shape[0], -1, 1, 1)
    if isinstance(m, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    if isinstance(m, nn.Conv1d):
        return y.unsqueeze(-1)
    return y


def price(target: Target, masks: torch.Tensor, *, parts: bool = False
          ) -> torch.Tensor | tuple[torch.Tensor, float]:
    """``t = sum damage / sum ||Y_base||^2`` over the target's consumers (and their calls).

    With ``parts=True``: the numerator (float64 ``(K,)``, on the CPU) and the denominator
    separately, ``t = damage / max(base, 1e-30)``; a distributed search sums both over the ranks
    before dividing (the damages over the whole global batch)."""
    (damage, base), = price_parts([(target, masks)])
    if parts:
        return damage, base
    return damage / max(base, 1e-30)


def price_parts(items: Sequence[tuple[Target, torch.Tensor]]
                ) -> list[tuple[torch.Tensor, float]]:
    """``price(target, masks, parts=True)`` for each ``(target, masks)``, with a single copy of
    all the results to the CPU (one device sync for the whole search step)."""
    on_device = [_price_on_device(t, m) for t, m in items]
    if not on_device:
        return []
    flat = torch.cat([torch.cat([d.reshape(-1), b.reshape(1).to(d.device)])
                      for d, b in on_device]).cpu()
    out, i = [], 0
    for d, _ in on_device:
        k = d.numel()
        out.append((flat[i:i + k], float(flat[i + k])))
        i += k + 1
    return out


def _price_on_device(target: Target, masks: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed damage (float64 ``(K,)``) and ``sum ||Y_base||^2`` (0-d float64), both on the
    followers' device."""
    damage: torch.Tensor | None = None
    base: torch.Tensor | None = None
    for link in target.links:
        c = link.consumer
        m = c.module
        bias = m.bias.detach() if m.bias is not None else None
        scale, shift, eps = c.norm_terms()
        for call in c.calls:
            x, b2, y = call.x, call.norm2, call.output()
            xv, wv, kw = follower_view(link, x)
            full = torch.ones(masks.shape[0], xv.shape[1], dtype=torch.bool, device=x.device)
            full[:, link.pos.to(x.device)] = masks[:, link.chan.to(masks.device)].to(x.device)
            if PRICING == "loop":
                d = ops.masked_damage_reference(xv.float(), wv.float(), full, bias=bias, **kw,
                                                norm=c.norm, scale=scale, shift=shift, eps=eps,
                                                post=c.post, dtype=torch.float32)
            else:
                d = ops.masked_damage(xv.float(), wv.float(), full, bias=bias, **kw,
                                      norm=c.norm, scale=scale, shift=shift, eps=eps,
                                      post=c.post, output=output_view(link, y, x))
            d = d.to(x.device, torch.float64)
            damage = d if damage is None else damage.add_(d)
            b2 = torch.as_tensor(b2, dtype=torch.float64, device=x.device)
            base = b2 if base is None else base + b2
    if damage is None:
        damage = torch.zeros(masks.shape[0], dtype=torch.float64, device=masks.device)
        base = torch.zeros((), dtype=torch.float64, device=masks.device)
    return damage, base


def is_linear(consumer: Consumer) -> bool:
    """Whether masks' damage at this consumer is a quadratic form (:func:`ops.channel_gram`):
    no BN on batch statistics and no ReLU after it."""
    return consumer.norm in ("none", "affine") and consumer.post == "none"


def price_single(target: Target) -> torch.Tensor:
    """``(size,)`` float64: :func:`price` of every single-channel removal (the one-hot masks), on
    the captured calls. At a linear consumer (:func:`is_linear`) it is the Gram form
    ``r_c^T G r_c`` with ``G = ops.channel_gram`` (its diagonal when each channel has one input
    position); elsewhere ``ops.masked_damage`` with the ``size`` one-hot masks."""
    size = target.group.size
    damage = torch.zeros(size, dtype=torch.float64)
    base = 0.0
    for link in target.links:
        c = link.consumer
        m = c.module
        scale, shift, eps = c.norm_terms()
        for x, b2, *_ in c.calls:
            xv, wv, kw = follower_view(link, x)
            pos, chan = link.pos.to(x.device), link.chan.to(x.device)
            if is_linear(c):
                g = ops.channel_gram(xv.float(), wv.float(), **kw,
                                     scale=scale if c.norm == "affine" else None)
                r = torch.zeros(size, xv.shape[1], dtype=torch.float64, device=x.device)
                r[chan, pos] = 1.0
                d = ((r @ g.double()) * r).sum(dim=1)
            else:
                bias = m.bias.detach() if m.bias is not None else None
                full = torch.ones(size, xv.shape[1], dtype=torch.bool, device=x.device)
                full[chan, pos] = False          # row c: channel c removed at all its positions
                d = ops.masked_damage(xv.float(), wv.float(), full, bias=bias, **kw,
                                      norm=c.norm, scale=scale, shift=shift, eps=eps,
                                      post=c.post)
            damage += d.to("cpu", torch.float64)
            base += float(b2)
    return damage / max(base, 1e-30)


# --------------------------------------------------------------------------------------------
# MACs of the masked model, without cutting it
# --------------------------------------------------------------------------------------------


class MacsModel:
    """MACs as :func:`aofp_ext.count_flops` would count them after cutting the current base
    masks: each conv/Linear's MACs scale with its kept input and output fractions."""

    def __init__(self, model: nn.Module, example_inputs: Inputs, targets: list[Target]):
        base: dict[str, int] = {}

        def hook(name: str) -> Callable:
            def fn(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
                base[name] = base.get(name, 0) + layer_macs(m, out)
            return fn

        hooks = {m: hook(name) for name, m in model.named_modules()
                 if (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed)
                 or isinstance(m, nn.Linear)}
        total = forward_macs(model, example_inputs, hooks)
        # MACs outside conv/Linear modules (attention products, functional layers): never cut
        self.fixed = max(total - sum(base.values()), 0)
        self.base = base
        self.total = self.fixed + sum(base.values())
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
        total = self.fixed
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
        """MACs with one filter left in every target, one per part in a target with a
        granularity (the lowest the search can go)."""
        alive = []
        for t in self.targets:
            a = torch.zeros(t.group.size, dtype=torch.bool)
            a[::t.group.size // t.group.granularity] = True
            alive.append(a)
        return self.current(alive)



#: Why groups with a granularity rule (grouped convs, chunk) are not selected by a criterion.
_GRANULAR = ("its keep-set must keep equal counts in equal parts (a grouped conv or chunk), "
             "which the criteria (method != 'aofp') do not enforce; method='aofp' searches it")


def _why_not(g: ChannelGroup, search_parts: bool) -> str:
    if g.reason:
        return g.reason
    return _GRANULAR if g.granularity > 1 and not search_parts else "meets a residual add"


def select_targets(groups: Sequence[ChannelGroup], targets: Any, model: nn.Module, *,
                   search_parts: bool = True) -> list[ChannelGroup]:
    """The groups ``targets`` (``"auto"``, ``"all"`` or names) selects. ``search_parts``: whether
    the selection keeps equal counts per part (the AOFP search does, with
    ``LayerSearch(parts=granularity)``; the criteria do not), i.e. whether groups with a
    granularity rule (grouped convs, ``chunk``) can be targets."""
    def conv_made(g: ChannelGroup) -> bool:
        return any(s.role == "out" and isinstance(model.get_submodule(s.module),
                                                  nn.modules.conv._ConvNd) for s in g.producers)

    if isinstance(targets, str):
        if targets not in ("auto", "all"):
            raise ValueError(f"targets must be 'auto', 'all' or a list of group names, got "
                             f"{targets!r}")
        chosen = [g for g in groups if g.prunable and g.consumers and g.size >= 2
                  and g.spatial  # filters: of a conv, or of a Linear over positions
                  and (search_parts or g.granularity == 1)
                  and (targets == "all" or g.mask_point is not None)]
        if not chosen:
            why = "; ".join(f"'{g.name}': {_why_not(g, search_parts)}"
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
        if g.granularity > 1 and not search_parts:
            raise ValueError(f"channel group {n!r}: {_GRANULAR} (granularity "
                             f"{g.granularity}); or cut it with aofp_ext.prune_channels_")
        out.append(g)
    return out


def build_targets(model: nn.Module, gm: fx.GraphModule, groups: Sequence[ChannelGroup],
                  bn_mode: str = "batch",
                  searches: Sequence[LayerSearch | None] | None = None
                  ) -> tuple[list[Target], dict[str, Consumer]]:
    """One :class:`Target` per group (with its links to shared :class:`Consumer` objects, one per
    consumer module) and the consumers by module name."""
    consumers: dict[str, Consumer] = {}
    tgts: list[Target] = []
    searches = list(searches) if searches is not None else [None] * len(groups)
    for g, search in zip(groups, searches):
        links = []
        for name in dict.fromkeys(s.module for s in g.consumers):
            if name not in consumers:
                consumers[name] = consumer_for(model, gm, name, bn_mode, g.name)
            links.append(link(g, consumers[name]))
        tgts.append(Target(g, search, links))
    return tgts, consumers


def base_keep(tgts: Sequence[Target], consumers: dict[str, Consumer],
              alive: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Set every consumer's ``keep`` (the base masks at its input) from ``alive[i]`` (bool, one
    per target): ``None`` where nothing is masked."""
    for c in consumers.values():
        keep = torch.ones(c.width)
        for t, a in zip(tgts, alive):
            for ln in t.links:
                if ln.consumer is c:
                    keep[ln.pos_full] = a[ln.chan_full].float()
        c.keep = None if bool((keep == 1).all()) else keep.to(device)
