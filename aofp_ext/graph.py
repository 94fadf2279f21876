"""Channel groups of a CNN, found with torch.fx, and the masked preview of a pruning plan.

A *channel group* is a set of channels that must be kept or removed together: the output channels
of a conv/Linear, the BN entries and depthwise filters that ride along with them, every other
producer coupled to them through a residual ``add`` or an element-wise product, and the input
channels of every layer that consumes them (``cat`` places a group at an offset; ``flatten``
gives each channel a block of ``H * W`` neurons of the following Linear).

How it works: the model is traced with ``torch.fx`` (``torch.nn`` modules are leaves), shapes are
propagated with fake tensors (no compute, the model is not touched), and every followed tensor
gets a *channel dim* (1 after a conv or BN, the last dim after a Linear; ``permute``/``reshape``
move it) and a *layout* along it: a list of segments ``(source, first channel, channels, block)``.
Convs and Linears create sources; channel-wise ops pass layouts through; ``cat`` concatenates
them; ``add``/``mul`` unify them in a union-find with offsets; ``split``/``chunk``/slices cut them
into pieces. A tensor the analysis does not follow has no layout: where it meets followed
channels, they become not prunable. Grouped
convs and ``chunk`` add a *granularity* rule (equal counts kept in equal parts). Functional norms
and layers count as their module when their tensors are that module's attributes. Anything the
analysis cannot follow (an unknown op, a slice at bounds fixed in code, channel padding, the model
output) marks the groups it touches not prunable, with a reason that names the op -- never a
silently wrong cut. A submodule that torch.fx cannot trace becomes an opaque leaf.
"""

from __future__ import annotations

import operator
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import lcm, prod
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = ["ChannelSlot", "ChannelGroup", "ChannelGraphError", "OpaqueModuleWarning",
           "channel_groups", "masked_forward"]

Inputs = torch.Tensor | Sequence[torch.Tensor]
Plan = Mapping[str, Any]


class ChannelGraphError(RuntimeError):
    """The model could not be traced, or a plan does not fit its channel groups."""


class OpaqueModuleWarning(UserWarning):
    """Submodules that torch.fx cannot trace were made opaque leaves (not prunable)."""


@dataclass(frozen=True)
class ChannelSlot:
    """Where a run of a group's channels sits in one module tensor dim.

    Group channels ``group_start .. group_start + length - 1`` occupy positions
    ``start + (c - group_start) * block + b`` (``b < block``) along the module's dim.

    Attributes:
        module: qualified name of the module (``model.get_submodule(module)``).
        role: ``"out"`` (conv/Linear output dim), ``"norm"`` (BatchNorm/InstanceNorm entries),
            ``"depthwise"`` (a depthwise conv's filters), ``"prelu"`` or ``"in"`` (conv/Linear input
            dim).
        start: first position along the module's dim.
        group_start: first group channel of the run.
        length: number of group channels in the run.
        block: positions per channel (``H * W`` for a Linear after ``flatten``, else 1).
    """

    module: str
    role: str
    start: int
    group_start: int
    length: int
    block: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or removed together (see the module docstring).

    Attributes:
        name: stable name, the first producing module in graph order (``"layer1.0.conv1"``);
            groups without a producing module are named ``"@<fx node>"``.
        size: number of channels.
        producers: slots of the ``out``, ``norm``, ``depthwise`` and ``prelu`` roles.
        consumers: slots of the ``in`` role.
        mask_point: fx node name after which zeroing the group's channels equals removing them
            (after the producer's BN and activation), or None when no single such point exists
            (e.g. a residual stream with several producers): then the group is masked at every
            consumer's input.
        mask_module: qualified name of the module whose output is ``mask_point``, when it is one.
        prunable: whether ``prune_channels_`` may cut this group.
        reason: why not, naming the op, when not prunable.
        granularity: the group's channels form ``granularity`` equal consecutive parts (the
            channel groups of a grouped conv, the parts of ``chunk``) and a keep-set must keep
            the same number of channels in each part; 1 for no constraint.
        spatial: a conv/Linear making the group's channels makes them at every position of a
            map or a sequence (a conv; a Linear over channels-last maps or tokens), not as the
            features of one vector per sample.
    """

    name: str
    size: int
    producers: tuple[ChannelSlot, ...]
    consumers: tuple[ChannelSlot, ...]
    mask_point: str | None
    mask_module: str | None
    prunable: bool
    reason: str | None = None
    granularity: int = 1
    spatial: bool = False


# --------------------------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------------------------

# Channel-wise, parameter-free modules. The first set maps 0 to 0.
_ZERO_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d,
)
# Modules and functions that work over the dims after dim 1 (pools, resampling, padding): they
# keep channels apart only when the channel dim is dim 1.
_SPATIAL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.ConstantPad2d,
)
_NONZERO_MODULES: tuple[type, ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.ConstantPad2d)
_ACT_MODULES: tuple[type, ...] = (  # may sit in a producer's chain (before its mask point)
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus,
)

_ZERO_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.hardtanh, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate,
    torch.abs, torch.neg, operator.neg,
}
_NONZERO_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, torch.clamp}
_ACT_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.hardtanh, F.softsign,
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus,
}
_ZERO_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "abs", "neg", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type_as",
}
_NONZERO_METHODS = {"sigmoid", "sigmoid_", "exp", "clamp", "clamp_", "clamp_min", "clamp_max"}
_ACT_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate,
}
# dim orders: the channel dim moves with its dim
_PERMUTE_FUNCTIONS = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims}
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}

_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_META_METHODS = {"size", "dim", "numel", "get_device"}  # read shapes only
# new tensors that take only the dtype/device of their input (DropPath's random mask)
_CREATE_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full"}
# F.batch_norm / F.instance_norm arguments that hold per-channel tensors, and the module
# attribute each must be
_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias")


def _is_stochastic_depth(fn: Any) -> bool:
    """torchvision.ops.stochastic_depth (fx-wrapped): scales whole samples, channel-wise."""
    return (getattr(fn, "__name__", None) == "stochastic_depth"
            and str(getattr(fn, "__module__", "")).startswith("torchvision.ops"))
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """``torch.nn`` modules (and ``leaf_modules``, and the modules named in ``leaf_names``) are
    leaves; remembers where tracing failed."""

    def __init__(self, leaf_modules: tuple[type, ...], leaf_names: Iterable[str] = ()):
        super().__init__()
        self.leaf_types = leaf_modules
        self.leaf_names = set(leaf_names)
        self.failed_in: tuple[str, str] | None = None  # (qualified name, type name)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, self.leaf_types) or qualname in self.leaf_names
                or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m) or "<root>", type(m).__name__)
            raise


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost traceback frame outside torch."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(torch_dir) and f.filename != __file__]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


#: At most this many submodules are made opaque leaves before tracing gives up.
MAX_OPAQUE = 64


def _trace(model: nn.Module, leaf_modules: tuple[type, ...]
           ) -> tuple[fx.GraphModule, dict[str, str]]:
    """The traced model, and the submodules made opaque leaves (name -> why) because torch.fx
    cannot trace them: when tracing fails inside a submodule, it is retried with that submodule
    as a leaf (its channels then count as not prunable)."""
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(leaf_modules, opaque)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:
            cause = f"at {_user_frame(exc)} ({type(exc).__name__}: {exc})"
            failed = tracer.failed_in
            if failed is not None and failed[0] != "<root>" and failed[0] not in opaque \
                    and len(opaque) < MAX_OPAQUE:
                opaque[failed[0]] = f"torch.fx cannot trace it {cause}"
                continue
            if failed is None or failed[0] == "<root>":
                fix = ("Make that forward traceable (no Python control flow on tensor values), "
                       "or move the failing code into a submodule (which is then made an opaque "
                       "leaf, its channels not prunable).")
                where = f"the forward of {type(model).__name__}"
            else:
                name, kind = failed
                where = f"module '{name}' ({kind})"
                fix = (f"Make that module a leaf: channel_groups(model, inputs, leaf_modules=("
                       f"{kind},)) -- the channels it touches then count as not prunable -- or "
                       "make its forward traceable (no Python control flow on tensor values).")
            raise ChannelGraphError(
                f"torch.fx cannot trace {type(model).__name__}: it fails in {where} {cause}. "
                f"{fix}") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__), opaque


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def run_quietly(model: nn.Module, fn: Callable[..., Any], inputs: Sequence[Any]) -> Any:
    """``fn(*inputs)`` with ``model`` in eval mode (no BN statistics update) and no autograd, on
    fake tensors (no compute) -- or on the real inputs if an op cannot run on fake tensors
    (data-dependent control flow in a leaf module). Every module's mode is restored."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with _eval_mode(model), torch.no_grad():
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                return fn(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                            for t in inputs))
        except Exception:
            return fn(*inputs)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


# --------------------------------------------------------------------------------------------
# Union-find of channel sources, with offsets
# --------------------------------------------------------------------------------------------


class _Seg(NamedTuple):
    """Channels ``start .. start + length - 1`` of source ``src``, ``block`` positions each."""

    src: int
    start: int
    length: int
    block: int = 1


Layout = tuple[_Seg, ...]


def _width(layout: Layout) -> int:
    return sum(s.length * s.block for s in layout)


def _blocked(layout: Layout) -> bool:
    return any(s.block != 1 for s in layout)


def _cut(layout: Layout, a: int, b: int) -> Layout:
    """The segments at positions ``a .. b - 1`` of a layout (whole channels of each segment:
    a block is never split, positions must fall on block edges)."""
    out, pos = [], 0
    for seg in layout:
        end = pos + seg.length * seg.block
        lo, hi = max(a, pos), min(b, end)
        if lo < hi:
            c0, c1 = (lo - pos) // seg.block, -(-(hi - pos) // seg.block)
            out.append(seg._replace(start=seg.start + c0, length=c1 - c0))
        pos = end
    return tuple(out)


class _Sources:
    """Channel sources in a union-find whose roots are channel spaces: a member source ``s`` is
    channels ``off(s) .. off(s) + size(s) - 1`` of its root."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.offset: list[int] = []
        self.size: list[int] = []
        self.node: list[fx.Node] = []
        self.reasons: dict[int, list[str]] = {}

    def add(self, size: int, node: fx.Node, reason: str | None = None) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.offset.append(0)
        self.size.append(size)
        self.node.append(node)
        if reason:
            self.reasons[s] = [reason]
        return s

    def find(self, s: int) -> tuple[int, int]:
        """``(root, offset of s in root)``, compressing the path."""
        path = []
        while self.parent[s] != s:
            path.append(s)
            s = self.parent[s]
        root, off = s, 0
        for t in reversed(path):  # nearest the root first
            off += self.offset[t]
            self.parent[t], self.offset[t] = root, off
        return (root, self.offset[path[0]]) if path else (root, 0)

    def poison(self, s: int, reason: str) -> None:
        root, _ = self.find(s)
        bucket = self.reasons.setdefault(root, [])
        if reason not in bucket:
            bucket.append(reason)

    def _attach(self, child: int, root: int, off: int) -> None:
        self.parent[child], self.offset[child] = root, off
        moved = self.reasons.pop(child, [])
        bucket = self.reasons.setdefault(root, [])
        bucket.extend(r for r in moved if r not in bucket)
        if not bucket:
            del self.reasons[root]

    def union(self, a: int, ca: int, b: int, cb: int, where: fx.Node) -> None:
        """Channel ``ca`` of source ``a`` is channel ``cb`` of ``b`` (and so on, run-wise)."""
        ra, oa = self.find(a)
        rb, ob = self.find(b)
        pa, pb = oa + ca, ob + cb  # the same channel, in root coordinates
        if ra == rb:
            if pa != pb:
                self.poison(ra, f"channels coupled at two different offsets by '{where.name}'")
            return
        d = pa - pb  # where rb's channel 0 lands in ra
        if 0 <= d and d + self.size[rb] <= self.size[ra]:
            self._attach(rb, ra, d)
        elif d <= 0 and self.size[ra] - d <= self.size[rb]:
            self._attach(ra, rb, -d)
        else:  # partial overlap: a new root spans both
            lo, hi = min(0, d), max(self.size[ra], d + self.size[rb])
            r = self.add(hi - lo, where)
            self._attach(ra, r, -lo)
            self._attach(rb, r, d - lo)


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


@dataclass
class _Axis:
    """One module dim that a pruning plan cuts: its layout along that dim."""

    module: str
    role: str
    layout: Layout


@dataclass
class _Analysis:
    gm: fx.GraphModule
    src: _Sources = field(default_factory=_Sources)
    layout: dict[fx.Node, Layout] = field(default_factory=dict)
    cdim: dict[fx.Node, int] = field(default_factory=dict)  # the channel dim of each layout
    free: dict[fx.Node, str] = field(default_factory=dict)  # tensors not followed, and why
    unfollowed: dict[tuple[fx.Node, int], Layout] = field(default_factory=dict)
    spatial: set[str] = field(default_factory=set)  # layers whose outputs have positions
    axes: list[_Axis] = field(default_factory=list)
    chain: set[fx.Node] = field(default_factory=set)       # may precede a mask point
    zero: set[fx.Node] = field(default_factory=set)        # maps zeroed channels to zeros
    consumers: set[fx.Node] = field(default_factory=set)   # conv/Linear reading their input dim
    consumed: list[tuple[fx.Node, Layout, int]] = field(default_factory=list)  # their inputs
    meta: set[fx.Node] = field(default_factory=set)        # read shapes only (x.size(0), ...)
    calls: dict[str, tuple[Layout, Layout]] = field(default_factory=dict)
    groups: list[ChannelGroup] = field(default_factory=list)
    roots: dict[str, int] = field(default_factory=dict)    # group name -> root source
    opaque: dict[str, str] = field(default_factory=dict)   # modules made leaves -> why
    pieces: dict[fx.Node, list[Layout] | str] = field(default_factory=dict)  # split / chunk
    #                                  results (a reason when the split tensor is not followed)
    parts: list[tuple[Layout, int, fx.Node]] = field(default_factory=list)  # equal-part rules
    model: nn.Module | None = None  # the traced model (gm holds only bare copies of the modules
    #                                 whose attributes a functional call reads)

    @property
    def root(self) -> nn.Module:
        return self.model if self.model is not None else self.gm

    # -- helpers ----------------------------------------------------------------------------

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def describe(self, node: fx.Node) -> str:
        """``module 'layer1.0.conv1' (Conv2d)``, ``'pad' (fx node 'pad' in layer2.0.shortcut)``."""
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.module(node)).__name__})"
        scope = list(node.meta.get("nn_module_stack") or {})
        where = f" in {scope[-1]}" if scope else ""
        if node.op == "call_method":
            return f"'.{node.target}()' (fx node '{node.name}'{where})"
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            return f"'{name}' (fx node '{node.name}'{where})"
        if node.op == "get_attr":
            return f"tensor attribute '{node.target}' (get_attr)"
        return f"{node.op} '{node.target}'"

    def new(self, node: fx.Node, size: int, reason: str | None = None) -> Layout:
        return (_Seg(self.src.add(size, node, reason), 0, size),)

    def of(self, node: Any, dim: int | None = None) -> Layout | None:
        """The layout of an argument. A tensor the analysis does not follow (made by an op it
        cannot follow, a tensor attribute) has no channel dim of its own: it gets an opaque,
        unprunable layout along ``dim`` (the dim where it meets followed channels; dim 1 by
        default), one per tensor and dim."""
        if not isinstance(node, fx.Node):
            return None
        if node in self.layout:
            return self.layout[node]
        shape = _shape(node)
        d = 1 if dim is None else dim
        if shape is None or len(shape) < 2 or not 0 <= d < len(shape):
            return None
        if (node, d) not in self.unfollowed:
            why = self.free.get(node) or f"{self.describe(node)} makes channels that are not " \
                                         "followed"
            self.unfollowed[node, d] = self.new(node, shape[d], why)
        return self.unfollowed[node, d]

    def dim(self, node: Any) -> int:
        """The channel dim of a followed tensor (1 for one that is not followed)."""
        return self.cdim.get(node, 1)

    def set(self, node: fx.Node, layout: Layout, cdim: int, zero: bool = False) -> None:
        """``node``'s channels: ``layout`` along dim ``cdim``; ``zero``: zeroed input channels
        give zero output channels."""
        self.layout[node], self.cdim[node] = layout, cdim
        if zero:
            self.zero.add(node)

    def follows(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.layout

    def poison(self, layout: Layout | None, reason: str) -> None:
        for seg in layout or ():
            self.src.poison(seg.src, reason)

    def unify(self, a: Layout, b: Layout, where: fx.Node) -> None:
        """Couple two layouts of the same width, position by position."""
        if _width(a) != _width(b):
            reason = f"'{where.name}' couples tensors of different widths"
            self.poison(a, reason)
            self.poison(b, reason)
            return
        ia = ib = pa = pb = pos = 0  # segment indices, their start positions, current position
        while ia < len(a) and ib < len(b):
            sa, sb = a[ia], b[ib]
            ea, eb = pa + sa.length * sa.block, pb + sb.length * sb.block
            if sa.block != sb.block or (pos - pa) % sa.block or (pos - pb) % sb.block:
                reason = f"'{where.name}' couples flattened channels with different block sizes"
                self.src.poison(sa.src, reason)
                self.src.poison(sb.src, reason)
            else:
                self.src.union(sa.src, sa.start + (pos - pa) // sa.block,
                               sb.src, sb.start + (pos - pb) // sb.block, where)
            pos = min(ea, eb)
            if pos == ea:
                ia, pa = ia + 1, ea
            if pos == eb:
                ib, pb = ib + 1, eb

    def unknown(self, node: fx.Node, why: str = "is an op that aofp_ext does not follow") -> None:
        """Everything an op we cannot follow touches becomes not prunable; its output is not
        followed (its channels, along whichever dim they meet followed ones, are not
        prunable)."""
        reason = f"{self.describe(node)} {why}"
        for arg in node.all_input_nodes:
            if self.follows(arg):
                self.poison(self.layout[arg], reason)
        self.free[node] = reason

    def unfollow(self, node: fx.Node, arg: Any) -> None:
        """``node`` is made from the tensor ``arg`` that is not followed: not followed either
        (an op on no tensor at all is an op we cannot follow)."""
        if not isinstance(arg, fx.Node):
            return self.unknown(node)
        self.free[node] = self.free.get(arg) or (
            f"{self.describe(arg)} makes channels that are not followed")

    # -- the walk ---------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                if shape is not None and len(shape) >= 2:
                    self.set(node, self.new(node, shape[1], f"model input '{node.name}'"), 1)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    if self.follows(arg):
                        self.poison(self.layout[arg], "reaches the model output")
            elif node.op == "call_module":
                self.visit_module(node)
            elif node.op == "call_function":
                self.visit_function(node)
            elif node.op == "call_method":
                self.visit_method(node)
        self.shared_parameters()

    def shared_parameters(self) -> None:
        """Modules that share a Parameter (tied weights) would be cut twice: not prunable."""
        owner: dict[int, str] = {}
        for name in self.calls:
            for p in self.root.get_submodule(name).parameters(recurse=False):
                other = owner.setdefault(id(p), name)
                if other != name:
                    reason = f"modules '{other}' and '{name}' share a parameter"
                    for layout in (*self.calls[other], *self.calls[name]):
                        self.poison(layout, reason)

    def passthrough(self, node: fx.Node, zero: bool, act: bool = False,
                    spatial: bool = False) -> None:
        """An op that maps every channel to itself (element-wise; ``spatial``: over the dims
        after dim 1 -- pools, resampling, padding -- which needs the channel dim at dim 1)."""
        x = node.args[0] if node.args else None
        if not self.follows(x):
            return self.unfollow(node, x)
        if spatial and self.dim(x) != 1:
            return self.unknown(node, f"works over dims after dim 1, but the channels are in dim "
                                      f"{self.dim(x)}")
        self.set(node, self.layout[x], self.dim(x), zero)
        if act:
            self.chain.add(node)

    def visit_module(self, node: fx.Node) -> None:
        m = self.module(node)
        name = str(node.target)
        x = node.args[0] if node.args else None
        if name in self.opaque:
            self.unknown(node, f"is made an opaque leaf: {self.opaque[name]}")
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            self.layer(node, name, m)
        elif isinstance(m, nn.GroupNorm):
            self.group_norm(node, m.num_groups)
        elif isinstance(m, nn.LayerNorm):
            self.layer_norm(node, m.normalized_shape)
        elif isinstance(m, nn.modules.batchnorm._NormBase) or (
                isinstance(m, nn.PReLU) and m.num_parameters > 1):
            lay = self.of(x)
            if lay is None or (self.follows(x) and self.dim(x) != 1):
                return self.unknown(node, "normalises along dim 1, but the channels are in dim "
                                          f"{self.dim(x)}" if lay is not None else
                                    "is an op that aofp_ext does not follow")
            self.record_call(node, name, lay, None, "prelu" if isinstance(m, nn.PReLU) else "norm")
        elif isinstance(m, nn.Flatten):
            self.reshape(node)
        elif isinstance(m, nn.PReLU) or isinstance(m, _NONZERO_MODULES):
            self.passthrough(node, zero=False, act=isinstance(m, _ACT_MODULES + (nn.PReLU,)),
                             spatial=isinstance(m, _SPATIAL_MODULES))
        elif isinstance(m, _ZERO_MODULES):
            self.passthrough(node, zero=True, act=isinstance(m, _ACT_MODULES),
                             spatial=isinstance(m, _SPATIAL_MODULES))
        else:
            self.unknown(node, "is a module type that aofp_ext does not follow")

    def layer(self, node: fx.Node, name: str, m: nn.Module) -> None:
        """A conv or Linear ``m`` (module ``name``) applied by ``node`` to ``node.args[0]``."""
        x = node.args[0] if node.args else None
        shape = _shape(x)
        if isinstance(m, nn.Linear):  # over the last dim: (N, features), tokens, channels-last
            last = len(shape) - 1 if shape is not None else 1
            lay = self.of(x, last)
            if lay is None or last < 1 or (self.follows(x) and self.dim(x) != last):
                return self.unknown(node, "is a Linear over a dim that is not the channel dim")
            self.record_call(node, name, lay, m.out_features, "in", consumer=True, cdim=last)
            return
        lay = self.of(x)
        if lay is None or m.transposed or (self.follows(x) and self.dim(x) != 1):
            self.unknown(node, "is a transposed conv, not followed" if m.transposed else
                         f"is a conv, but the channels are in dim {self.dim(x)}" if lay is not None
                         else "is an op that aofp_ext does not follow")
        elif m.groups == 1:
            self.record_call(node, name, lay, m.out_channels, "in", consumer=True)
        elif m.groups == m.in_channels == m.out_channels:
            self.record_call(node, name, lay, None, "depthwise")
        else:  # grouped: equal counts per conv group in and out keep `groups` valid
            self.record_call(node, name, lay, m.out_channels, "in", consumer=True)
            self.parts += [(lay, m.groups, node), (self.layout[node], m.groups, node)]

    def functional_layer(self, node: fx.Node) -> None:
        """``F.linear`` / ``F.conv*d`` in a module's forward (timm's Linear, Conv2dSame, ...):
        followed as that module when its weight (and bias) are the module's own attributes and
        the call uses the module's groups."""
        args = dict(zip(("input", "weight", "bias"), node.args))
        args.update({k: v for k, v in node.kwargs.items() if k in ("weight", "bias")})
        w, b = args.get("weight"), args.get("bias")
        owner = str(w.target).rpartition(".")[0] if isinstance(w, fx.Node) else ""
        m = self.root.get_submodule(owner) if isinstance(w, fx.Node) and w.op == "get_attr" \
            and str(w.target).endswith("weight") else None
        kind = nn.Linear if node.target is F.linear else nn.modules.conv._ConvNd
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if (not isinstance(m, kind) or m.weight is None
                or (b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"
                                           and b.target == f"{owner}.bias"))
                or (kind is not nn.Linear and groups != m.groups)):
            return self.unknown(node, "applies a weight that is not a conv/Linear module's own "
                                      "attribute")
        self.layer(node, owner, m)

    def record_call(self, node: fx.Node, name: str, lay: Layout, out_size: int | None,
                    role: str, *, consumer: bool = False, cdim: int = 1) -> None:
        """A module with parameters: ``out_size`` channels out (None: channel-wise, passes ``lay``
        through), ``role`` for its input dim, the channels in dim ``cdim`` of its input and
        output. A module called again is coupled to its first call."""
        if name in self.calls:
            first_in, first_out = self.calls[name]
            self.unify(first_in, lay, node)
            self.set(node, lay if out_size is None else first_out, cdim)
        else:
            out = lay if out_size is None else self.new(node, out_size)
            self.set(node, out, cdim)
            self.calls[name] = (lay, out)
            self.axes.append(_Axis(name, role, lay))
            if out_size is not None:
                self.axes.append(_Axis(name, "out", out))
        shape = _shape(node)
        if out_size is not None and shape is not None and len(shape) > 2:
            self.spatial.add(name)
        if consumer:
            self.consumers.add(node)
            self.consumed.append((node.args[0], lay, cdim))
        else:
            self.chain.add(node)

    def visit_function(self, node: fx.Node) -> None:
        t = node.target
        if t in _ZERO_FUNCTIONS:
            self.passthrough(node, zero=True, act=t in _ACT_FUNCTIONS,
                             spatial=t in _SPATIAL_FUNCTIONS)
        elif t in _PERMUTE_FUNCTIONS:
            self.permute(node)
        elif t is F.layer_norm:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            self.layer_norm(node, shape)
        elif t in _NONZERO_FUNCTIONS:
            self.passthrough(node, zero=False, act=t in _ACT_FUNCTIONS)
        elif t in _BINARY_FUNCTIONS:
            self.binary(node)
        elif t in _CAT_FUNCTIONS:
            self.cat(node)
        elif t in _SHAPE_FUNCTIONS:
            self.reshape(node)
        elif t in _REDUCE_FUNCTIONS:
            self.reduce(node)
        elif t is operator.getitem:
            self.getitem(node)
        elif t is F.pad:
            self.pad(node)
        elif t in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            self.functional_layer(node)
        elif t in (F.batch_norm, F.instance_norm):
            self.functional_norm(node)
        elif t is F.group_norm:
            self.functional_group_norm(node)
        elif t in (torch.split, torch.chunk):
            self.split(node, chunks=t is torch.chunk)
        elif _is_stochastic_depth(t):
            self.passthrough(node, zero=True)
        elif t is getattr and node.args[1] in ("shape", "device", "dtype", "ndim"):
            self.meta.add(node)
        else:
            self.unknown(node)

    def visit_method(self, node: fx.Node) -> None:
        t = node.target
        if t in _META_METHODS or t in _CREATE_METHODS:
            self.meta.add(node)
        elif t in ("split", "chunk"):
            self.split(node, chunks=t == "chunk")
        elif t in _PERMUTE_METHODS:
            self.permute(node)
        elif t in ("expand", "expand_as"):
            self.expand(node)
        elif t in _ZERO_METHODS:
            self.passthrough(node, zero=True, act=t in _ACT_METHODS)
        elif t in _NONZERO_METHODS:
            self.passthrough(node, zero=False, act=t in _ACT_METHODS)
        elif t in _BINARY_METHODS:
            self.binary(node)
        elif t in _SHAPE_METHODS:
            self.reshape(node)
        elif t in _REDUCE_METHODS:
            self.reduce(node)
        else:
            self.unknown(node)

    # -- the op families ---------------------------------------------------------------------

    def permute(self, node: fx.Node) -> None:
        """``permute`` / ``transpose`` / ``swapaxes``: the channel dim moves with its dim
        (ConvNeXt's and the transformers' channels-last blocks)."""
        x, out = node.args[0], _shape(node)
        if not self.follows(x):
            return self.unfollow(node, x)
        n = len(out) if out is not None else 0
        rest = [*node.args[1:], *node.kwargs.values()]
        if node.target in ("permute", torch.permute):
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if (not n or not all(isinstance(d, int) for d in dims)
                    or sorted(d % n for d in dims) != list(range(n))):
                return self.unknown(node, "permutes dims that are computed")
            order = [d % n for d in dims]
        else:
            if len(rest) != 2 or not all(isinstance(d, int) for d in rest) or not n:
                return self.unknown(node, "swaps dims that are computed")
            order = list(range(n))
            a, b = rest[0] % n, rest[1] % n
            order[a], order[b] = order[b], order[a]
        self.set(node, self.layout[x], order.index(self.dim(x)), zero=True)

    def expand(self, node: fx.Node) -> None:
        """``expand``: size-1 dims repeated, new dims in front; the channel dim keeps its size."""
        x, src, out = node.args[0], _shape(node.args[0]), _shape(node)
        if not self.follows(x):
            return self.unfollow(node, x)
        if src is None or out is None:
            return self.unknown(node)
        d = self.dim(x) + len(out) - len(src)
        if out[d] != src[self.dim(x)]:
            return self.unknown(node, "repeats the channel dim")
        self.set(node, self.layout[x], d, zero=True)

    def layer_norm(self, node: fx.Node, normalized_shape: Any) -> None:
        """LayerNorm normalises over its last dims: over the channel dim, removing channels
        changes the statistics of the others, so those channels are not prunable (the channels
        of ConvNeXt's and the transformers' residual streams); over other dims it keeps channels
        apart."""
        x, shape = node.args[0], _shape(node)
        n = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) \
            else 1
        if not self.follows(x):
            return self.unfollow(node, x)
        if shape is None:
            return self.unknown(node)
        if self.dim(x) >= len(shape) - n:
            self.poison(self.layout[x], f"{self.describe(node)} normalises over the channel dim "
                                        "(a layer norm): removing channels changes the "
                                        "statistics of the others")
        self.set(node, self.layout[x], self.dim(x))

    def binary(self, node: fx.Node) -> None:
        """Element-wise with broadcasting: operands that span the channel dim are coupled; a
        followed operand that is constant over it (an SE gate, a spatial map) is not."""
        out = _shape(node)
        if out is None or len(out) < 2:
            return self.unknown(node)
        args = [a for a in node.args[:2] if _shape(a) is not None]
        followed = [a for a in args if self.follows(a)]
        dims = {self.dim(a) + len(out) - len(_shape(a)) for a in followed
                if _shape(a)[self.dim(a)] != 1 or out[self.dim(a) + len(out) - len(_shape(a))] == 1}
        if len(dims) > 1:
            return self.unknown(node, "meets channels in different dims")
        if not dims:
            return self.unfollow(node, args[0] if args else None)
        cd = dims.pop()
        full: list[Layout] = []
        for arg in args:
            shape = _shape(arg)
            d = cd - (len(out) - len(shape))  # the operand dim aligned with the channel dim
            if d < 0 or (shape[d] == 1 and out[cd] != 1):
                continue  # constant over channels
            if self.follows(arg) and self.dim(arg) != d:
                return self.unknown(node, "broadcasts a tensor across the channel dim")
            full.append(self.of(arg, d))
        for other in full[1:]:
            self.unify(full[0], other, node)
        self.set(node, full[0], cd)

    def cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = _shape(node)
        if out is None or not isinstance(dim, int) or not isinstance(tensors, (list, tuple)):
            return self.unknown(node)
        followed = [t for t in tensors if self.follows(t)]
        dims = {self.dim(t) for t in followed}
        if len(dims) > 1:
            return self.unknown(node, "meets channels in different dims")
        if not dims:
            return self.unfollow(node, tensors[0] if tensors else None)
        cd = dims.pop()
        layouts = [self.of(t, cd) for t in tensors]
        if any(lay is None for lay in layouts):
            return self.unknown(node)
        if dim % len(out) == cd:
            self.set(node, tuple(seg for lay in layouts for seg in lay), cd, zero=True)
        else:
            for lay in layouts[1:]:
                self.unify(layouts[0], lay, node)
            self.set(node, layouts[0], cd)

    def reshape(self, node: fx.Node) -> None:
        """view / reshape / flatten / squeeze / unsqueeze, judged by shapes: the channel dim
        survives as a dim of its own (same size, same number of elements after it), or is
        flattened with every dim after it into the last dim (each channel then owns a block of
        positions, e.g. ``flatten`` before a Linear)."""
        x = node.args[0]
        src, out = _shape(x), _shape(node)
        if not self.follows(x):
            return self.unfollow(node, x)
        lay, cd = self.layout[x], self.dim(x)
        if src is None or out is None or len(out) < 2:
            return self.unknown(node)
        after = prod(src[cd + 1:])
        same = [j for j in range(len(out)) if out[j] == src[cd] and prod(out[j + 1:]) == after]
        if same:
            return self.set(node, lay, same[0], zero=True)  # every channel keeps its elements
        j = len(out) - 1
        if out[j] == prod(src[cd:]) and j >= 1:  # flattened into the last dim, as blocks
            return self.set(node, tuple(s._replace(block=s.block * after) for s in lay), j,
                            zero=True)
        self.unknown(node, "reshapes across the channel dim")

    def reduce(self, node: fx.Node) -> None:
        x = node.args[0]
        src, out = _shape(x), _shape(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else dims
        if not self.follows(x):
            return self.unfollow(node, x)
        cd = self.dim(x)
        if (src is None or out is None or len(out) < 2 or not isinstance(dims, (list, tuple))
                or {d % len(src) for d in dims} & {0, cd}):
            return self.unknown(node)
        gone = 0 if len(out) == len(src) else sum(d % len(src) < cd for d in dims)
        self.set(node, self.layout[x], cd - gone, zero=True)

    def getitem(self, node: fx.Node) -> None:
        x, idx = node.args[0], node.args[1]
        src = _shape(x)
        if x in self.pieces and isinstance(idx, int):
            if isinstance(self.pieces[x], str):
                self.free[node] = self.pieces[x]
                return
            return self.set(node, self.pieces[x][idx], self.cdim[x], zero=True)
        if src is None:  # indexing a tuple (or a shape): tensors from an op we did not follow
            if isinstance(x, fx.Node):
                self.unfollow(node, x)
            return
        if not self.follows(x):
            return self.unfollow(node, x)
        cd = self.dim(x)
        entries = list(idx) if isinstance(idx, tuple) else [idx]
        if sum(e is Ellipsis for e in entries) > 1 or not all(
                e is None or e is Ellipsis or isinstance(e, (int, slice)) for e in entries):
            return self.unknown(node, "indexes a tensor with tensors or lists")
        if Ellipsis in entries:
            k = entries.index(Ellipsis)
            fill = len(src) - sum(e is not None for e in entries) + 1
            entries[k:k + 1] = [slice(None)] * fill
        entries += [slice(None)] * (len(src) - sum(e is not None for e in entries))
        dim_in = dim_out = 0  # source dims consumed, output dims made, before the channel dim
        for e in entries:
            if e is not None and dim_in == cd:
                break
            dim_in += e is not None
            dim_out += not isinstance(e, int)
        if isinstance(e, int):
            return self.unknown(node, "indexes the channel dim")
        if e == slice(None):  # the channel dim untouched
            return self.set(node, self.layout[x], dim_out, zero=True)
        self.channel_slice(node, e, src[cd], dim_out)

    def channel_slice(self, node: fx.Node, sl: slice, width: int, cdim: int) -> None:
        """``x[:, a:b]`` with bounds fixed in code: stays right after a cut only if no channel
        before ``b`` goes, so the channels there are not prunable (the ones after it are dropped
        by the slice anyway). ``x[:, :b]`` with ``b >= width`` stays the whole tensor. ``cdim``:
        the channel dim of the result."""
        lay = self.of(node.args[0])
        a, b, step = sl.start or 0, width if sl.stop is None else sl.stop, sl.step or 1
        ints = all(isinstance(v, int) for v in (a, b, step))
        if lay is None or not ints or a < 0 or b < 0 or step != 1 or _blocked(lay):
            return self.unknown(node, "indexes the channel dim (negative, strided or computed "
                                      "bounds)")
        if a == 0 and b >= width:
            return self.set(node, lay, cdim, zero=True)
        self.poison(_cut(lay, 0, min(b, width)),
                    f"{self.describe(node)} slices the channel dim at bounds fixed in code")
        self.set(node, _cut(lay, a, min(b, width)), cdim, zero=True)

    def split(self, node: fx.Node, chunks: bool) -> None:
        """``split`` / ``chunk``: each piece (taken by ``getitem``) gets its part of the layout.
        Along the channel dim, ``chunk(n)`` adapts to the width after a cut if every one of its
        ``n`` parts keeps the same number of channels (a granularity rule on the group);
        ``split`` sizes are fixed in code, so the channels it splits are not prunable."""
        metas = node.meta.get("tensor_meta")
        x = node.args[0]
        if not self.follows(x):
            self.unfollow(node, x)
            self.pieces[node] = self.free[node]
            return
        src, lay, cd = _shape(x), self.layout[x], self.dim(x)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if (src is None or not isinstance(dim, int) or len(src) < 2 or _blocked(lay)
                or not isinstance(metas, (tuple, list))
                or not all(isinstance(m, TensorMetadata) for m in metas)):
            return self.unknown(node)
        self.cdim[node] = cd
        if dim % len(src) != cd:
            self.pieces[node] = [lay] * len(metas)
            return
        widths = [int(m.shape[cd]) for m in metas]
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        if chunks and isinstance(n, int) and len(widths) == n and len(set(widths)) == 1:
            self.parts.append((lay, n, node))
        else:
            what = "chunks" if chunks else "splits"
            self.poison(lay, f"{self.describe(node)} {what} the channel dim into parts of "
                             f"sizes fixed in code ({widths})")
        pos, self.pieces[node] = 0, []
        for w in widths:
            self.pieces[node].append(_cut(lay, pos, pos + w))
            pos += w

    def functional_norm(self, node: fx.Node) -> None:
        """``F.batch_norm`` / ``F.instance_norm`` called in a module's forward (timm's
        BatchNormAct2d): followed when its per-channel tensors are that module's own
        ``running_mean`` / ``running_var`` / ``weight`` / ``bias`` attributes."""
        args = dict(zip(_NORM_ARGS, node.args))
        args.update({k: v for k, v in node.kwargs.items() if k in _NORM_ARGS})
        x = args.pop("input", None)
        if self.follows(x) and self.dim(x) != 1:
            return self.unknown(node, f"normalises along dim 1, but the channels are in dim "
                                      f"{self.dim(x)}")
        lay = self.of(x)
        owners = set()
        for k, v in args.items():
            if v is None:
                continue
            if not (isinstance(v, fx.Node) and v.op == "get_attr"
                    and str(v.target).rpartition(".")[2] == k):
                return self.unknown(node, f"takes its {k} from something other than a module's "
                                          f"'{k}' attribute")
            owners.add(str(v.target).rpartition(".")[0])
        if lay is None or len(owners) > 1:
            return self.unknown(node, "normalises with the attributes of several modules"
                                if len(owners) > 1 else "is an op that aofp_ext does not follow")
        if not owners:  # batch / instance statistics only: channel-wise, zeros stay zeros
            return self.passthrough(node, zero=True)
        self.record_call(node, owners.pop(), lay, None, "norm")

    def group_norm(self, node: fx.Node, num_groups: Any) -> None:
        """GroupNorm normalises over groups of channels: removing channels inside a group changes
        its statistics; only whole groups could go, which is not followed."""
        self.unknown(node, f"is a group norm (num_groups={num_groups}): removing channels "
                           "changes its groups' statistics; not followed")

    def functional_group_norm(self, node: fx.Node) -> None:
        groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
        self.group_norm(node, groups)

    def pad(self, node: fx.Node) -> None:
        src = _shape(node.args[0])
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if src is None or not isinstance(pads, (tuple, list)):
            return self.unknown(node)
        k = 2 * (len(src) - 1 - self.dim(node.args[0]))  # the pad entries of the channel dim
        if any(pads[k:k + 2]):
            return self.unknown(node, "pads the channel dim (a ResNet option-A shortcut?) by "
                                      "widths fixed in code")
        self.passthrough(node, zero=mode != "constant" or not value)

    # -- groups ------------------------------------------------------------------------------

    def part_rules(self) -> dict[int, int]:
        """Root -> granularity, from the equal-part rules (grouped convs, ``chunk``): a rule
        applies to a whole group, else the group is not prunable."""
        gran: dict[int, int] = {}
        for lay, n, node in self.parts:
            root, off = self.src.find(lay[0].src) if len(lay) == 1 else (None, 0)
            what = self.describe(node)
            if root is None or off + lay[0].start != 0 or lay[0].length != self.src.size[root]:
                self.poison(lay, f"{what} splits channels into {n} equal parts that do not "
                                 "span one whole channel group")
                continue
            g = lcm(gran.get(root, 1), n)
            if self.src.size[root] % g:
                self.src.poison(root, f"{what} needs {g} equal parts of "
                                      f"{self.src.size[root]} channels")
            elif g == self.src.size[root]:
                self.src.poison(root, f"{what} has one channel per group ({g} groups): the "
                                      "same count kept in each means keeping them all")
            gran[root] = g
        return gran

    def build_groups(self) -> None:
        gran = self.part_rules()
        members: dict[int, list[int]] = {}
        for s in range(len(self.src.parent)):
            members.setdefault(self.src.find(s)[0], []).append(s)
        slots: dict[int, list[ChannelSlot]] = {r: [] for r in members}
        for axis in self.axes:
            pos = 0
            for seg in axis.layout:
                root, off = self.src.find(seg.src)
                slots[root].append(ChannelSlot(axis.module, axis.role, pos, off + seg.start,
                                               seg.length, seg.block))
                pos += seg.length * seg.block
        ordered = sorted(members, key=lambda r: min(members[r]))
        for root in ordered:
            outs = [s for s in slots[root] if s.role == "out"]
            first = min(members[root])
            name = outs[0].module if outs else f"@{self.src.node[first].name}"
            reasons = self.src.reasons.get(root, [])
            mask = self.mask_point(members[root], root) if not reasons else None
            self.roots[name] = root
            self.groups.append(ChannelGroup(
                name=name,
                size=self.src.size[root],
                producers=tuple(s for s in slots[root] if s.role != "in"),
                consumers=tuple(s for s in slots[root] if s.role == "in"),
                mask_point=mask.name if mask is not None else None,
                mask_module=str(mask.target) if mask is not None and mask.op == "call_module"
                else None,
                prunable=not reasons,
                reason="; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)"
                                                 if len(reasons) > 3 else "") or None,
                granularity=gran.get(root, 1),
                spatial=any(s.module in self.spatial for s in outs),
            ))

    def mask_point(self, members: list[int], root: int) -> fx.Node | None:
        """The end of the single producer's chain (BN, activation, depthwise), if zeros from
        there reach every consumer unchanged."""
        if len(members) != 1:
            return None
        node = self.src.node[root]
        if node not in self.consumers:  # not made by a conv / Linear
            return None
        lay = self.layout[node]
        while True:
            users = [u for u in node.users if u not in self.meta]
            if len(users) != 1 or users[0] not in self.chain or self.layout.get(users[0]) != lay:
                break
            node = users[0]
        todo, seen = [node], {node}
        while todo:
            for user in todo.pop().users:
                if user in self.consumers or user in self.meta or user in seen:
                    continue
                if user not in self.zero:
                    return None
                seen.add(user)
                todo.append(user)
        return node


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

Specs = tuple[tuple[tuple[int, ...], torch.dtype], ...]
_LAST_TRACE: weakref.WeakKeyDictionary[nn.Module, tuple[Specs, tuple[type, ...]]] = (
    weakref.WeakKeyDictionary())


def last_trace(model: nn.Module) -> tuple[Specs, tuple[type, ...]] | None:
    """Input specs and leaf modules of the last analysis of ``model`` (held weakly)."""
    return _LAST_TRACE.get(model)


def input_specs(inputs: Inputs) -> Specs:
    """Shapes and dtypes of example inputs: all the analysis needs to re-trace a model."""
    return tuple((tuple(t.shape), t.dtype) for t in _as_tuple(inputs))


def inputs_from_specs(specs: Iterable[tuple[Sequence[int], torch.dtype]],
                      model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Zero tensors of the given shapes and dtypes, on ``model``'s device (the analysis only
    needs their shapes)."""
    param = next(iter(model.parameters()), None) if model is not None else None
    device = param.device if param is not None else torch.device("cpu")
    return tuple(torch.zeros(tuple(shape), dtype=dtype, device=device) for shape, dtype in specs)


def analyze(model: nn.Module, example_inputs: Inputs,
            leaf_modules: Iterable[type] = ()) -> _Analysis:
    """Trace ``model`` and compute its channel groups (internal; see :func:`channel_groups`)."""
    leaf = tuple(leaf_modules)
    inputs = _as_tuple(example_inputs)
    gm, opaque = _trace(model, leaf)
    try:
        run_quietly(model, ShapeProp(gm).propagate, inputs)
    except Exception as exc:
        raise ChannelGraphError(
            f"running {type(model).__name__} on the example inputs (shapes "
            f"{[tuple(t.shape) for t in inputs]}) failed at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {exc}") from exc
    analysis = _Analysis(gm, opaque=opaque, model=model)
    analysis.run()
    analysis.build_groups()
    _LAST_TRACE[model] = (input_specs(inputs), leaf)
    return analysis


def channel_groups(model: nn.Module, example_inputs: Inputs, *,
                   leaf_modules: Iterable[type] = ()) -> list[ChannelGroup]:
    """The channel groups of ``model``, in graph order.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (``torch.nn`` modules are leaves).
        example_inputs: a tensor or a tuple of tensors for ``model(*example_inputs)``; only their
            shapes and dtypes are used (shapes are propagated with fake tensors).
        leaf_modules: extra module types to treat as opaque leaves (for modules that fx cannot
            trace); the channels they touch are not prunable.

    A submodule that ``torch.fx`` cannot trace (Python control flow on tensor values) is made an
    opaque leaf: the channels it touches are not prunable, with the reason, and a
    :class:`OpaqueModuleWarning` names every such module.

    Raises:
        ChannelGraphError: the model cannot be traced (the failure is in its own forward, not in
            a submodule) or cannot run on the example inputs; the message names the failing
            module and source line.
    """
    analysis = analyze(model, example_inputs, leaf_modules)
    if analysis.opaque:
        warnings.warn(OpaqueModuleWarning(
            f"torch.fx cannot trace {len(analysis.opaque)} submodule(s) of "
            f"{type(model).__name__}, made opaque leaves (their channels are not prunable): "
            + "; ".join(f"'{n}': {why}" for n, why in analysis.opaque.items())), stacklevel=2)
    return list(analysis.groups)


def keep_index(keep: Any, group: ChannelGroup) -> torch.Tensor:
    """Validate a keep-set for ``group`` (unique, in range, non-empty) and return it sorted,
    int64, on the CPU."""
    if not group.prunable:
        raise ChannelGraphError(f"channel group '{group.name}' is not prunable: {group.reason}")
    k = torch.as_tensor(keep).detach()
    if k.numel() == 0:
        raise ChannelGraphError(f"keep-set of '{group.name}' is empty: a group must keep at "
                                "least one channel")
    if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool or k.dim() != 1:
        raise ChannelGraphError(f"keep-set of '{group.name}' must be a 1-D tensor of integer "
                                f"indices, got dtype {k.dtype} and shape {tuple(k.shape)}")
    k = k.to("cpu", torch.int64).sort().values
    if k[0] < 0 or k[-1] >= group.size:
        raise ChannelGraphError(f"keep-set of '{group.name}' has indices outside "
                                f"[0, {group.size}): min {int(k[0])}, max {int(k[-1])}")
    dup = k[1:] == k[:-1]
    if bool(dup.any()):
        raise ChannelGraphError(f"keep-set of '{group.name}' repeats index "
                                f"{int(k[1:][dup][0])}")
    if group.granularity > 1:
        counts = torch.bincount(k // (group.size // group.granularity),
                                minlength=group.granularity)
        if bool((counts != counts[0]).any()):
            raise ChannelGraphError(
                f"keep-set of '{group.name}' must keep the same number of channels in each of "
                f"its {group.granularity} parts of {group.size // group.granularity} channels "
                f"(granularity, e.g. a grouped conv's groups); it keeps {counts.tolist()}")
    return k


def resolve_plan(analysis: _Analysis, plan: Plan) -> dict[int, torch.Tensor]:
    """Plan (group name -> keep indices) to root source -> validated keep index."""
    by_name = {g.name: g for g in analysis.groups}
    out: dict[int, torch.Tensor] = {}
    for name, keep in plan.items():
        if name not in by_name:
            known = ", ".join(g.name for g in analysis.groups if g.prunable)
            raise ChannelGraphError(f"unknown channel group '{name}'; prunable groups: {known}")
        out[analysis.roots[name]] = keep_index(keep, by_name[name])
    return out


def axis_positions(analysis: _Analysis, layout: Layout,
                   keeps: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
    """Positions kept along a dim with this layout, or None when all are kept."""
    parts, pos, changed = [], 0, False
    for seg in layout:
        root, off = analysis.src.find(seg.src)
        idx = torch.arange(seg.length)
        if root in keeps:
            k = keeps[root] - (off + seg.start)
            idx = k[(k >= 0) & (k < seg.length)]
            changed |= idx.numel() != seg.length
        parts.append(pos + (idx[:, None] * seg.block + torch.arange(seg.block)).reshape(-1))
        pos += seg.length * seg.block
    return torch.cat(parts) if changed else None


class _MaskingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, masks: dict[str, tuple[torch.Tensor, int]]):
        super().__init__(gm)
        self.masks = masks  # node name -> (mask, the channel dim it applies along)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.masks:
            mask, dim = self.masks[n.name]
            shape = [1] * out.dim()
            shape[dim] = -1
            out = out * mask.to(out.device, out.dtype).view(shape)
        return out


def masked_forward(model: nn.Module, plan: Plan, *inputs: torch.Tensor,
                   leaf_modules: Iterable[type] = ()) -> Any:
    """Run ``model(*inputs)`` with every channel not in ``plan[group.name]`` zeroed.

    Each planned group is zeroed at its ``mask_point``, or at every consumer's input when it has
    none. The model is not changed (beyond what its own forward does, e.g. BN statistics in
    training mode). The result equals the output of the model after
    ``prune_channels_(model, plan)``: the preview of a cut, and the reference of the tests.
    """
    analysis = analyze(model, inputs, leaf_modules)
    keeps = resolve_plan(analysis, plan)
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    at: dict[fx.Node, tuple[Layout, int]] = {}  # an ordered set, with layouts and channel dims
    for group in analysis.groups:
        if analysis.roots[group.name] not in keeps:
            continue
        if group.mask_point is not None:
            node = nodes[group.mask_point]
            at[node] = (analysis.layout[node], analysis.dim(node))
        else:
            root = analysis.roots[group.name]
            for node, layout, dim in analysis.consumed:
                if any(analysis.src.find(s.src)[0] == root for s in layout):
                    at[node] = (layout, dim)
    masks = {}
    for node, (layout, dim) in at.items():
        kept = axis_positions(analysis, layout, keeps)
        if kept is not None:
            m = torch.zeros(_width(layout))
            m[kept] = 1.0
            masks[node.name] = (m, dim)
    return _MaskingInterpreter(analysis.gm, masks).run(*inputs)
