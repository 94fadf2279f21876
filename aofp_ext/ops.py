"""The operators of aofp_ext: typed wrappers over ``torch.ops.aofp.*`` and a pure-PyTorch
reference of each (the test oracle).

Every op prices or edits filter channels:

- :func:`masked_damage` -- the damage that each of K channel masks does at a follower's output
  (conv or Linear, optional BN and ReLU), in one fused pass over the masks;
- :func:`masked_relu_damage` -- the same with ReLU after a per-mask affine of the centred
  output (BatchNorm's batch statistics of each masked output, computed elsewhere);
- :func:`channel_gram` and :func:`quadratic_damage` -- the exact damage of masks at a linear
  follower output (conv, or conv + BN with fixed statistics) as a quadratic form;
- :func:`compact_` -- in-place channel compaction that keeps the tensor objects.

The ``*_reference`` functions compute the same results the plain way, in float64 by default.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _moments, _varying
from ._loader import _C, require_C

__all__ = [
    "masked_damage",
    "masked_relu_damage",
    "channel_gram",
    "quadratic_damage",
    "output_grams",
    "gram_forms",
    "compact_",
    "masked_damage_reference",
    "masked_relu_damage_reference",
    "channel_gram_reference",
    "quadratic_damage_reference",
    "output_grams_reference",
    "gram_forms_reference",
    "compact_reference_",
    "reference",
]

_NORMS = ("none", "affine", "batch")
_POSTS = ("none", "relu")

IntPair = int | Sequence[int]


def _pair(v: IntPair, name: str) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    out = [int(e) for e in v]
    if len(out) == 1:
        return out * 2
    if len(out) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return out


_BUILD_INFO: dict | None = None


def _check_backend(op: str, *tensors: torch.Tensor | None) -> None:
    """Give a clear error for CUDA tensors when the extension has no CUDA kernels."""
    global _BUILD_INFO
    if _BUILD_INFO is None:
        _BUILD_INFO = dict(require_C().build_info())
    info = _BUILD_INFO
    for t in tensors:
        if t is not None and t.device.type == "cuda" and not info["cuda"]:
            raise RuntimeError(
                f"{op}: got a tensor on {t.device}, but this build of aofp_ext has no CUDA kernels "
                f"(built against torch {info['torch_version']} without CUDA). Move the inputs to the "
                "CPU, or rebuild aofp_ext with a CUDA-enabled torch and nvcc."
            )


def _conv_groups(op: str, groups: int, x: torch.Tensor, weight: torch.Tensor
                 ) -> list[tuple[slice, slice]]:
    """(input channels, output channels) of every conv group of a grouped conv follower."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive integer, got {groups!r}")
    if weight.dim() != 4 or x.dim() != 4:
        raise ValueError(f"{op}: groups={groups} applies to conv followers only (x (N, C, H, W), "
                         f"weight (O, C / groups, kh, kw)); got x shape {list(x.shape)} and "
                         f"weight shape {list(weight.shape)}")
    C, (O, c) = x.shape[1], weight.shape[:2]
    if C % groups or O % groups or c != C // groups:
        raise ValueError(f"{op}: with groups={groups}, weight must be (O, C / groups, kh, kw) "
                         f"with C and O divisible by groups; got weight shape "
                         f"{list(weight.shape)} and C = {C} channels in x")
    o = O // groups
    return [(slice(j * c, (j + 1) * c), slice(j * o, (j + 1) * o)) for j in range(groups)]


def _part(v: torch.Tensor | None, so: slice) -> torch.Tensor | None:
    return None if v is None else v[so]


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


def masked_damage(
    x: torch.Tensor,
    weight: torch.Tensor,
    masks: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    norm: str = "none",
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    post: str = "none",
    method: str = "auto",
    groups: int = 1,
    output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Damage of each of K channel masks at a follower's output.

    ``damage[k] = sum((f(conv(x * masks[k])) - f(conv(x))) ** 2)`` over every output element,
    where ``f`` is ``norm`` then ``post``.

    Args:
        x: follower input, ``(N, C, H, W)`` for a conv follower or ``(N, C)`` for a Linear one.
        weight: ``(O, C, kh, kw)`` or ``(O, C)``.
        masks: ``(K, C)`` bool (or 0/1 uint8); True keeps the channel.
        bias: optional ``(O,)`` follower bias.
        stride, padding, dilation: conv geometry (conv followers only).
        norm: ``"none"``; ``"affine"`` (``y * scale + shift``, BN with fixed statistics folded);
            ``"batch"`` (BatchNorm on the batch statistics of each masked output separately,
            biased variance, ``eps``, then ``* scale + shift``: ``nn.BatchNorm2d`` in training mode).
        post: ``"none"`` or ``"relu"``.
        method: ``"auto"`` (default: the cheaper exact path by the cost model of
            docs/kernels.md), ``"fused"`` (the extension's one-pass tile kernel,
            ``torch.ops.aofp.masked_damage``) or ``"moments"`` (the moments of the channel
            contributions by BLAS, then every mask in closed form for ``post="none"``; for
            ``norm="batch", post="relu"`` on the CPU, every masked output's BN statistics from
            the moments, then one pass of :func:`masked_relu_damage`; with ``norm="batch"`` on
            the CPU the moments of only the channels the masks vary where that is cheaper).
        groups: a grouped conv follower (``weight`` ``(O, C / groups, kh, kw)``): priced conv
            group by conv group (each one's outputs read only its own inputs) and summed.
        output: optional, the follower's unmasked output ``conv(x, weight) + bias`` as the
            forward computed it, ``(N, O, Ho, Wo)`` (``(N, O)`` for a Linear). With
            ``norm="batch"`` on the CPU, where the masks differ on a few channels only, the
            moments path may then price those channels alone without a forward of its own
            (docs/kernels.md, "The varying channels"); ignored elsewhere. It must be that
            output: the damages are wrong otherwise.

    Returns:
        ``(K,)`` float32 (float64 accumulation inside); memory stays bounded for any K and N.
    """
    _check_backend("masked_damage", x, weight, masks, bias, scale, shift)
    if groups != 1 or isinstance(groups, bool):
        total = None
        for si, so in _conv_groups("masked_damage", groups, x, weight):
            d = masked_damage(x[:, si], weight[so], masks[:, si], bias=_part(bias, so),
                              stride=stride, padding=padding, dilation=dilation, norm=norm,
                              scale=_part(scale, so), shift=_part(shift, so), eps=eps, post=post,
                              method=method, output=None if output is None else output[:, so]
                              ).double()
            total = d if total is None else total + d
        return total.float()
    if method not in ("auto", "fused", "moments"):
        raise ValueError(f"masked_damage: method must be 'auto', 'fused' or 'moments', got "
                         f"{method!r}")
    args = dict(bias=bias, stride=_pair(stride, "stride"), padding=_pair(padding, "padding"),
                dilation=_pair(dilation, "dilation"), norm=norm, scale=scale, shift=shift,
                eps=float(eps), post=post)
    _check_output(x, weight, output, args)
    relu_stats = norm == "batch" and post == "relu" and x.device.type == "cpu"
    if method == "moments" and not (_moments.eligible(norm, post) or relu_stats):
        raise ValueError(f"masked_damage: method='moments' prices post='none' followers (norm "
                         f"none/affine/batch) and, on the CPU, norm='batch' with post='relu'; "
                         f"got norm={norm!r}, post={post!r} on {x.device}")
    if (method != "fused" and (_moments.eligible(norm, post) or relu_stats)
            and not torch.compiler.is_compiling()):
        # every argument checked by the op itself (no mask is priced with K = 0)
        torch.ops.aofp.masked_damage(x, weight, masks[:0], **args)
        path = _path(x, weight, masks, args, method == "moments", output is not None)
        if path != "fused":
            return _masked_damage_moments(x, weight, masks, args, path, output)
    if norm != "batch" and post == "none":
        output = None          # the pass reads y only for ReLU and batch statistics
    return torch.ops.aofp.masked_damage(x, weight, masks, **args, output=output)


def _check_output(x, weight, output, args) -> None:
    if output is None:
        return
    if x.dim() == 2:
        want = (x.shape[0], weight.shape[0])
    else:
        (sh, sw), (ph, pw), (dh, dw) = args["stride"], args["padding"], args["dilation"]
        kh, kw = weight.shape[2:]
        want = (x.shape[0], weight.shape[0], (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != want:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"masked_damage: output must be the follower's output, of shape "
                         f"{want} here, got {got}")
    if output.device != x.device or not output.is_floating_point():
        raise ValueError(f"masked_damage: output must be a floating tensor on {x.device}, got "
                         f"{output.dtype} on {output.device}")


def _path(x, weight, masks, args, forced: bool, output: bool) -> str:
    """``"fused"``, ``"moments"`` (every channel's moments) or ``"varying"`` (the moments of
    the channels the masks vary only: norm="batch", CPU masks)."""
    C, O, T, P = _moments._geometry(x, weight, args["stride"], args["padding"],
                                    args["dilation"])
    K = masks.shape[0]
    if min(K, C, O, P) == 0:
        return "fused"   # nothing to price: the op returns its zeros
    lag = _moments.lag_shape(x, weight, args["stride"], args["padding"], args["dilation"])
    batch = args["norm"] == "batch"
    if masks.device.type != "cpu":
        if forced:
            return "moments"
        return _moments.choose(C, O, T, P, K, batch, lag=lag, relu=args["post"] == "relu")
    # the CPU mask pass tabulates only the channels some but not all masks remove and forms
    # the contributions of those and of the removed-by-all ones that are not all 0 in x (of
    # every channel where it needs y and the output is not given); the varying path prices
    # only those too
    varying_idx, gone_idx, _ = _varying.partition(masks.bool())
    varying = varying_idx.numel()
    gone = _varying._live(x, weight, gone_idx.to(x.device)).numel()
    relu = args["post"] == "relu"
    used = varying + gone if output or not (batch or relu) else C
    return _varying.choose(C, O, T, P, K, batch, forced, lag=lag, relu=relu, varying=varying,
                           gone=gone, output=output, used=used)


def _masked_damage_moments(x, weight, masks, args, path="moments", output=None
                           ) -> torch.Tensor:
    if masks.dtype == torch.uint8 and bool((masks > 1).any()):
        raise RuntimeError("masked_damage: uint8 masks must hold only 0 and 1 (found a value > "
                           "1); use a bool tensor")
    geo = (args["stride"], args["padding"], args["dilation"])
    x32, w32 = x.float(), weight.float()
    forms = None
    if path == "varying":
        forms = _varying.batch_forms(x32, w32, masks, *geo,
                                     output=None if output is None else output.float())
    if args["post"] == "relu":       # norm="batch": the statistics here, then one ReLU pass
        mask_scale, mask_shift, centre, base_scale = _moments.batch_relu_affine(
            x32, w32, masks, args["bias"], *geo, args["scale"], args["shift"], args["eps"],
            forms)
        return torch.ops.aofp.masked_relu_damage(
            x, weight, masks, mask_scale.float(), mask_shift.float(), centre,
            base_scale.float(), args["shift"], bias=args["bias"], stride=args["stride"],
            padding=args["padding"], dilation=args["dilation"], output=output)
    if args["norm"] == "batch":
        d = _moments.batch_damage(x32, w32, masks, *geo, args["scale"], args["eps"], forms)
    else:
        d = _moments.linear_damage(x32, w32, masks, *geo,
                                   args["scale"] if args["norm"] == "affine" else None)
    return d.float()


def masked_relu_damage(
    x: torch.Tensor,
    weight: torch.Tensor,
    masks: torch.Tensor,
    mask_scale: torch.Tensor,
    mask_shift: torch.Tensor,
    centre: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Damage of K channel masks at a follower with a per-mask affine, then ReLU (CPU).

    ``damage[k] = sum((relu(mask_scale[k] * (y_k - centre) + mask_shift[k])
    - relu(scale * (y - centre) + shift)) ** 2)`` over every output element, each coefficient
    broadcast over its output channel, with ``y = conv(x) + bias`` and ``y_k = conv(x *
    masks[k]) + bias``; 0 for a mask that keeps every channel. With ``centre = mean(y)`` and
    each mask's coefficients from the batch statistics of its own output this is
    ``masked_damage(norm="batch", post="relu")`` in one pass of the fused kernel instead of
    two (the statistics come from :mod:`aofp_ext._moments`).

    Args:
        x, weight, masks, bias, stride, padding, dilation, output: as :func:`masked_damage`.
        mask_scale, mask_shift: ``(K, O)``.
        centre, scale, shift: ``(O,)``; ``centre`` is used in float64.

    Returns:
        ``(K,)`` float32 (float64 accumulation inside).
    """
    if x.device.type != "cpu":
        raise ValueError(f"masked_relu_damage: runs on the CPU only, got x on {x.device} "
                         "(on a GPU, masked_damage(norm='batch', post='relu') prices the same in "
                         "the fused kernel)")
    return torch.ops.aofp.masked_relu_damage(
        x, weight, masks, mask_scale, mask_shift, centre, scale, shift, bias=bias,
        stride=_pair(stride, "stride"), padding=_pair(padding, "padding"),
        dilation=_pair(dilation, "dilation"), output=output)


def channel_gram(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    scale: torch.Tensor | None = None,
    method: str = "auto",
    groups: int = 1,
) -> torch.Tensor:
    """Gram matrix of the per-channel contributions ``z_c = conv(x[:, c], W[:, c])``.

    ``G[c, c'] = sum over (n, o, h, w) of scale[o]**2 * z_c * z_c'``; the damage of any mask at a
    linear follower output is ``r^T G r`` (r = 1 for removed channels), see
    :func:`quadratic_damage`. Its diagonal is the exact single-channel oracle. Returns ``(C, C)``
    float32. ``method``: ``"auto"`` (default; ``"blas"`` outside ``torch.compile``), ``"blas"``
    (the factored or direct form, whichever costs less, by torch matmuls) or ``"kernel"`` (the
    extension's own op, ``torch.ops.aofp.channel_gram``). ``groups``: a grouped conv follower
    (``weight`` ``(O, C / groups, kh, kw)``): block diagonal, one block per conv group (channels
    of different conv groups reach disjoint outputs).
    """
    _check_backend("channel_gram", x, weight, scale)
    if groups != 1 or isinstance(groups, bool):
        blocks = _conv_groups("channel_gram", groups, x, weight)
        g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        for si, so in blocks:
            g[si, si] = channel_gram(x[:, si], weight[so], stride=stride, padding=padding,
                                     dilation=dilation, scale=_part(scale, so), method=method)
        return g
    if method not in ("auto", "blas", "kernel"):
        raise ValueError(f"channel_gram: method must be 'auto', 'blas' or 'kernel', got "
                         f"{method!r}")
    geo = dict(stride=_pair(stride, "stride"), padding=_pair(padding, "padding"),
               dilation=_pair(dilation, "dilation"))
    if method == "kernel" or (method == "auto" and torch.compiler.is_compiling()):
        return torch.ops.aofp.channel_gram(x, weight, **geo, scale=scale)
    # every argument checked by the op itself, on an empty batch (nothing computed)
    empty = torch.ops.aofp.channel_gram(x[:0], weight, **geo, scale=scale)
    C, O, T, P = _moments._geometry(x, weight, geo["stride"], geo["padding"], geo["dilation"])
    if min(C, O, P) == 0:
        return empty
    g = _moments.output_summed_gram(x.float(), weight.float(), geo["stride"], geo["padding"],
                                    geo["dilation"], None if scale is None else scale.float())
    return g.float()


def quadratic_damage(gram: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``damage[k] = r_k^T G r_k`` with ``r_k = ~masks[k]``; ``(K,)`` float32."""
    _check_backend("quadratic_damage", gram, masks)
    return torch.ops.aofp.quadratic_damage(gram, masks)


def output_grams(blocks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel Grams from the im2col Gram's tap blocks (CPU):
    ``grams[c, d, o] = sum over taps (t, u) of W[o, c, t] blocks[t, u, c, d] W[o, d, u]`` for
    ``c <= d``, and ``grams[d, c, o] = grams[c, d, o]`` (the blocks of a Gram are symmetric,
    ``blocks[t, u, c, d] = blocks[u, t, d, c]``, and so are its per-output Grams: the op computes
    each pair once and does not read the blocks of ``c > d``).

    ``blocks``: ``(T, T, C, C)`` (``blocks[t, u]`` the Gram block of im2col taps ``t`` and
    ``u``), ``weight``: the follower's ``(O, C, kh, kw)`` (``kh * kw = T``) or Linear ``(O, C)``
    (``T = 1``). Returns ``(C, C, O)`` float32, output channel last: ``grams[:, :, o]`` is the
    Gram of the contributions ``z_c = conv(x[:, c], W[o, c])`` when ``blocks`` is the Gram of
    ``x``'s im2col rows (the moments path's per-output forms, docs/kernels.md).
    """
    _check_backend("output_grams", blocks, weight)
    if blocks.device.type != "cpu":
        raise ValueError(f"output_grams: runs on the CPU only, got blocks on {blocks.device}")
    return torch.ops.aofp.output_grams(blocks, weight)


def gram_forms(grams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``forms[k, o] = m_k^T grams[:, :, o] m_k`` with ``m_k = masks[k]`` (1 = keep), CPU.

    ``grams``: ``(C, C, O)`` symmetric in ``(c, d)`` (as :func:`output_grams` returns them; only
    the upper triangle ``d >= c`` is read, the lower one is taken as its mirror), ``masks``:
    ``(K, C)`` bool. The sum of ``grams[c, d, o]`` over each mask's pairs of kept channels
    (``|kept|^2 / 2`` adds per mask and output channel, float32 over ``d`` and float64 over
    ``c``). Returns ``(K, O)`` float64.
    """
    _check_backend("gram_forms", grams, masks)
    if grams.device.type != "cpu":
        raise ValueError(f"gram_forms: runs on the CPU only, got grams on {grams.device}")
    return torch.ops.aofp.gram_forms(grams, masks)


def compact_(tensors: Sequence[torch.Tensor], dims: Sequence[int], keep: torch.Tensor) -> None:
    """In place, keep only the slices ``keep`` (sorted, unique int64) of each tensor along its dim.

    The tensor objects (and ``nn.Parameter`` objects) stay the same objects; their storage is
    reused (and shrunk when the tensor is its only user), so no full second copy is made.
    All tensors must have the same size along their dim. Runs under ``torch.no_grad()``.
    """
    tensors = list(tensors)
    dims = [int(d) for d in dims]
    _check_backend("compact_", keep, *tensors)
    with torch.no_grad():
        torch.ops.aofp.compact_(tensors, dims, keep)


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels, so torch.compile / export can trace the ops
# --------------------------------------------------------------------------------------------

if _C is not None:

    def _out_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float32

    @torch.library.register_fake("aofp::masked_damage")
    def _masked_damage_fake(x, weight, masks, *, bias=None, stride=(1, 1), padding=(0, 0),
                            dilation=(1, 1), norm="none", scale=None, shift=None, eps=1e-5,
                            post="none", output=None):
        torch._check(masks.dim() == 2, lambda: "masked_damage: masks must be (K, C)")
        return x.new_empty((masks.shape[0],), dtype=_out_dtype(x))

    @torch.library.register_fake("aofp::masked_relu_damage")
    def _masked_relu_damage_fake(x, weight, masks, mask_scale, mask_shift, centre, scale, shift,
                                 *, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                                 output=None):
        torch._check(masks.dim() == 2, lambda: "masked_relu_damage: masks must be (K, C)")
        return x.new_empty((masks.shape[0],), dtype=_out_dtype(x))

    @torch.library.register_fake("aofp::channel_gram")
    def _channel_gram_fake(x, weight, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                           scale=None):
        return x.new_empty((x.shape[1], x.shape[1]), dtype=_out_dtype(x))

    @torch.library.register_fake("aofp::quadratic_damage")
    def _quadratic_damage_fake(gram, masks):
        return gram.new_empty((masks.shape[0],), dtype=_out_dtype(gram))

    @torch.library.register_fake("aofp::output_grams")
    def _output_grams_fake(blocks, weight):
        C = blocks.shape[2]
        return blocks.new_empty((C, C, weight.shape[0]), dtype=_out_dtype(blocks))

    @torch.library.register_fake("aofp::gram_forms")
    def _gram_forms_fake(grams, masks):
        return grams.new_empty((masks.shape[0], grams.shape[2]), dtype=torch.float64)

    @torch.library.register_fake("aofp::compact_")
    def _compact_fake(tensors, dims, keep):
        return None


# --------------------------------------------------------------------------------------------
# Pure-PyTorch references (the test oracle)
# --------------------------------------------------------------------------------------------


def _follower(x, weight, bias, stride, padding, dilation, groups=1):
    if weight.dim() == 2:
        if groups != 1:
            raise ValueError(f"groups={groups} applies to conv followers only")
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"),
                    _pair(dilation, "dilation"), groups)


def _apply_norm(y, norm, scale, shift, eps):
    if norm == "none":
        return y
    shape = (1, -1) + (1,) * (y.dim() - 2)
    s, t = scale.to(y.dtype).view(shape), shift.to(y.dtype).view(shape)
    if norm == "affine":
        return y * s + t
    if norm == "batch":
        red = [0] + list(range(2, y.dim()))
        mean = y.mean(dim=red, keepdim=True)
        var = ((y - mean) ** 2).mean(dim=red, keepdim=True)  # biased, as BN in training mode
        return (y - mean) / torch.sqrt(var + eps) * s + t
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


def masked_damage_reference(x, weight, masks, *, bias=None, stride=1, padding=0, dilation=1,
                            norm="none", scale=None, shift=None, eps=1e-5, post="none",
                            dtype=torch.float64, groups=1):
    """The authors' way: one masked follower forward per mask, in ``dtype`` (a grouped conv
    follower by ``F.conv2d(groups=groups)``)."""
    if post not in _POSTS:
        raise ValueError(f"post must be one of {_POSTS}, got {post!r}")
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    keep = masks.to(torch.bool)

    def f(inp):
        y = _apply_norm(_follower(inp, weight, bias, stride, padding, dilation, groups), norm,
                        scale, shift, eps)
        return torch.relu(y) if post == "relu" else y

    base = f(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = torch.empty(keep.shape[0], dtype=dtype)
    for k in range(keep.shape[0]):
        out[k] = ((f(x * keep[k].to(dtype).view(shape)) - base) ** 2).sum()
    return out


def masked_relu_damage_reference(x, weight, masks, mask_scale, mask_shift, centre, scale, shift,
                                 *, bias=None, stride=1, padding=0, dilation=1,
                                 dtype=torch.float64):
    """One masked follower forward per mask, in ``dtype``."""
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    keep = masks.to(torch.bool)
    shape = (1, -1) + (1,) * (x.dim() - 2)

    def v(t):
        return t.to(dtype).view(shape)

    c = v(centre)
    base = torch.relu((_follower(x, weight, bias, stride, padding, dilation) - c) * v(scale)
                      + v(shift))
    out = torch.zeros(keep.shape[0], dtype=dtype)
    for k in range(keep.shape[0]):
        if bool(keep[k].all()):
            continue
        yk = _follower(x * keep[k].to(dtype).view(shape), weight, bias, stride, padding,
                       dilation)
        out[k] = ((torch.relu((yk - c) * v(mask_scale[k]) + v(mask_shift[k])) - base) ** 2).sum()
    return out


def channel_gram_reference(x, weight, *, stride=1, padding=0, dilation=1, scale=None,
                           dtype=torch.float64, groups=1):
    """``Z`` by one grouped convolution (every (c, o) pair), then ``Z Z^T``, in ``dtype``. A
    grouped conv follower (``groups``) as its dense weight: zero between conv groups."""
    x, weight = x.to(dtype), weight.to(dtype)
    if groups != 1:
        O, c = weight.shape[:2]
        dense = weight.new_zeros(O, c * groups, *weight.shape[2:])
        for j in range(groups):
            dense[j * (O // groups):(j + 1) * (O // groups), j * c:(j + 1) * c] = \
                weight[j * (O // groups):(j + 1) * (O // groups)]
        weight = dense
    if weight.dim() == 2:
        x, weight = x[:, :, None, None], weight[:, :, None, None]
    O, C = weight.shape[:2]
    w = weight.transpose(0, 1).reshape(C * O, 1, *weight.shape[2:])  # channel c*O + o
    z = F.conv2d(x, w, None, _pair(stride, "stride"), _pair(padding, "padding"),
                 _pair(dilation, "dilation"), groups=C)               # (N, C*O, Ho, Wo)
    z = z.view(z.shape[0], C, O, -1)
    if scale is not None:
        z = z * scale.to(dtype).view(1, 1, O, 1)
    z = z.transpose(0, 1).reshape(C, -1)
    return z @ z.T


def quadratic_damage_reference(gram, masks, dtype=torch.float64):
    r = (~masks.to(torch.bool)).to(dtype)
    return ((r @ gram.to(dtype)) * r).sum(dim=1)


def output_grams_reference(blocks, weight, dtype=torch.float64):
    """The same contraction by ``einsum``, in ``dtype``, over the pairs ``c <= d`` and their
    mirror."""
    O, C = weight.shape[:2]
    w = weight.to(dtype).reshape(O, C, -1)
    return _mirror_upper(torch.einsum("oct,tucd,odu->cdo", w, blocks.to(dtype), w))


def gram_forms_reference(grams, masks, dtype=torch.float64):
    """By ``einsum`` over the Grams' upper triangle and its mirror, in ``dtype``."""
    m = masks.to(torch.bool).to(dtype)
    return torch.einsum("kc,cdo,kd->ko", m, _mirror_upper(grams.to(dtype)), m)


def _mirror_upper(g: torch.Tensor) -> torch.Tensor:
    """``(C, C, O)`` with the entries ``c > d`` replaced by the mirror of ``c < d``."""
    upper = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device).triu()[:, :, None]
    return torch.where(upper, g, g.transpose(0, 1))


def compact_reference_(tensors, dims, keep) -> None:
    """Same contract as :func:`compact_`, by ``index_select`` and ``set_`` (makes copies)."""
    with torch.no_grad():
        for t, d in zip(tensors, dims):
            t.set_(t.index_select(d, keep.to(t.device)).contiguous())


reference = SimpleNamespace(
    masked_damage=masked_damage_reference,
    masked_relu_damage=masked_relu_damage_reference,
    channel_gram=channel_gram_reference,
    quadratic_damage=quadratic_damage_reference,
    output_grams=output_grams_reference,
    gram_forms=gram_forms_reference,
    compact_=compact_reference_,
)
