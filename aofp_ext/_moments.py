"""The K-independent exact pricing paths of :func:`aofp_ext.ops.masked_damage`, in torch ops.

At a follower that is linear up to its BatchNorm (``post="none"``) the damage of *any* mask
follows exactly from second moments of the channel contributions ``z_c = conv(x[:, c], W[:, c])``
(docs/kernels.md, "The moments path"):

- ``norm`` none/affine: ``damage_k = r_k^T G r_k`` with ``G = sum_o scale_o^2 Z_o Z_o^T``
  (uncentred, summed over the output channels ``o``);
- ``norm="batch"``: per output channel the centred Gram ``Gc_o = Zc_o Zc_o^T`` (``Zc`` = the
  contributions minus their means over the positions); mean, variance and covariance of every
  masked output are linear or quadratic in the mask, so the damage is a closed form in
  ``r^T Gc_o r``, ``r . (Gc_o 1)`` and ``1^T Gc_o 1``.

The moments are built once per call (the cost of a few follower forwards), then each mask costs
``O(O x C^2)`` (batch) or ``O(C^2)`` (none/affine) in one GEMM. Every plain product is a torch
matmul (BLAS on the CPU, cuBLAS on a GPU), so this module needs no kernel of its own and works
on any device torch does. Products run in float32 over blocks of at most ``_BLOCK`` floats and
are accumulated in float64; data are shifted by a first-block mean before any second moment is
formed (no cancellation for inputs with a large common offset).
"""

from __future__ import annotations

import functools
import threading
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

_BLOCK = 1 << 22          # floats per temporary block (16 MiB in float32)
_OP_OUTPUTS = 32          # output channels per block of the output_grams op (kOutputGramsBlock)
#: Stride-1 convs: the im2col Gram from lagged products (:func:`_lag_gram`), not the im2col matrix
LAG_GRAM = True


def _geometry(x, weight, stride, padding, dilation):
    """(C, O, T, P): channels, outputs, kernel taps, output positions (a Linear follower is a
    1x1 conv over its N samples)."""
    O, C = weight.shape[:2]
    if x.dim() == 2:
        return C, O, 1, x.shape[0]
    kh, kw = weight.shape[2:]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return C, O, kh * kw, x.shape[0] * ho * wo


def _bits(K: int, C: int) -> int:
    """The fused mask pass's subset-table width for K masks over C varying channels
    (csrc/kernels/mask_pass_cpu.cpp, table_bits and table_cost: per group 2^b table rows in each
    block of 128 masks and K/2 row loads, plus the partial sums once per chunk of groups)."""
    def cost(b: int) -> float:
        groups = -(-max(C, 1) // b)
        chunk = max(1, 6144 // ((1 << b) * 32))
        return groups * ((1 << b) * -(-K // 128) + 0.5 * K) + -(-groups // chunk) * K
    return min((b for b in range(1, 7) if b == 1 or b <= C), key=cost)


# Cost model: which exact path is cheaper (docs/kernels.md, "The cost model"). Seconds on one
# thread, fitted (non-negative least squares on the relative error) to the measured times of
# both paths (BN on batch statistics, no ReLU) at ResNet-56, VGG, ResNet-50, MobileNetV2 and
# LeNet follower shapes, K = 16..1024. Each coefficient multiplies a count of the work named:
#
# fused (the mask pass): a fixed cost per call; the contributions (O P C T multiply-adds), the
#   subset tables (O P C 2^b / b per block of 128 masks), the mask rows (O P C K / b; b = the
#   pass's table width), the epilogue (O P K) and the pass over the input (C T P);
# moments: a fixed cost per call (about 40 torch calls); the copy of the input (C T P floats
#   for the im2col matrix, about C P for the lag Gram of a stride-1 conv, plus its Python work
#   per tap pair); the cheaper build of the moments (_build_cost, BLAS multiply-adds; the lag
#   Gram's coefficients are taken from the im2col one's); the per-output Grams held in
#   float64 (O C^2 entries, memory-bound: several passes); the mask forms (K O C^2, or K C^2 for
#   none/affine, multiply-adds in one float32 GEMM).
# Refitted 2026-12-03 by bench/cost_model.py after the mask pass replaced the tile kernel (Intel
# Xeon with AVX-512, 1 thread, 13 follower shapes x K = 16..1024, bench/results/cost-model.md),
# with the lag Gram's Python work per tap pair (_PAIR_S) re-measured: 49 of 52 choices right,
# 1 % mean extra time (the previous coefficients, fitted to the tile kernel on the AMD machine:
# 42, 9 %).
_FUSED_S = dict(call=1.1e-3, contrib=1.8e-11, tables=5.1e-11, masks=2.0e-11, epilogue=3.5e-10,
                cols=0.0, output=3.5e-9)
_MOMENTS_S = dict(call=0.0, cols=5.5e-9, build=1.4e-11, grams=4.0e-9, forms=1.7e-11,
                  pairs=7.9e-12)


def _threads(threads: int | None) -> int:
    return max(1, int(threads if threads is not None else torch.get_num_threads()))


def fused_terms(C: int, O: int, T: int, P: int, K: int, threads: int | None = None,
                varying: int | None = None, used: int | None = None,
                output: bool = False) -> dict[str, float]:
    """The fused mask pass's counted work, one entry per coefficient of ``_FUSED_S``: the
    kernel's work and its input pass divided by ``threads`` (default: torch's setting; the
    kernel splits its tiles over them). ``varying``: the channels that some but not all masks
    remove (default ``C``); only they enter the subset tables and the mask sums (the search's
    later steps vary a shrinking part of each layer). ``used``: the channels whose
    contributions the pass forms (default ``C``; without ReLU and batch statistics, or with the
    follower's ``output`` given, only the varying and the removed-by-all ones); ``output``:
    the given output is copied once (its term, taken as the varying path's pass over the
    output, is not part of the fit)."""
    cv = C if varying is None else varying
    cu = C if used is None else used
    b, n = _bits(K, cv), _threads(threads)
    blocks = -(-K // 128)
    return dict(call=1.0, contrib=O * P * cu * T / n,
                tables=O * P * cv * (1 << b) / b * blocks / n, masks=O * P * cv * K / b / n,
                epilogue=O * P * K / n, cols=cu * T * P / n, output=O * P / n if output else 0.0)


def fused_cost(C: int, O: int, T: int, P: int, K: int, threads: int | None = None,
               varying: int | None = None, used: int | None = None,
               output: bool = False) -> float:
    """Predicted seconds of the fused mask pass."""
    return sum(_FUSED_S[k] * v
               for k, v in fused_terms(C, O, T, P, K, threads, varying, used, output).items())


def moments_terms(C: int, O: int, T: int, P: int, K: int, batch: bool,
                  threads: int | None = None, lag: tuple[int, int, int] | None = None,
                  held: bool = False) -> tuple[dict[str, float], float]:
    """The moments path's counted work, one entry per coefficient of ``_MOMENTS_S``, and its
    fixed seconds (the lag Gram's Python work per tap pair). ``held``: the per-output Grams are
    held and summed per mask even for a 1x1 follower (:mod:`aofp_ext._varying`)."""
    build, route, copied, fixed = _build_cost(C, O, T, P, per_output=batch, lag=lag)
    n = _threads(threads)
    # a 1x1 follower's batch forms read Sigma itself (one GEMM, no per-output Grams held,
    # _per_output_forms); other batch followers hold the (C, C, O) Grams and sum each mask's
    # pairs of them (gram_forms: |S|^2 / 2 adds per (mask, output), S the smaller set, counted
    # as K O C^2); none/affine: one C x C form per mask
    gemm_forms = batch and T == 1 and route == "sigma" and not held
    grams = O * C * C if batch else C * C
    # everything but the fixed per-call cost runs on every thread (on the Intel machine the
    # copies of the input and the passes over the held Grams speed up with the second thread
    # too: ResNet-56 32@16x16, batch + none, K = 64: 9.2 ms at 1 thread, 5.8 ms at 2; on the
    # AMD machine of the first fits they had not)
    return dict(call=1.0, cols=copied / n, build=build / n,
                grams=(C * C if gemm_forms else grams) / n,
                forms=K * grams / n if gemm_forms or not batch else 0.0,
                pairs=0.0 if gemm_forms or not batch else K * grams / n), fixed


def moments_cost(C: int, O: int, T: int, P: int, K: int, batch: bool,
                 threads: int | None = None, lag: tuple[int, int, int] | None = None,
                 held: bool = False) -> float:
    """Predicted seconds of the moments path (``batch``: norm="batch", per-output moments;
    ``lag``: :func:`lag_shape` of a stride-1 conv, whose im2col Gram may come from lagged
    products)."""
    terms, fixed = moments_terms(C, O, T, P, K, batch, threads, lag, held)
    return fixed + sum(_MOMENTS_S[k] * v for k, v in terms.items())


def choose(C: int, O: int, T: int, P: int, K: int, batch: bool,
           threads: int | None = None, lag: tuple[int, int, int] | None = None,
           relu: bool = False, varying: int | None = None, used: int | None = None,
           output: bool = False) -> str:
    """``"moments"`` or ``"fused"``: the path the cost model predicts to be faster. ``relu``
    (with ``batch``): the moments give every mask's BN statistics and one fused ReLU pass
    prices them, against the fused kernel's two mask passes (BN statistics, then the clipped
    damage). ``varying``, ``used``, ``output``: as for :func:`fused_terms` (the CPU mask
    pass's work; default ``C``)."""
    fused = fused_cost(C, O, T, P, K, threads, varying, used, output)
    if relu:
        if not batch:
            raise ValueError("choose: relu=True applies to batch=True (norm='batch') only")
        hybrid = moments_cost(C, O, T, P, K, True, threads, lag) + fused
        return "moments" if hybrid < 2 * fused else "fused"
    return "moments" if moments_cost(C, O, T, P, K, batch, threads, lag) < fused else "fused"


# Relative rates inside the build (units of a float32 BLAS GEMM multiply-add): float64 work at
# about a quarter of the GEMM rate; the contraction of the im2col Gram with the weights
# (output_grams, T^2 + T multiply-adds per (c, d, o) in registers) at about half.
_F64 = 4.0
_CONTRACT = 2.0
_PAIR_S = 2e-5      # seconds per tap pair of the lag Gram's Python work (strips, assembly): 0.8 ms
                    # per call of 45 pairs measured 2026-12-03 on the Intel machine (1.5e-4 before the
                    # strip indices were cached)


def lag_shape(x, weight, stride, padding, dilation) -> tuple[int, int, int] | None:
    """``(lags, tap pairs, flat length)`` of :func:`_lag_gram` for a stride-1 conv, else None."""
    if x.dim() != 4 or tuple(stride) != (1, 1) or not LAG_GRAM:
        return None
    kh, kw = weight.shape[2:]
    lags = ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
    T = kh * kw
    flat = x.shape[0] * (x.shape[2] + dilation[0] * (kh - 1)) * (x.shape[3] + dilation[1] * (kw - 1))
    return lags, T * (T + 1) // 2, flat


def _gram_route(C: int, T: int, P: int, lag) -> tuple[float, float, float, bool]:
    """``(GEMM multiply-adds, floats copied, fixed seconds, lagged)`` of the cheaper way to the
    im2col Gram: the im2col matrix (tap-major blocks ``u >= t``) or lagged products."""
    im2col = ((C * T) ** 2 * P * (T + 1) / (2 * T), C * T * P, 0.0)
    if lag is not None:
        lags, pairs, flat = lag
        lagged = (lags * C * C * flat, C * flat, _PAIR_S * pairs)

        def secs(r):
            return _MOMENTS_S["build"] * r[0] + _MOMENTS_S["cols"] * r[1] + r[2]

        if secs(lagged) < secs(im2col):
            return (*lagged, True)
    return (*im2col, False)


def _build_cost(C: int, O: int, T: int, P: int, per_output: bool, lag=None
                ) -> tuple[float, str, float, float]:
    """The cheaper way to the moments: ``sigma`` (the im2col Gram, contracted with the weights)
    or ``z`` (the contributions by a batched matmul, then their Grams). Returns (BLAS
    multiply-adds, route, floats copied, fixed seconds)."""
    gram, copied, fixed, _ = _gram_route(C, T, P, lag)
    if per_output:
        # output_grams forms each symmetric pair c <= d once
        sigma = gram + (_CONTRACT * O * C * (C + 1) / 2 * T * (T + 1) if T > 1 else O * C * C)
        z = _F64 * (4 * O * C * P * T + O * C * C * P)       # float64 contributions and Grams
    else:
        sigma = gram + T * (T + 1) // 2 * C * C * O      # W_t^T W_u per pair u >= t
        z = 4 * O * C * P * T + C * C * O * P
    zs, ss = _MOMENTS_S["build"] * z, _MOMENTS_S["build"] * sigma + fixed
    if ss <= zs + _MOMENTS_S["cols"] * (C * T * P - copied):
        return sigma, "sigma", copied, fixed
    return z, "z", C * T * P, 0.0


def eligible(norm: str, post: str) -> bool:
    return post == "none" and norm in ("none", "affine", "batch")


# --------------------------------------------------------------------------------------------
# Blocks of the im2col matrix and of the contributions
# --------------------------------------------------------------------------------------------


def _samples_per_block(N: int, floats_per_sample: int) -> int:
    return max(1, min(N, _BLOCK // max(1, floats_per_sample)))


def _cols(x, weight, stride, padding, dilation, step=None, centre=False, tap_major=False
          ) -> Iterator[torch.Tensor]:
    """``(C*T, n*L)`` float32 blocks of the im2col matrix (rows ordered channel-major), ``step``
    samples at a time. ``centre``: every entry minus the mean of its input channel over the
    first block (padding included: a constant shift per row, which second moments about the
    mean do not see, but which removes a large common offset before any product)."""
    if x.dim() == 2:
        step = step or _samples_per_block(x.shape[0], x.shape[1])
        shift = x[:step].mean(dim=0) if centre else None
        for n0 in range(0, x.shape[0], step):
            xb = x[n0:n0 + step]
            yield (xb - shift).t().contiguous() if centre else xb.t().contiguous()
        return
    C, _, T, P = _geometry(x, weight, stride, padding, dilation)
    L = P // x.shape[0]
    step = step or _samples_per_block(x.shape[0], C * T * L)
    shift = x[:step].mean(dim=(0, 2, 3)) if centre else None
    for n0 in range(0, x.shape[0], step):
        yield _im2col(x[n0:n0 + step], tuple(weight.shape[2:]), stride, padding, dilation, shift,
                      tap_major)


def _im2col(x, ks, stride, padding, dilation, shift=None, tap_major=False) -> torch.Tensor:
    """``(C*kh*kw, n*Ho*Wo)`` (rows ``c*T + t``, or ``t*C + c`` when ``tap_major``): one strided view of the padded input (minus ``shift[c]``, padding
    included), copied once (``F.unfold`` is a scalar loop on the CPU, several times slower)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = ks, stride, padding, dilation
    if shift is not None:
        s = shift.view(1, -1, 1, 1)
        xp = (-s).expand(x.shape[0], -1, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw).contiguous()
        xp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]] = x - s
    else:
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    n, C, H, W = xp.shape
    ho, wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    a, b, c, d = xp.stride()
    v = xp.as_strided((C, kh, kw, n, ho, wo), (b, dh * c, dw * d, a, sh * c, sw * d),
                      xp.storage_offset())
    if tap_major:
        v = v.permute(1, 2, 0, 3, 4, 5)
    return v.reshape(C * kh * kw, n * ho * wo)


class _LagPlan(NamedTuple):
    """The geometry of :func:`_lag_gram` for one input size and conv (pure Python, cached)."""
    mh: int
    mw: int
    wq: int            # row length of the flat layout (the image row, then mw zeros)
    S: int             # one sample in the flat layout: H + mh rows
    G: int             # zero guard before and after the samples
    lags: tuple        # (dr, ds) of the lagged products, in the half-plane of u >= t
    tt: torch.Tensor   # (pairs,) tap t of each block (t, u >= t)
    uu: torch.Tensor   # (pairs,) tap u
    lag_index: torch.Tensor   # (pairs,) which lag each block reads
    dead: torch.Tensor        # (pairs,) bool: t reads no input position
    strips: tuple      # (r0, r1, c0, c1, dr, ds): a rectangle of the image that some t does not
                       # read, clipped to where x(q + D) is in the image (elsewhere it is 0)
    strip_pair: torch.Tensor  # (uses,) the block each use of a strip is subtracted from
    strip_of: torch.Tensor    # (uses,) which strip
    reads: torch.Tensor       # (T, 4) R_t as (r0, r1, c0, c1)
    both_t: torch.Tensor      # (pairs, 4) R_t and the positions D away in the image
    both_u: torch.Tensor      # (pairs, 4) R_u and the positions -D away in the image


@functools.lru_cache(maxsize=256)
def _lag_plan(H: int, W: int, kh: int, kw: int, ph: int, pw: int, dh: int, dw: int) -> _LagPlan:
    ho, wo = H + 2 * ph - dh * (kh - 1), W + 2 * pw - dw * (kw - 1)
    T = kh * kw
    mh, mw = dh * (kh - 1), dw * (kw - 1)           # zero margins: every lag stays in them
    wq = W + mw
    taps = [(i * dh - ph, j * dw - pw) for i in range(kh) for j in range(kw)]
    reads = [(max(0, r), min(H, r + ho), max(0, s), min(W, s + wo)) for r, s in taps]  # R_t
    pairs = [(t, u) for t in range(T) for u in range(t, T)]      # u >= t: D in a half-plane
    lag_of = [(taps[u][0] - taps[t][0], taps[u][1] - taps[t][1]) for t, u in pairs]
    lags = tuple(sorted(set(lag_of)))

    def clip(rect, dr, ds):    # the part of rect whose D-neighbour is in the image
        r0, r1, c0, c1 = rect
        r0, r1, c0, c1 = max(r0, -dr), min(r1, H - dr), max(c0, -ds), min(c1, W - ds)
        return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None

    strips: dict[tuple, int] = {}
    uses: list[tuple[int, int]] = []
    for k, ((t, _), (dr, ds)) in enumerate(zip(pairs, lag_of)):
        r0, r1, c0, c1 = reads[t]
        if r0 >= r1 or c0 >= c1:
            continue                                  # a dead tap: its blocks are set to 0
        for rect in ((0, r0, 0, W), (r1, H, 0, W), (r0, r1, 0, c0), (r0, r1, c1, W)):
            rect = clip(rect, dr, ds)
            if rect is not None:
                uses.append((k, strips.setdefault((*rect, dr, ds), len(strips))))

    def both(t, dr, ds):      # R_t and the positions D away that are in the image
        r0, r1, c0, c1 = reads[t]
        return max(r0, -dr), min(r1, H - dr), max(c0, -ds), min(c1, W - ds)

    def rects(rs):            # clipped to the image, empty ones as (a, a, c, c)
        def cl(a, b, hi):
            a = min(max(a, 0), hi)
            return a, min(max(a, b), hi)
        return torch.tensor([(*cl(a, b, H), *cl(c, d, W)) for a, b, c, d in rs],
                            dtype=torch.long).reshape(-1, 4)

    long = dict(dtype=torch.long)
    return _LagPlan(
        mh, mw, wq, (H + mh) * wq, mh * wq + mw, lags,
        torch.tensor([t for t, _ in pairs], **long), torch.tensor([u for _, u in pairs], **long),
        torch.tensor([lags.index(d) for d in lag_of], **long),
        torch.tensor([reads[t][0] >= reads[t][1] or reads[t][2] >= reads[t][3]
                      for t, _ in pairs], dtype=torch.bool),
        tuple(strips), torch.tensor([k for k, _ in uses], **long),
        torch.tensor([s for _, s in uses], **long), rects(reads),
        rects([both(t, dr, ds) for (t, _), (dr, ds) in zip(pairs, lag_of)]),
        rects([both(u, -dr, -ds) for (_, u), (dr, ds) in zip(pairs, lag_of)]))


@functools.lru_cache(maxsize=256)
def _strip_positions(H: int, W: int, kh: int, kw: int, ph: int, pw: int, dh: int, dw: int,
                     n: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The flat-buffer columns of :func:`_lag_gram`'s strips for ``n`` samples: ``ia`` (the
    positions ``q`` of every strip, strip after strip), ``ib`` (``q + D``) and each strip's end
    in them."""
    pl = _lag_plan(H, W, kh, kw, ph, pw, dh, dw)
    first = torch.arange(n)[:, None, None] * pl.S + pl.G          # each sample's row 0
    ia, ib, ends = [], [], []
    for r0, r1, c0, c1, dr, ds in pl.strips:
        q = (first + torch.arange(r0, r1)[:, None] * pl.wq + torch.arange(c0, c1)).reshape(-1)
        ia.append(q)
        ib.append(q + (dr * pl.wq + ds))
        ends.append((ends[-1] if ends else 0) + q.numel())
    if not ia:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), ()
    return torch.cat(ia), torch.cat(ib), tuple(ends)


_SCRATCH = threading.local()


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` uninitialised elements of ``like``'s dtype, reused between calls on the CPU
    (per thread): fresh pages cost a page fault each (about 2 ms per 5 MB on the 2-core CPU, as
    much as a copy of the data), so :func:`_lag_gram`'s flat copy of the input keeps its buffer.
    It holds the largest block seen (at most ``_BLOCK`` floats plus the guards). Other devices
    allocate (their caching allocators reuse memory already)."""
    if like.device.type != "cpu":
        return like.new_empty(numel)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(like.dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[like.dtype] = like.new_empty(numel)
    return buf[:numel]


def _lag_pairs(x, weight, padding, dilation, centre: bool, dtype=torch.float64
               ) -> tuple[torch.Tensor, _LagPlan]:
    """The blocks ``(t, u >= t)`` of :func:`_im2col_gram` of a stride-1 conv, ``(pairs, C, C)``
    in ``dtype`` (pair ``k`` is taps ``(plan.tt[k], plan.uu[k])``), from lagged products.

    Tap ``t`` reads the input at ``q = p + o_t`` (``o_t = (i dh - ph, j dw - pw)``), so the Gram
    block of taps ``(t, u)`` is ``sum_{q in R_t} x_c(q) x_e(q + D)`` with ``D = o_u - o_t`` and
    ``R_t`` the input positions tap ``t`` reads (the output grid shifted by ``o_t``, clipped to
    the image; ``x`` is zero outside it). That is the lagged product over the whole image,
    ``Lam_D = sum_q x_c(q) x_e(q + D)`` (one GEMM per lag on two views of one zero-padded flat
    copy of the input: ``(2kh - 1)(2kw - 1) / 2`` GEMMs; 13 for 3x3 against the 45 blocks of
    the im2col Gram), minus the same sum over the image border strips that ``t`` does not read
    (small rectangles, clipped to where ``q + D`` is in the image, each computed once: 16 for a
    3x3 "same" conv). Data are shifted by a per-channel mean first (``centre``); the shift's
    exact contribution is added back from rectangle sums, so the result is the Gram of the
    unshifted rows, centred or not. The geometry (lags, strips, index tensors) is cached per
    input size and conv (:func:`_lag_plan`).

    The products are float32 GEMMs; several sample blocks are summed in float64. With one
    block and ``dtype`` float32 the blocks stay float32 throughout (the shift's correction is
    small next to them: the data are shifted by that block's mean), which spares two passes
    over ``pairs x C^2`` float64 values."""
    N, C, H, W = x.shape
    kh, kw = weight.shape[2:]
    pl = _lag_plan(H, W, kh, kw, *padding, *dilation)
    dev = x.device
    P = N * (H + 2 * padding[0] - pl.mh) * (W + 2 * padding[1] - pl.mw)
    step = _samples_per_block(N, C * pl.S)
    mu = x[:step].mean(dim=(0, 2, 3)) if centre else None
    V = None                          # (pairs, C, C) blocks of the shifted data
    X1 = torch.zeros(C, H, W, dtype=torch.float64, device=dev)       # shifted, summed over n
    strip_pair, strip_of = pl.strip_pair.to(dev), pl.strip_of.to(dev)
    for lam, strip_prods, sums in _lagged_products(x, (kh, kw), padding, dilation, mu):
        vb = lam[pl.lag_index.to(dev)]                                 # (pairs, C, C)
        vb.index_add_(0, strip_pair, strip_prods[strip_of], alpha=-1)
        if V is None:
            V = vb if dtype == torch.float32 and step >= N else vb.double()
        else:
            V.add_(vb)
        if centre:
            X1 += sums
    V[pl.dead.to(dev)] = 0
    if centre:
        V.baddbmm_(*(f.to(V.dtype) for f in _shift_factors(pl, X1, mu, N, P)))
    return V.to(dtype), pl


def _lagged_products(x, ks, padding, dilation, mu=None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per block of samples (:func:`_samples_per_block`): ``(lam, strips, sums)``, the lagged
    products ``(lags, C, C)`` and the strips' products ``(strips, C, C)`` of :func:`_lag_plan`,
    float32, of the data shifted by ``mu`` ``(C,)`` (None: unshifted), and the shifted block
    summed over its samples ``(C, H, W)`` float64 (None unshifted). The buffers are reused from
    one block to the next."""
    N, C, H, W = x.shape
    pl = _lag_plan(H, W, *ks, *padding, *dilation)
    dev = x.device
    mh, wq, S, G = pl.mh, pl.wq, pl.S, pl.G
    step = _samples_per_block(N, C * S)
    lam = x.new_empty(len(pl.lags), C, C)
    strip_prods = x.new_empty(len(pl.strips), C, C)
    for n0 in range(0, N, step):
        n = min(step, N - n0)
        F_ = _scratch(C * (G + n * S + G), x).view(C, G + n * S + G)   # margins zeroed below
        F_[:, :G] = 0
        F_[:, G + n * S:] = 0
        body = F_[:, G:G + n * S].view(C, n, H + mh, wq)
        img = body[:, :, :H, :W]
        img.copy_(x[n0:n0 + n].transpose(0, 1))     # two passes: faster than one strided sub
        body[:, :, H:] = 0
        body[:, :, :H, W:] = 0
        sums = None
        if mu is not None:
            img.sub_(mu.view(C, 1, 1, 1))
            sums = img.sum(dim=1).double()  # of shifted data: float32 partial sums suffice

        def shifted(dr: int, ds: int) -> torch.Tensor:
            d = dr * wq + ds
            return F_[:, G + d:G + d + n * S]

        a0 = shifted(0, 0)
        for i, d in enumerate(pl.lags):
            torch.mm(a0, shifted(*d).t(), out=lam[i])
        # every strip's positions and their D-neighbours in two gathers (one strided copy
        # per strip side cost twice as much), then one product per strip on column slices
        ia, ib, ends = _strip_positions(H, W, *ks, *padding, *dilation, n)
        if pl.strips:
            a_all, b_all = F_.index_select(1, ia.to(dev)), F_.index_select(1, ib.to(dev))
            for i, (s0, s1) in enumerate(zip((0,) + ends[:-1], ends)):
                torch.mm(a_all[:, s0:s1], b_all[:, s0:s1].t(), out=strip_prods[i])
        yield lam, strip_prods, sums


def _lag_summed(x, weight, w, padding, dilation) -> torch.Tensor:
    """:func:`_summed_pairs` on the lag route without the pair blocks: the block of pair
    ``(t, u)`` is ``Lam_D`` minus its strips (:func:`_lag_pairs`), so
    ``sum_{pairs} M_p o block_p = sum_D Lam_D o Ml_D - sum_s strip_s o Ms_s`` with ``Ml_D``
    the sum of the ``M_p`` of lag ``D`` and ``Ms_s`` of those strip ``s`` is subtracted from:
    13 + 16 products of ``C x C`` for a 3x3 "same" conv instead of 45 blocks gathered, corrected
    and multiplied. The diagonal pairs ``(t, t)`` are exactly those of lag 0, so the blocks
    ``u < t`` (the transposes of the products ``t < u``) follow from the lag-0 part alone.
    Uncentred; ``w`` ``(O, C T)`` float32 (the scale folded in)."""
    N, C, H, W = x.shape
    kh, kw = weight.shape[2:]
    O, T = w.shape[0], kh * kw
    pl = _lag_plan(H, W, kh, kw, *padding, *dilation)
    dev = x.device
    wt = w.view(O, C, T).permute(2, 0, 1).contiguous()                  # (T, O, C)
    ml = torch.zeros(len(pl.lags), C, C, dtype=torch.float32, device=dev)
    ms = torch.empty(len(pl.strips), C, C, dtype=torch.float32, device=dev)
    uses: dict[int, list[int]] = {}
    for k, s in zip(pl.strip_pair.tolist(), pl.strip_of.tolist()):
        uses.setdefault(k, []).append(s)
    buf = torch.empty(C, C, dtype=torch.float32, device=dev)
    first = set(range(len(pl.strips)))          # strips not yet written (each has a use)
    for k, (t, u, li, dead) in enumerate(zip(pl.tt.tolist(), pl.uu.tolist(),
                                             pl.lag_index.tolist(), pl.dead.tolist())):
        if dead:
            continue
        if k not in uses:
            ml[li].addmm_(wt[t].t(), wt[u])                             # += W_t^T W_u
            continue
        torch.mm(wt[t].t(), wt[u], out=buf)                             # M_p = W_t^T W_u
        ml[li] += buf
        for s in uses[k]:
            if s in first:
                ms[s].copy_(buf)
                first.discard(s)
            else:
                ms[s] += buf
    zero = pl.lags.index((0, 0))
    strip_zero = [i for i, st in enumerate(pl.strips) if st[4:] == (0, 0)]
    half = torch.zeros(C, C, dtype=torch.float64, device=dev)
    diag = torch.zeros(C, C, dtype=torch.float64, device=dev)
    # float32 sums of the 13 + 16 products: their rounding is far below the float32 GEMMs'
    # own (sums of P products); float64 from there on
    for lam, strip_prods, _ in _lagged_products(x, (kh, kw), padding, dilation):
        hl = lam.mul_(ml)
        hs = strip_prods.mul_(ms)
        half += hl.sum(dim=0) - hs.sum(dim=0)
        diag += hl[zero] - hs[strip_zero].sum(dim=0)
    return half + (half - diag).t()


def _shift_factors(pl: _LagPlan, X1, mu, N: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_lag_pairs`' correction of the shifted data's products, ``(pairs, C, 4)`` and
    ``(pairs, 4, C)`` factors: row ``(c, t)`` = shifted row + ``mu_c m_t`` (``m_t``: ``t`` reads
    the image), so ``blk_k += s1_k m^T + m s2_k^T + N area_k m m^T - sums_t sums_u^T / P``
    (``X1``: the shifted data summed over the samples, ``(C, H, W)`` float64)."""
    dev, C = X1.device, X1.shape[0]
    pre = F.pad(X1.cumsum(1).cumsum(2), (1, 0, 1, 0))          # 2-D prefix sums

    def totals(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(len, C) sums over the rectangles and their areas (empty ones: 0)."""
        r0, r1, c0, c1 = r.to(dev).unbind(1)
        s = pre[:, r1, c1] - pre[:, r0, c1] - pre[:, r1, c0] + pre[:, r0, c0]
        return s.t(), ((r1 - r0) * (c1 - c0)).double()

    m = mu.double()
    tt, uu = pl.tt.to(dev), pl.uu.to(dev)
    s1, area = totals(pl.both_t)
    s2, _ = totals(pl.both_u)
    row, n_read = totals(pl.reads)
    sums = row + N * n_read[:, None] * m                       # (T, C): the rows' sums
    mm_ = m.expand(len(pl.tt), C)
    left = torch.stack([s1, mm_, (N * area)[:, None] * m, sums[tt] / -P], 2)
    right = torch.stack([mm_, s2, mm_, sums[uu]], 1)
    return left, right


def _lag_gram(x, weight, padding, dilation, centre: bool, dtype=torch.float64) -> torch.Tensor:
    """``_im2col_gram`` of a stride-1 conv without the im2col matrix: the ``(T, T, C, C)`` tap
    blocks from :func:`_lag_pairs` (the blocks ``u < t`` their transposes). (Written straight
    into the ``(C, C, T, T)`` storage the ``output_grams`` op reads, the scattered writes took
    longer than this plus one permuted copy: 81 against 68 ms at VGG 256@8x8.)"""
    C, T = x.shape[1], weight.shape[2] * weight.shape[3]
    blk, pl = _lag_pairs(x, weight, padding, dilation, centre, dtype)
    tt, uu = pl.tt.to(x.device), pl.uu.to(x.device)
    g = torch.empty(T, T, C, C, dtype=dtype, device=x.device)      # g[t, u] = block (t, u)
    g[tt, uu] = blk
    g[uu, tt] = blk.transpose(1, 2)           # the lower blocks: the transposes
    diag = tt == uu                           # blocks (t, t): symmetric up to rounding
    g[tt[diag], tt[diag]] = _sym(blk[diag])
    return g


def _im2col_gram(x, weight, stride, padding, dilation, centre: bool, dtype=torch.float64
                 ) -> torch.Tensor:
    """The Gram of the im2col rows, centred or not, as ``(T, T, C, C)`` tap blocks (formed in
    float64, returned in ``dtype``):
    ``g[t, u, c, e] = sum_p x_c(p + o_t) x_e(p + o_u)`` (:func:`channel_major` gives the
    ``(C*T, C*T)`` matrix with rows ``c*T + t``).

    The rows are built tap-major and only the blocks ``(t, u >= t)`` are multiplied (one GEMM
    per tap ``t``: ``X_t [X_t; ...; X_{T-1}]^T``), about ``(T + 1) / 2T`` of the full product;
    the rest is the transpose."""
    C, _, T, P = _geometry(x, weight, stride, padding, dilation)
    lag = lag_shape(x, weight, stride, padding, dilation)
    if lag is not None and _gram_route(C, T, P, lag)[3]:
        return _lag_gram(x, weight, padding, dilation, centre, dtype)
    g = torch.zeros(T, C, T, C, dtype=torch.float64, device=x.device)
    sums = torch.zeros(T * C, dtype=torch.float64, device=x.device)
    for cols in _cols(x, weight, stride, padding, dilation, centre=centre, tap_major=True):
        for t in range(T):
            blk = torch.matmul(cols[t * C:(t + 1) * C], cols[t * C:].t())  # (C, (T-t) C)
            g[t, :, t:] += blk.view(C, T - t, C).double()
        sums += cols.sum(dim=1).double()
    for t in range(T):                       # the lower blocks from the upper ones
        for u in range(t):
            g[t, :, u] = g[u, :, t].t()
    if centre:
        mean = sums / P
        g -= P * (mean[:, None] * mean[None, :]).view(T, C, T, C)
    g = g.permute(0, 2, 1, 3)                # (t, u, c, e)
    return ((g + g.permute(1, 0, 3, 2)) / 2).to(dtype)


def channel_major(blocks: torch.Tensor) -> torch.Tensor:
    """``(C*T, C*T)`` (rows ``c*T + t``) from ``(T, T, C, C)`` tap blocks."""
    T, _, C, _ = blocks.shape
    return blocks.permute(2, 0, 3, 1).reshape(C * T, C * T)


def _contributions(x, weight, stride, padding, dilation, o0, o1, centre=False,
                   dtype=torch.float32) -> Iterator[torch.Tensor]:
    """``(Oc, C, n*L)`` blocks of ``z_c`` (in ``dtype``) for the output channels ``o0:o1``, by
    one batched matmul over the channels: ``z[c, o] = W[o, c, :] @ cols[c, :, :]``. ``centre``:
    from the shifted im2col rows (:func:`_cols`), so each ``z[c, o]`` is shifted by a constant,
    which centred moments do not see."""
    O, C = weight.shape[:2]
    oc = o1 - o0
    C, _, T, P = _geometry(x, weight, stride, padding, dilation)
    w = weight[o0:o1].reshape(oc, C, T).transpose(0, 1).to(dtype)  # (C, Oc, T)
    L = P // max(1, x.shape[0])
    step = _samples_per_block(x.shape[0], C * max(oc, T) * L)
    for cols in _cols(x, weight, stride, padding, dilation, step, centre=centre):
        z = torch.bmm(w, cols.view(C, T, -1).to(dtype))            # (C, Oc, n*L)
        yield z.transpose(0, 1).contiguous()


class _Moments:
    """Running sums of a block stream, shifted by the first block's mean (one pass, no
    cancellation): ``gram = sum (v - shift)(v - shift)^T``, ``sums = sum (v - shift)``, ``n``."""

    def __init__(self):
        self.gram = self.sums = self.shift = None
        self.n = 0

    def add(self, v: torch.Tensor, centred: bool) -> None:   # v: (..., R, n) float32
        """``centred``: shift the rows by the first block's row means (False: the caller has
        shifted them, or the raw sums are wanted)."""
        if centred:
            if self.shift is None:
                self.shift = v.mean(dim=-1, keepdim=True)
            v = v - self.shift
        g = torch.matmul(v, v.transpose(-1, -2)).double()
        s = v.sum(dim=-1).double()
        self.gram = g if self.gram is None else self.gram.add_(g)
        self.sums = s if self.sums is None else self.sums.add_(s)
        self.n += v.shape[-1]

    def centred_gram(self) -> torch.Tensor:
        mean = self.sums / self.n
        return self.gram - self.n * mean[..., :, None] * mean[..., None, :]


def _sym(g: torch.Tensor) -> torch.Tensor:
    return (g + g.transpose(-1, -2)) / 2


def per_output_grams(x, weight, stride, padding, dilation) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(o0, o1, Gc)`` per block of output channels: ``Gc`` ``(C, C, o1 - o0)``, output channel
    last and contiguous (float32 from the im2col Gram, float64 from the contributions), the
    centred Gram of the contributions for each output channel."""
    C, O, T, P = _geometry(x, weight, stride, padding, dilation)
    _, route, _, _ = _build_cost(C, O, T, P, per_output=True,
                                 lag=lag_shape(x, weight, stride, padding, dilation))
    # the sigma route holds (C, C, Oc) Grams (its contraction buffer is bounded on its own);
    # the z route also (C, Oc, positions) contributions
    ob = max(1, min(O, _BLOCK // max(1, C * C * (1 if route == "sigma" else T))))
    if route == "sigma":
        # float32 from here: the centred Gram has no large common part left to cancel
        blocks = _im2col_gram(x, weight, stride, padding, dilation, centre=True,
                              dtype=torch.float32)
        if x.device.type == "cpu":
            # the extension's op reads blocks[:, :, c, d] contiguous: one copy for all blocks
            blocks = blocks.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
            # the op streams every block once per 32 output channels it is given: whole
            # multiples of 32 per call (C = 512: 32 instead of 16, half the block traffic)
            ob = -(-ob // _OP_OUTPUTS) * _OP_OUTPUTS
            for o0 in range(0, O, ob):
                o1 = min(O, o0 + ob)
                yield o0, o1, torch.ops.aofp.output_grams(blocks, weight[o0:o1])
            return
        rhs = blocks.permute(3, 1, 0, 2).reshape(C, T, T * C)          # (d, u, (t, c))
        for o0 in range(0, O, ob):
            o1 = min(O, o0 + ob)
            g = _contract(rhs, weight[o0:o1].reshape(o1 - o0, C, T).float())
            yield o0, o1, g.permute(1, 2, 0).contiguous()
        return
    for o0 in range(0, O, ob):
        o1 = min(O, o0 + ob)
        m = _Moments()
        # float64: this route serves followers with few outputs (the cost model's choice
        # where O C^2 P < (C T)^2 P / 2), whose centred Grams can cancel to a few digits in
        # float32 (a nearly constant output channel: 1^T Gc 1 far below its terms)
        for z in _contributions(x, weight, stride, padding, dilation, o0, o1, centre=True,
                                dtype=torch.float64):
            m.add(z, centred=True)                                  # (Oc, C, n)
        yield o0, o1, _sym(m.centred_gram()).permute(1, 2, 0).contiguous()


def _contract(rhs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Gc[o, c, d] = sum_{t, u} W[o, c, t] Sigma[(c, t), (d, u)] W[o, d, u]`` (``(Oc, C, C)``
    float32, contiguous; ``Gc_o`` is symmetric, so it is written as ``Gc[o, d, c]``) from
    ``rhs[d, u, (t, c)]``: per input channel ``d`` one matmul contracting ``u``
    (``(Oc, T) @ (T, T C)``), then the sum over ``t`` weighted by ``W[o, c, t]`` (``t`` an outer
    dim: the sum runs over contiguous rows). A few ``d`` at a time, in one reused buffer of at
    most ``2^17`` floats: larger fresh temporaries cost more in page faults than in arithmetic."""
    C, T, _ = rhs.shape
    oc = w.shape[0]
    wd, wt = w.permute(1, 0, 2), w.transpose(1, 2)         # (d, o, u), (o, t, c)
    dc = max(1, min(C, (1 << 17) // max(1, oc * C * T)))
    out = w.new_empty(oc, C, C)                             # (o, d, c)
    h = w.new_empty(dc, oc, T * C)
    for d0 in range(0, C, dc):
        d1 = min(C, d0 + dc)
        hh = torch.bmm(wd[d0:d1], rhs[d0:d1], out=h[:d1 - d0]).view(d1 - d0, oc, T, C)
        torch.sum(hh.mul_(wt), 2, out=out.transpose(0, 1)[d0:d1])
    return out


def output_summed_gram(x, weight, stride, padding, dilation, scale=None) -> torch.Tensor:
    """``(C, C)`` float64: ``G = sum_o scale_o^2 Z_o Z_o^T`` (uncentred), the damage quadratic
    form at a linear follower output."""
    C, O, T, P = _geometry(x, weight, stride, padding, dilation)
    _, route, _, _ = _build_cost(C, O, T, P, per_output=False,
                                 lag=lag_shape(x, weight, stride, padding, dilation))
    w = weight.reshape(O, C * T).float()
    if scale is not None:
        w = w * scale.float()[:, None]
    if route == "sigma":
        return _sym(_summed_pairs(x, weight, w, stride, padding, dilation))
    g = torch.zeros(C, C, dtype=torch.float64, device=x.device)
    ob = max(1, min(O, _BLOCK // max(1, C * P)))
    sc = None if scale is None else scale.float()
    for o0 in range(0, O, ob):
        o1 = min(O, o0 + ob)
        for z in _contributions(x, weight, stride, padding, dilation, o0, o1):
            if sc is not None:
                z = z * sc[o0:o1, None, None]
            g += torch.matmul(z, z.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
    return _sym(g)


def _summed_pairs(x, weight, w, stride, padding, dilation) -> torch.Tensor:
    """``G = sum_{t, u} M_tu o Sigma_tu`` ``(C, C)`` float64 from the im2col Gram's blocks
    ``u >= t`` alone (``M_tu = W_t^T W_u``, ``W_t = w[:, :, t]`` ``(O, C)``, scale folded in):
    the blocks ``u < t`` contribute the transposes of the products ``t < u``. One ``C x O x C``
    GEMM per pair (``T (T + 1) / 2`` of them, not the ``(C T)^2 O`` of all of ``W^T W``), their
    sums in float64; on the lag route by :func:`_lag_summed`."""
    C, O, T, P = _geometry(x, weight, stride, padding, dilation)
    lag = lag_shape(x, weight, stride, padding, dilation)
    if lag is not None and _gram_route(C, T, P, lag)[3]:
        return _lag_summed(x, weight, w, padding, dilation)
    blocks = _im2col_gram(x, weight, stride, padding, dilation, centre=False)
    tt, uu = zip(*[(t, u) for t in range(T) for u in range(t, T)])
    blk = blocks[list(tt), list(uu)]                                     # (pairs, C, C)
    wt = w.view(O, C, T).permute(2, 0, 1).contiguous()                  # (T, O, C)
    m = torch.empty(len(tt), C, C, dtype=torch.float32, device=x.device)
    for k, (t, u) in enumerate(zip(tt, uu)):
        torch.mm(wt[t].t(), wt[u], out=m[k])
    prod = blk * m
    # index lists, not a boolean mask (its nonzero has no static shape for fake tensors)
    diag = [k for k, (t, u) in enumerate(zip(tt, uu)) if t == u]
    off = [k for k, (t, u) in enumerate(zip(tt, uu)) if t != u]
    off_sum = prod[off].sum(dim=0, dtype=torch.float64)
    return prod[diag].sum(dim=0, dtype=torch.float64) + off_sum + off_sum.t()


# --------------------------------------------------------------------------------------------
# The damage of K masks from the moments
# --------------------------------------------------------------------------------------------


def _mask_block(K: int, O: int, C: int) -> int:
    """Masks per block where a ``(k, O, C)`` product is formed (the forms by a GEMM): it stays
    within ``_BLOCK`` floats."""
    return max(1, min(K, _BLOCK // max(1, O * C + O)))


def _form_block(K: int, O: int, C: int) -> int:
    """Masks per block of the forms' callers, whose temporaries are ``(k, C)`` and ``(k, O)``
    (the forms bound their own products: :func:`_in_blocks`). On the CPU the forms op then
    takes every mask of a block of outputs at once: it packs each output tile's Gram rows once
    per call, so fewer, larger calls pay that less often."""
    return max(1, min(K, _BLOCK // max(1, 4 * (O + C))))


def _in_blocks(fn, s: torch.Tensor, O: int) -> torch.Tensor:
    """``fn(s)`` over blocks of rows of ``s`` of :func:`_mask_block` masks each."""
    K, C = s.shape
    kb = _mask_block(K, O, C)
    if K <= kb:
        return fn(s)
    return torch.cat([fn(s[k0:k0 + kb]) for k0 in range(0, K, kb)])


def _per_output_forms(x, weight, stride, padding, dilation):
    """``(o0, o1, g1, form_of)`` per block of output channels: ``g1 = Gc_o 1`` ``(Oc, C)``
    float64 and ``form_of(s)``, ``s^T Gc_o s`` for 0/1 rows ``s`` ``(k, C)`` float32, as a
    ``(k, Oc)`` float64 (float32 BLAS sums of C, then C more terms: ~1e-6 relative).

    A 1x1 (or Linear) follower on the im2col route never forms the per-output Grams:
    ``Gc_o = diag(W_o) Sigma diag(W_o)``, so ``s^T Gc_o s = v^T Sigma v`` with ``v = s o W_o``,
    one GEMM over every ``(k, o)`` (the same multiply-adds as the Grams' forms, without their
    ``O C^2`` floats, whose fresh pages cost more than the arithmetic); otherwise from
    :func:`per_output_grams`, ``(s Gc_o) . s`` by one batched matmul over ``o``."""
    C, O, T, P = _geometry(x, weight, stride, padding, dilation)
    route = _build_cost(C, O, T, P, per_output=True,
                        lag=lag_shape(x, weight, stride, padding, dilation))[1]
    if T == 1 and route == "sigma":
        sig64 = _im2col_gram(x, weight, stride, padding, dilation, centre=True)[0, 0]
        w64 = weight.reshape(O, C).double()
        # float64: S = 1^T g1 = P var_y may be far smaller than the terms it sums
        g1 = (w64 @ sig64) * w64                                        # W_o o (Sigma W_o)
        sig, w = sig64.float(), w64.float()                             # (C, C), (O, C)
        ob = max(1, min(O, _BLOCK // max(1, C * C)))
        for o0 in range(0, O, ob):
            o1 = min(O, o0 + ob)

            def form_of(s, wo=w[o0:o1]):
                def forms(sb):
                    v = sb[:, None, :] * wo[None]                       # (k, Oc, C)
                    return (torch.matmul(v, sig) * v).sum(dim=2).double()
                return _in_blocks(forms, s, wo.shape[0])
            yield o0, o1, g1[o0:o1], form_of
        return
    for o0, o1, g in per_output_grams(x, weight, stride, padding, dilation):  # (C, C, Oc)
        g32 = g.float()
        yield o0, o1, g.sum(dim=1).double().t(), lambda s, g32=g32: gram_forms_of(g32, s)


def gram_forms_of(g32: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s_k^T g32[:, :, o] s_k`` ``(k, Oc)`` float64 for 0/1 rows ``s`` ``(k, C)`` and per-output
    Grams ``g32`` ``(C, C, Oc)`` float32: on the CPU the extension's op (``|s|^2 / 2`` adds per
    (mask, output) instead of ``C^2`` multiply-adds); elsewhere :func:`forms_by_gemm`."""
    if g32.device.type == "cpu":
        return torch.ops.aofp.gram_forms(g32, s.bool())
    return forms_by_gemm(g32, s)


def forms_by_gemm(g32: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """:func:`gram_forms_of` by one GEMM over every output channel of the block, then the dot
    with ``s`` over the second channel, in blocks of masks that bound the ``(k, C, Oc)``
    product."""
    C = g32.shape[0]

    def forms(sb):
        sb = sb.float()
        r = torch.mm(sb, g32.reshape(C, -1)).view(sb.shape[0], C, g32.shape[2])   # (k, d, Oc)
        return torch.bmm(sb.unsqueeze(1), r).squeeze(1).double()
    return _in_blocks(forms, s, g32.shape[2])


class _BatchForms(NamedTuple):
    """The second moments of a block of masks ``[k0, k1)`` and output channels ``[o0, o1)``,
    each ``(k, Oc)`` float64 (``S``: ``(Oc,)``): ``S = |u|^2 = P var_y``, ``A = |v|^2`` (the
    kept part, centred: ``P var_k``), ``B = |e|^2`` (the removed part), ``XB = <u, e>``,
    ``UV = <u, v>``."""
    o0: int
    o1: int
    k0: int
    k1: int
    S: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    XB: torch.Tensor
    UV: torch.Tensor


def _batch_forms(x, weight, masks, stride, padding, dilation) -> Iterator[_BatchForms]:
    """With ``e_k`` the centred removed part and ``v_k = u - e_k`` the centred kept part of the
    output (``u`` = centred unmasked output), ``B = |e|^2 = r^T Gc r``, ``<u, e> = r . (Gc 1)``,
    ``A = |v|^2 = S - 2 <u, e> + B``, ``<u, v> = S - <u, e>``, ``S = 1^T Gc 1``. Each form is
    taken over the smaller of the removed and kept sets and the other follows from S, unless
    that subtraction cancels (then both are taken directly). ``A`` is 0 for a mask that removes
    every channel."""
    C = x.shape[1]
    K = masks.shape[0]
    keep = masks.to(device=x.device, dtype=torch.bool)
    removed = ~keep
    n_removed = removed.sum(dim=1)
    small_is_removed = n_removed * 2 <= C               # take the form over the smaller set
    sel = torch.where(small_is_removed[:, None], removed, keep).double()   # (K, C)
    all_drop = n_removed == C
    for o0, o1, g1, form_of in _per_output_forms(x, weight, stride, padding, dilation):
        S = g1.sum(dim=1)                                    # (Oc,)   = P var_y
        kb = _form_block(K, o1 - o0, C)
        for k0 in range(0, K, kb):
            k1 = min(K, k0 + kb)
            s = sel[k0:k1]                                    # (k, C)
            form = form_of(s.float())                         # (k, Oc) = s^T Gc_o s
            lin = s @ g1.t()                                  # (k, Oc) = s . Gc 1
            lin_o = (1 - s) @ g1.t()                          # the same over the other set
            other = S - 2 * lin + form                        # the other set's form
            # where that subtraction cancelled (the other set carries almost none of the
            # variance), its form is taken directly, for those masks only
            risky = (other < 1e-3 * (S + 2 * lin.abs() + form)).any(dim=1).nonzero()[:, 0]
            if risky.numel():
                other[risky] = form_of((1 - s[risky]).float())
            small = small_is_removed[k0:k1, None]
            A = torch.where(small, other, form)
            A = torch.where(all_drop[k0:k1, None], torch.zeros_like(A), A.clamp_min(0.0))
            yield _BatchForms(o0, o1, k0, k1, S, A, torch.where(small, form, other),
                              torch.where(small, lin, lin_o), torch.where(small, lin_o, lin))


def batch_damage(x, weight, masks, stride, padding, dilation, scale, eps, forms=None
                 ) -> torch.Tensor:
    """``(K,)`` float64 damage of ``BN_batch(y_k) - BN_batch(y)`` (post none), summed over o.

    From :func:`_batch_forms`: the masked output has variance ``A / P``, so with
    ``a = g / sqrt(var_y + eps)``, ``a_k = g / sqrt(A/P + eps)`` the damage is
    ``|a_k v - a u|^2``, expanded as the fused kernel does: in ``S, <u, e>, B`` near the
    unmasked output (``|a_k| <= 2 |a|``), in ``A, <u, v>, S`` far from it; ``a_k - a`` is formed
    from ``var_y - var_k`` directly. ``forms``: the same blocks from elsewhere (the varying
    channels' moments, :func:`aofp_ext._varying.batch_forms`).
    """
    P = _geometry(x, weight, stride, padding, dilation)[3]
    gamma = scale.double().to(x.device)
    out = torch.zeros(masks.shape[0], dtype=torch.float64, device=x.device)
    if forms is None:
        forms = _batch_forms(x, weight, masks, stride, padding, dilation)
    for o0, o1, k0, k1, S, A, B, XB, UV in forms:
        var_y = S / P
        a = gamma[o0:o1] / torch.sqrt(var_y + eps)
        var_k = A / P
        sk, s0 = torch.sqrt(var_k + eps), torch.sqrt(var_y + eps)
        diff = (2 * XB - B) / P                               # var_y - var_k
        da = gamma[o0:o1] * diff / (sk * s0 * (sk + s0))      # a_k - a
        ak = a + da
        # the fused kernel's two expansions of |a_k v - a u|^2, each without cancellation in
        # its regime: near the unmasked output (|a_k| <= 2 |a|) in |u|^2, <u, e>, |e|^2; far
        # from it in |v|^2, <u, v>, |u|^2
        near = ak.abs() <= 2 * a.abs()
        d = torch.where(near, da * da * S - 2 * ak * da * XB + ak * ak * B,
                        ak * ak * A - 2 * a * ak * UV + a * a * S)
        # v = 0 (every channel removed): BN outputs its shift, the damage is a^2 |u|^2
        d = torch.where(A == 0, a * a * B, d)
        out[k0:k1] += d.sum(dim=1)
    return out


def _output_means(x, weight, stride, padding, dilation) -> torch.Tensor:
    """``(O, C)`` float64: the mean over the output positions of each contribution ``z_c`` at
    each output channel (the column sums of one image's im2col of the batch-summed input)."""
    C, O, T, P = _geometry(x, weight, stride, padding, dilation)
    if x.dim() == 2:
        return weight.double() * x.double().sum(dim=0) / P
    cols = F.unfold(x.double().sum(dim=0, keepdim=True), weight.shape[2:], dilation=dilation,
                    padding=padding, stride=stride)                     # (1, C T, L)
    colsum = cols.sum(dim=2).view(C, T)
    return (weight.double().reshape(O, C, T) * colsum).sum(dim=2) / P


def batch_relu_affine(x, weight, masks, bias, stride, padding, dilation, scale, shift, eps,
                      forms=None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm on the batch statistics of every masked output, as the per-mask affine of
    ``ops.masked_relu_damage``: ``(mask_scale, mask_shift)`` ``(K, O)``, ``centre`` and the
    unmasked output's scale ``(O,)``, float64.

    With ``centre = mean(y)`` and ``d_k`` the removed part, ``y_k - mean(y_k) = (y - centre) -
    d_k + mean(d_k)``, so BN's output is ``a_k (y_k - centre) + a_k mean(d_k) + shift`` with
    ``a_k = scale / sqrt(var_k + eps)``: ``var_k = A / P`` from :func:`_batch_forms`, ``mean(d_k)
    = r_k . mu_o`` from the contributions' means. A mask that removes every channel leaves the
    bias alone, of variance exactly 0: BN outputs ``shift`` (``a_k = 0``). ``forms``: as for
    :func:`batch_damage`."""
    C, O, T, P = _geometry(x, weight, stride, padding, dilation)
    K = masks.shape[0]
    gamma, beta = scale.double().to(x.device), shift.double().to(x.device)
    mu = _output_means(x, weight, stride, padding, dilation)            # (O, C)
    removed = (~masks.to(device=x.device, dtype=torch.bool)).double()
    mean_d = removed @ mu.t()                                           # (K, O)
    all_drop = removed.sum(dim=1) == C
    mask_scale = torch.empty(K, O, dtype=torch.float64, device=x.device)
    base_scale = torch.empty(O, dtype=torch.float64, device=x.device)
    if forms is None:
        forms = _batch_forms(x, weight, masks, stride, padding, dilation)
    for o0, o1, k0, k1, S, A, *_ in forms:
        base_scale[o0:o1] = gamma[o0:o1] / torch.sqrt(S / P + eps)
        mask_scale[k0:k1, o0:o1] = gamma[o0:o1] / torch.sqrt(A / P + eps)
    mask_scale[all_drop] = 0.0
    mask_shift = mask_scale * mean_d + beta
    centre = mu.sum(dim=1)
    if bias is not None:
        centre = centre + bias.double().to(x.device)
    return mask_scale, mask_shift, centre, base_scale


def linear_damage(x, weight, masks, stride, padding, dilation, scale) -> torch.Tensor:
    """``(K,)`` float64: ``r^T G r`` (norm none/affine, post none)."""
    g = output_summed_gram(x, weight, stride, padding, dilation, scale)
    r = (~masks.to(device=x.device, dtype=torch.bool)).double()
    return ((r @ g) * r).sum(dim=1)
