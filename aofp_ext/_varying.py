"""The moments path on the channels the masks vary only (``norm="batch"``), in torch ops.

A search step's masks differ only on part of each layer (its search space): every other channel
is kept by every mask (``kept``) or removed by every mask (``gone``). Under batch-statistics BN
the damage of a mask depends on it only through the centred Gram of the channel contributions
``z_c`` (:mod:`aofp_ext._moments`), and its removed part is ``e_k = z_gone + sum_{v in R_k} z_v``
(``R_k``: the varying channels it removes), so per mask only these moments are needed, all
centred over the positions, per output channel ``o``:

- ``Gc[v, w]`` for varying ``v, w``: the per-output Grams of ``x[:, varying]``
  (:func:`aofp_ext._moments.per_output_grams` on ``Cv`` channels: ``(Cv / C)^2`` of the full
  build);
- ``g1[c] = <z_c, y>`` for the varying channels and the gone channels' sum, with ``y`` the
  unmasked output: one weight gradient of the conv (``torch.nn.grad.conv2d_weight``, the
  correlation of the input with a per-output signal; ``Cv / C`` of a follower forward) with
  the centred output as the signal, then the sum over the taps weighted by ``W``;
- ``S = |y|^2``; with gone channels that are not zero in ``x``: their summed contribution
  ``z_gone`` (a conv over them), its products with the varying channels (another weight
  gradient) and with ``y``.

``y`` is the follower's output, given (``output``: the training forward computed it) or
computed here (one forward). Per mask the forms are taken over the removed part (``B = |e|^2``,
``X = <y, e>``, both from the moments directly) and the kept part's ``A = |y - e|^2 = S - 2X +
B``; where that subtraction would cancel (some output keeps under ``_RISKY`` of the scale of its
terms), the kept-by-all channels' sum ``z_kept`` is formed once per call and those masks' kept
forms are taken directly. A mask that removes every channel has ``A = 0``, as on the full path.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from . import _moments
from ._moments import _BatchForms

#: A mask's kept variance below this share of ``S + 2|X| + B`` is taken directly, not as the
#: difference ``S - 2X + B``: the terms come from different float32 products (the output, the
#: weight gradient, the Grams), each good to about 1e-6 of its size, so the difference keeps
#: about 2e-5 relative there
_RISKY = 0.05

# Cost model of this path (seconds, 1 thread, on top of the full path's model for the Grams of
# the Cv varying channels): a fixed cost per call, the multiply-adds of the convs and weight
# gradients (torch's oneDNN convolutions), and the passes over the output (O P floats: centring,
# |y|^2). Measured 2026-12-03 on the Intel machine (bench/results/cost-model.md).
_VARYING_S = dict(call=4.4e-4, conv=1.7e-11, out=3.5e-9)


def partition(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(varying, gone, kept)`` channel indices: removed by some but not all masks, by every
    mask, by none."""
    removed = (~masks).sum(dim=0)
    K = masks.shape[0]
    return (((removed > 0) & (removed < K)).nonzero()[:, 0], (removed == K).nonzero()[:, 0],
            (removed == 0).nonzero()[:, 0])


def _live(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The channels of ``idx`` that are not exactly 0 everywhere in ``x`` or whose weights are
    not all finite (a NaN in ``x`` is not 0: it stays); the others contribute exactly nothing
    to any output (a base-masked input channel)."""
    if idx.numel() == 0:
        return idx
    nz = (x.index_select(1, idx) != 0).transpose(0, 1).reshape(idx.numel(), -1).any(dim=1)
    bad = ~torch.isfinite(weight.index_select(1, idx)).transpose(0, 1).reshape(
        idx.numel(), -1).all(dim=1)
    return idx[nz | bad]


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, t.dim()))


def _centred(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` minus its mean per channel (dim 1; float32) and ``|y - mean|^2`` per channel
    (float64): float32 sums per sample and channel (a few thousand terms), then float64 over
    the samples, without a float64 copy of ``y``."""
    n, c = y.shape[:2]
    v = y.reshape(n, c, -1)
    mean = v.sum(dim=2).double().sum(dim=0) / (n * v.shape[2])
    yc = y - mean.float().view((1, -1) + (1,) * (y.dim() - 2))
    sq = torch.linalg.vector_norm(yc.reshape(n, c, -1), dim=2).double().square().sum(dim=0)
    if y.dim() == 4:
        # channels-last: oneDNN's weight gradient runs 2-4x faster on it (ResNet-56 shapes)
        yc = yc.contiguous(memory_format=torch.channels_last)
    return yc, sq


def _shifted(x: torch.Tensor, idx: torch.Tensor, padding) -> torch.Tensor:
    """``x[:, idx]`` minus each channel's mean, a conv input zero-padded by ``padding`` where the
    padding holds minus that mean too: every contribution of the result differs from the true
    one by a constant, which centred moments do not see, and no large common offset enters a
    product."""
    xs = x.index_select(1, idx)
    if x.dim() == 2:
        return xs - xs.mean(dim=0)
    mu = xs.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    n, c, h, w = xs.shape
    ph, pw = padding
    xp = (-mu).expand(n, c, h + 2 * ph, w + 2 * pw).contiguous(memory_format=torch.channels_last)
    xp[:, :, ph:ph + h, pw:pw + w] = xs - mu
    return xp


class _Moments:
    """The moments of one call over the reduced channels (the varying ones, then the gone
    channels' sum if any; ``n`` of them): ``g1`` ``(O, n)`` float64 and ``S`` ``(O,)`` float64
    for every output, the Grams ``(n, n, Oc)`` float32 per block of outputs (:meth:`blocks`,
    streamed from :func:`aofp_ext._moments.per_output_grams`: never all ``n^2 O`` at once),
    and on demand (:meth:`with_kept`) the kept channels' sum appended."""

    def __init__(self, x, weight, masks, stride, padding, dilation, output):
        self.x, self.weight, self.geo = x, weight, (stride, padding, dilation)
        self.varying, gone, self.kept = partition(masks)
        self.gone = _live(x, weight, gone)
        y = output if output is not None else self._conv(x, weight, padding)
        self.yc, self.S = _centred(y)
        V = self.varying
        self.xv, self.wv = xv, wv = self._inputs(V)
        self.n = V.numel() + (self.gone.numel() > 0)
        g1 = [self._cross(xv, wv, self.yc)]                        # (O, Cv)
        self.zg = self.gone_col = None
        if self.gone.numel():
            self.zg, self.zz = _centred(self._conv(*self._inputs(self.gone), 0))
            self.gone_col = self._cross(xv, wv, self.zg).float()   # (O, Cv)
            g1.append(self._dot(self.zg, self.yc)[:, None])
        self.g1 = torch.cat(g1, dim=1)
        self._kept = None

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(o0, o1, gram)``: the Gram ``(n, n, o1 - o0)`` float32 of a block of outputs."""
        V, Cv, n = self.varying, self.varying.numel(), self.n
        for o0, o1, g in _moments.per_output_grams(self.x.index_select(1, V), self.wv,
                                                   *self.geo):
            if n == Cv:
                yield o0, o1, g.float()
            else:
                yield o0, o1, _bordered(g, self.gone_col[o0:o1], self.zz[o0:o1])

    def _inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _shifted(self.x, idx, self.geo[1]), self.weight.index_select(1, idx)

    def _conv(self, x, w, padding):
        if x.dim() == 2:
            return x @ w.t()
        return F.conv2d(x, w, None, self.geo[0], padding, self.geo[2])

    def _cross(self, xs, w, sig) -> torch.Tensor:
        """``(O, Cs)`` float64: ``<z_c, sig_o>`` for the shifted inputs ``xs`` (padding
        included) and a centred per-output signal ``sig``."""
        if xs.dim() == 2:
            return (sig.t() @ xs).double() * w.double()
        gw = torch.nn.grad.conv2d_weight(xs, w.shape, sig, stride=self.geo[0], padding=0,
                                         dilation=self.geo[2])
        return (gw * w).sum(dim=(2, 3), dtype=torch.float64)

    @staticmethod
    def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(dim=_dims(a), dtype=torch.float64)

    def with_kept(self) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
        """The kept channels' sum, formed once: ``((cross, kk), g1)``, its products with the
        reduced channels ``cross`` ``(O, n)`` float32 and with itself ``kk`` ``(O,)`` float32
        (None instead of the pair when no kept channel is live), and ``g1`` with its column
        appended ``(O, n + 1)`` (``(O, n)`` then)."""
        if self._kept is None:
            col, g1 = None, self.g1
            kept = _live(self.x, self.weight, self.kept)
            if kept.numel():
                zk, kk = _centred(self._conv(*self._inputs(kept), 0))
                cross = [self._cross(self.xv, self.wv, zk)]
                if self.zg is not None:
                    cross.append(self._dot(self.zg, zk)[:, None])
                col = (torch.cat(cross, dim=1).float(), kk.float())
                g1 = torch.cat([g1, self._dot(zk, self.yc)[:, None]], dim=1)
            self._kept = col, g1
        return self._kept

    def kept_gram(self, o0: int, o1: int, gram: torch.Tensor) -> torch.Tensor:
        """A block's Gram with the kept channels' sum appended ``(n + 1, n + 1, Oc)`` (or as it
        is, when no kept channel is live)."""
        col = self.with_kept()[0]
        if col is None:
            return gram
        cross, kk = col
        return _bordered(gram, cross[o0:o1], kk[o0:o1])


def _bordered(gram: torch.Tensor, col: torch.Tensor, corner: torch.Tensor) -> torch.Tensor:
    """``(n + 1, n + 1, Oc)`` float32: the Grams ``gram`` ``(n, n, Oc)`` with one more channel,
    its products with the others ``col`` ``(Oc, n)`` and with itself ``corner`` ``(Oc,)``."""
    n = gram.shape[0]
    out = torch.empty(n + 1, n + 1, gram.shape[2], dtype=torch.float32, device=gram.device)
    out[:n, :n] = gram
    out[:n, n] = out[n, :n] = col.t()
    out[n, n] = corner
    return out


def batch_forms(x, weight, masks, stride, padding, dilation, output=None
                ) -> Iterator[_BatchForms]:
    """:func:`aofp_ext._moments._batch_forms` from the varying channels' moments (module
    docstring): the same ``(S, A, B, XB, UV)`` per block of masks and output channels."""
    masks = masks.to(device=x.device, dtype=torch.bool)
    m = _Moments(x, weight, masks, stride, padding, dilation, output)
    K = masks.shape[0]
    Cv, n = m.varying.numel(), m.n
    removed = torch.ones(K, n, dtype=torch.bool, device=x.device)
    removed[:, :Cv] = ~masks.index_select(1, m.varying)
    all_drop = ~masks.any(dim=1)
    for o0, o1, g in m.blocks():
        g1, S = m.g1[o0:o1].t(), m.S[o0:o1]
        kb = _moments._form_block(K, o1 - o0, n)
        gk = None                  # the block's Gram with the kept column, formed at most once
        for k0 in range(0, K, kb):
            k1 = min(K, k0 + kb)
            r = removed[k0:k1]
            B = _moments.gram_forms_of(g, r)                       # (k, Oc) = |e|^2
            X = r.double() @ g1                                     # <y, e>
            A, UV = S - 2 * X + B, S - X
            risky = ((A < _RISKY * (S + 2 * X.abs() + B)).any(dim=1)
                     & ~all_drop[k0:k1]).nonzero()[:, 0]
            if risky.numel():
                if gk is None:
                    gk = m.kept_gram(o0, o1, g)
                g1k = m.with_kept()[1]
                keep = torch.zeros(risky.numel(), gk.shape[0], dtype=torch.bool,
                                   device=x.device)
                keep[:, :Cv] = masks[k0:k1].index_select(1, m.varying)[risky]
                keep[:, n:] = True
                A[risky] = _moments.gram_forms_of(gk, keep)
                UV[risky] = keep.double() @ g1k[o0:o1].t()
            A = torch.where(all_drop[k0:k1, None], torch.zeros_like(A), A.clamp_min(0.0))
            yield _BatchForms(o0, o1, k0, k1, S, A, B, X, UV)


def terms(C: int, O: int, T: int, P: int, Cv: int, gone: int, output: bool,
          threads: int | None = None) -> dict[str, float]:
    """The work of this path beyond the Grams of the varying channels, one entry per
    coefficient of ``_VARYING_S``: the weight gradient over the varying channels, the conv and
    weight gradient of the gone channels, the forward when ``output`` is not given."""
    n = _moments._threads(threads)
    macs = O * T * P * (Cv + (gone + Cv if gone else 0) + (0 if output else C))
    return dict(call=1.0, conv=macs / n, out=O * P / n)


def cost(C: int, O: int, T: int, P: int, K: int, Cv: int, gone: int, output: bool,
         threads: int | None = None, lag=None) -> float:
    """Predicted seconds: the full moments path's model on ``Cv`` channels plus :func:`terms`."""
    extra = sum(_VARYING_S[k] * v for k, v in terms(C, O, T, P, Cv, gone, output,
                                                     threads).items())
    return _moments.moments_cost(Cv + (gone > 0), O, T, P, K, True, threads, lag, held=True) + extra


#: Tests and benchmarks: None (default) lets the cost model choose this path; True takes it
#: wherever it applies (norm="batch", CPU masks, some channel varying); False never.
FORCE: bool | None = None


def choose(C: int, O: int, T: int, P: int, K: int, batch: bool, forced: bool,
           threads: int | None = None, lag=None, relu: bool = False, varying: int = 0,
           gone: int = 0, output: bool = False, used: int | None = None) -> str:
    """``"fused"``, ``"moments"`` or ``"varying"``: the path the cost models predict to be
    fastest (``forced``: one of the two moments paths). ``varying``: the channels some but not
    all masks remove; ``gone``: those every mask removes that are not all 0 in ``x``;
    ``output``: whether the follower's output is given. ``relu``: as for
    :func:`aofp_ext._moments.choose` (the moments give the BN statistics, one fused pass the
    damage). ``used``: the channels the fused mask pass forms
    (:func:`aofp_ext._moments.fused_terms`)."""
    if not batch or not varying or FORCE is False:
        if forced:
            return "moments"
        return _moments.choose(C, O, T, P, K, batch, threads, lag, relu, varying, used,
                               output and (batch or relu))
    if FORCE:
        return "varying"
    fused = _moments.fused_cost(C, O, T, P, K, threads, varying, used, output)
    after = fused if relu else 0.0        # the ReLU pass after the moments' statistics
    opts = {"fused": fused + after,
            "moments": _moments.moments_cost(C, O, T, P, K, True, threads, lag) + after,
            "varying": cost(C, O, T, P, K, varying, gone, output, threads, lag) + after}
    if forced:
        del opts["fused"]
    return min(opts, key=opts.get)
