"""The CPU ops against their pure-PyTorch references (float64), on fresh random inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aofp_ext import _moments, _varying, ops

from _cases import assert_damage_close, conv_fits, conv_sweep, rand_case

NORM_POST = list(itertools.product(["none", "affine", "batch"], ["none", "relu"]))


# ------------------------------------------------------------------------------------------
# masked_damage
# ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**conv_sweep(), mode=st.sampled_from(NORM_POST), search=st.booleans())
def test_masked_damage_sweep(N, C, O, H, W, k, stride, padding, dilation, K, mode, bias, seed,
                             search):
    norm, post = mode
    gen = torch.Generator().manual_seed(seed)
    if not conv_fits(H, W, k, padding, dilation):
        return  # the conv itself is undefined here; the error path is tested separately
    x, w, masks, kw = rand_case(gen, N=N, C=C, O=O, H=H, W=W, k=k, K=K, bias=bias, norm=norm)
    if search:                 # gone (some all 0 in x), kept and varying channels
        masks = _roles(gen, x, K)
    args = dict(stride=stride, padding=padding, dilation=dilation, norm=norm, post=post, **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    assert_damage_close(ops.masked_damage(x, w, masks, **args), ref)
    assert_damage_close(ops.masked_damage(x, w, masks, method="fused", **args), ref)
    # with the follower's output the pass reads y and skips the channels every mask keeps
    out = _with_output(x, w, args)
    assert_damage_close(ops.masked_damage(x, w, masks, output=out, **args), ref)
    assert_damage_close(ops.masked_damage(x, w, masks, method="fused", output=out, **args), ref)


@pytest.mark.parametrize("norm,post", NORM_POST)
@pytest.mark.parametrize(
    "shape",
    [
        dict(N=4, C=16, O=16, H=8, k=3),     # ResNet-like
        dict(N=2, C=33, O=17, H=6, k=3),     # odd widths, > 1 subset group
        dict(N=1, C=5, O=3, H=7, k=5),       # N = 1
        dict(N=3, C=70, O=9, H=4, k=1),      # many channels, 1x1
    ],
)
def test_masked_damage_shapes(shape, norm, post):
    gen = torch.Generator().manual_seed(hash((tuple(shape.items()), norm, post)) % 2**31)
    for K in (1, 7, 300):  # K = 1, small K, and K past two blocks of 128 masks
        x, w, masks, kw = rand_case(gen, K=K, norm=norm, **shape)
        args = dict(padding=shape["k"] // 2, norm=norm, post=post, **kw)
        ref = ops.masked_damage_reference(x, w, masks, **args)
        assert_damage_close(ops.masked_damage(x, w, masks, **args), ref)
        assert_damage_close(ops.masked_damage(x, w, masks, method="fused", **args), ref)


def _search_masks(gen, K, C, dead, kept):
    """Masks as the search draws them: channels `dead` removed by every mask, `kept` by none,
    the rest varying; row 0 removes only the dead ones, row 1 every channel but the kept."""
    masks = torch.rand(K, C, generator=gen) < 0.5
    masks[:, dead] = False
    masks[:, kept] = True
    masks[0] = True
    masks[0, dead] = False
    if K > 1:
        masks[1] = False
        masks[1, kept] = True
    return masks


@pytest.mark.parametrize("K", [1, 5, 131])
def test_mask_pass_channel_roles_blocks_and_chunks(K):
    """The fused mask pass starts every d_k at the sum over the channels every mask removes,
    leaves out those none removes, sums the masks in blocks of 128 and quads (K = 131: a
    second block and a partial quad), and runs over position chunks of whole 32-position
    tiles (here 3 chunks, the last with a partial tile), for every mode."""
    gen = torch.Generator().manual_seed(K)
    C, O = 70, 9                           # 70 * 9 im2col rows: chunks of 192 positions
    x = torch.randn(3, C, 13, 11, generator=gen).relu_()   # P = 429
    w = torch.randn(O, C, 3, 3, generator=gen) / (9 * C) ** 0.5
    masks = _search_masks(gen, K, C, dead=[3, 4, 40, 69], kept=list(range(10, 30)))
    kw = dict(bias=torch.randn(O, generator=gen), padding=1, scale=torch.rand(O, generator=gen)
              + 0.5, shift=torch.randn(O, generator=gen) * 0.2)
    for norm, post in NORM_POST:
        args = dict(kw, norm=norm, post=post)
        if norm == "none":
            args.pop("scale"), args.pop("shift")
        ref = ops.masked_damage_reference(x, w, masks, **args)
        assert_damage_close(ops.masked_damage(x, w, masks, method="fused", **args), ref)
        out = _with_output(x, w, args)
        assert_damage_close(ops.masked_damage(x, w, masks, method="fused", output=out, **args),
                            ref)
        if norm == "batch" or post == "none":
            assert_damage_close(ops.masked_damage(x, w, masks, method="moments", **args), ref)
    aff = _relu_affine(gen, K, O)
    args = dict(bias=kw["bias"], padding=1)
    want = ops.masked_relu_damage_reference(x, w, masks, *aff, **args)
    assert_damage_close(ops.masked_relu_damage(x, w, masks, *aff, **args), want)
    assert_damage_close(ops.masked_relu_damage(x, w, masks, *aff, **args,
                                               output=_with_output(x, w, args)), want)


def test_auto_tells_the_cost_model_how_many_channels_vary(monkeypatch):
    """method="auto" on the CPU counts the channels some but not all masks remove (here 20
    minus 2 removed by every mask minus 3 kept by every mask) for the cost model."""
    seen = {}
    choose = _varying.choose

    def spy(*a, **k):
        seen.update(k)
        return choose(*a, **k)

    monkeypatch.setattr(_varying, "choose", spy)
    gen = torch.Generator().manual_seed(5)
    x, w, _, kw = rand_case(gen, N=2, C=20, O=6, H=6, K=9, norm="batch")
    masks = _search_masks(gen, 9, 20, dead=[0, 1], kept=[5, 6, 7])
    for post in ("none", "relu"):
        seen.clear()
        args = dict(padding=1, norm="batch", post=post, **kw)
        assert_damage_close(ops.masked_damage(x, w, masks, **args),
                            ops.masked_damage_reference(x, w, masks, **args))
        assert seen["varying"] == 15


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_masked_damage_linear_follower(norm, post):
    gen = torch.Generator().manual_seed(7)
    for N, C, O in [(64, 50, 10), (1, 3, 2), (5, 130, 7)]:
        x, w, masks, kw = rand_case(gen, N=N, C=C, O=O, K=33, norm=norm, linear=True)
        if norm == "batch" and N == 1:
            continue  # BN over a single value: variance 0 (covered by the conv N=1 cases)
        args = dict(norm=norm, post=post, **kw)
        assert_damage_close(ops.masked_damage(x, w, masks, **args),
                            ops.masked_damage_reference(x, w, masks, **args))


def test_masked_damage_batch_matches_nn_batchnorm():
    """norm="batch" is nn.BatchNorm2d in training mode, applied to each masked output."""
    gen = torch.Generator().manual_seed(3)
    x, w, masks, kw = rand_case(gen, N=4, C=6, O=5, H=7, K=5, norm="batch")
    bn = torch.nn.BatchNorm2d(5).train()
    with torch.no_grad():
        bn.weight.copy_(kw["scale"])
        bn.bias.copy_(kw["shift"])
        f = lambda inp: torch.relu(bn(torch.nn.functional.conv2d(inp, w, kw["bias"], padding=1)))
        base = f(x)
        want = torch.stack([((f(x * m.view(1, -1, 1, 1)) - base) ** 2).sum() for m in masks.float()])
    got = ops.masked_damage(x, w, masks, padding=1, norm="batch", post="relu", **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_all_keep_is_exactly_zero_and_all_drop_matches(norm, post):
    gen = torch.Generator().manual_seed(11)
    x, w, _, kw = rand_case(gen, N=3, C=12, O=7, H=6, K=1, norm=norm)
    masks = torch.stack([torch.ones(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)])
    args = dict(padding=1, norm=norm, post=post, **kw)
    got = ops.masked_damage(x, w, masks, **args)
    assert got[0].item() == 0.0
    assert got[1].item() > 0.0
    assert_damage_close(got, ops.masked_damage_reference(x, w, masks, **args))


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_non_contiguous_inputs(norm, post):
    gen = torch.Generator().manual_seed(5)
    x, w, masks, kw = rand_case(gen, N=3, C=10, O=6, H=9, K=12, norm=norm)
    args = dict(padding=1, norm=norm, post=post, **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    views = [
        x.contiguous(memory_format=torch.channels_last),
        x.transpose(2, 3).contiguous().transpose(2, 3),
        torch.stack([x, torch.zeros_like(x)], dim=2)[:, :, 0],   # strided channels
    ]
    assert not any(v.is_contiguous() for v in views)
    for v in views:
        torch.testing.assert_close(v, x)
        wt = w.transpose(0, 1).contiguous().transpose(0, 1)
        mt = masks.t().contiguous().t()
        assert_damage_close(ops.masked_damage(v, wt, mt, **args), ref)
    # a batch slice with a storage offset
    big = torch.cat([torch.randn(2, 10, 9, 9, generator=gen), x])
    assert_damage_close(ops.masked_damage(big[2:], w, masks, **args), ref)


def test_badly_scaled_batchnorm_inputs():
    """Large activations with a large common offset: BN statistics must not lose precision."""
    gen = torch.Generator().manual_seed(13)
    x, w, masks, kw = rand_case(gen, N=4, C=9, O=5, H=8, K=25, norm="batch")
    x = x * 50.0 + 1000.0
    kw["bias"] = torch.full((5,), 3.0e3)
    for post in ("none", "relu"):
        args = dict(padding=1, norm="batch", post=post, **kw)
        ref = ops.masked_damage_reference(x, w, masks, **args)
        assert_damage_close(ops.masked_damage(x, w, masks, **args), ref, rtol=2e-3)
        assert_damage_close(ops.masked_damage(x, w, masks, method="fused", **args), ref,
                            rtol=2e-3)


def test_fused_batch_statistics_when_the_first_tile_is_an_outlier():
    """The fused pass shifts the BN sums by the means of each output's first tile of 32
    positions; here that tile (sample 0's top four rows) is offset by 1000 against the rest,
    so its means are ~3 standard deviations from the true ones, and all data sit far from 0
    (without the shifts this test and the one above fail by orders of magnitude)."""
    gen = torch.Generator().manual_seed(29)
    x, w, masks, kw = rand_case(gen, N=6, C=7, O=5, H=8, K=40, norm="batch")
    x[0, :, :4] += 1000.0
    for post in ("none", "relu"):
        args = dict(padding=1, norm="batch", post=post, **kw)
        assert_damage_close(ops.masked_damage(x, w, masks, method="fused", **args),
                            ops.masked_damage_reference(x, w, masks, **args))


def test_empty_inputs():
    x = torch.randn(0, 4, 5, 5)
    w = torch.randn(3, 4, 3, 3)
    m = torch.ones(6, 4, dtype=torch.bool)
    out = ops.masked_damage(x, w, m, padding=1)
    assert out.shape == (6,) and bool((out == 0).all())
    out = ops.masked_damage(torch.randn(2, 4, 5, 5), w, m[:0], padding=1)
    assert out.shape == (0,) and out.dtype == torch.float32
    out = ops.masked_damage(torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3),
                            torch.ones(4, 0, dtype=torch.bool), padding=1)
    assert out.shape == (4,) and bool((out == 0).all())
    assert ops.quadratic_damage(torch.zeros(0, 0), torch.ones(3, 0, dtype=torch.bool)).shape == (3,)
    assert ops.channel_gram(x, w, padding=1).abs().sum() == 0


def test_uint8_masks_and_half_inputs():
    gen = torch.Generator().manual_seed(17)
    x, w, masks, kw = rand_case(gen, N=2, C=8, O=4, H=6, K=10, norm="affine")
    args = dict(padding=1, norm="affine", post="relu", **kw)
    ref = ops.masked_damage(x, w, masks, **args)
    assert torch.equal(ops.masked_damage(x, w, masks.to(torch.uint8), **args), ref)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        xr, wr = x.to(dt), w.to(dt)
        got = ops.masked_damage(xr, wr, masks, **args)
        assert got.dtype == torch.float32
        assert_damage_close(got, ops.masked_damage_reference(xr, wr, masks, **args))


def test_nan_propagates():
    gen = torch.Generator().manual_seed(19)
    for norm, post in NORM_POST:
        x, w, masks, kw = rand_case(gen, N=2, C=6, O=4, H=5, K=4, norm=norm)
        x[0, 2, 1, 1] = float("nan")
        masks[:, 2] = False  # every mask touches the NaN channel
        out = ops.masked_damage(x, w, masks, padding=1, norm=norm, post=post, **kw)
        assert bool(torch.isnan(out).all()), (norm, post, out)


# ------------------------------------------------------------------------------------------
# masked_damage, the moments path (post="none": the closed form from BLAS moments; batch +
# relu: the BN statistics of every mask from them, then one pass of masked_relu_damage)
# ------------------------------------------------------------------------------------------

LINEAR_MODES = ["none", "affine", "batch"]
MOMENT_MODES = [(n, "none") for n in LINEAR_MODES] + [("batch", "relu")]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**conv_sweep(), mode=st.sampled_from(MOMENT_MODES))
def test_moments_sweep(N, C, O, H, W, k, stride, padding, dilation, K, mode, bias, seed):
    norm, post = mode
    gen = torch.Generator().manual_seed(seed)
    if not conv_fits(H, W, k, padding, dilation):
        return
    x, w, masks, kw = rand_case(gen, N=N, C=C, O=O, H=H, W=W, k=k, K=K, bias=bias, norm=norm)
    args = dict(stride=stride, padding=padding, dilation=dilation, norm=norm, post=post, **kw)
    got = ops.masked_damage(x, w, masks, method="moments", **args)
    assert_damage_close(got, ops.masked_damage_reference(x, w, masks, **args))


def _im2col_gram_reference(x, kh, kw, padding, dilation, centre):
    cols = torch.nn.functional.unfold(x.double(), (kh, kw), dilation=dilation, padding=padding)
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)         # (C*T, P), channel-major
    if centre:
        cols = cols - cols.mean(dim=1, keepdim=True)
    return cols @ cols.T


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 3), C=st.integers(1, 6), H=st.integers(1, 9), W=st.integers(1, 9),
    kh=st.integers(1, 4), kw=st.integers(1, 4), ph=st.integers(0, 4), pw=st.integers(0, 4),
    dh=st.integers(1, 3), dw=st.integers(1, 3), offset=st.sampled_from([0.0, 3.0, 300.0]),
    block=st.sampled_from([1 << 22, 40]), seed=st.integers(0, 2**31 - 1),
)
def test_lag_gram_equals_the_im2col_gram(N, C, H, W, kh, kw, ph, pw, dh, dw, offset, block,
                                         seed):
    """Stride 1: the Gram from lagged products (any padding, also wider than the kernel's
    reach, where some taps read only zeros; dilation; odd kernels; one or many sample blocks)
    equals the im2col Gram, centred or not, against float64."""
    ho, wo = H + 2 * ph - dh * (kh - 1), W + 2 * pw - dw * (kw - 1)
    if ho < 1 or wo < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen) + offset
    w = torch.empty(2, C, kh, kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_moments, "_BLOCK", block)
        for centre, dtype in itertools.product((False, True), (torch.float64, torch.float32)):
            # float32: with one sample block the blocks are never float64 (its own code path)
            ref = _im2col_gram_reference(x, kh, kw, (ph, pw), (dh, dw), centre)
            blocks = _moments._lag_gram(x, w, (ph, pw), (dh, dw), centre, dtype)
            assert torch.equal(blocks, blocks.permute(1, 0, 3, 2))
            got = _moments.channel_major(blocks)
            assert got.dtype == dtype and got.shape == ref.shape
            got = got.double()
            # float32 data: 1e-4 of the largest entry, plus the rounding of the shift by the
            # mean (about 1e-7 of |x|^2 per position; a centred Gram can be exactly 0)
            tol = 1e-4 * float(ref.abs().max()) + 1e-7 * float(x.abs().max()) ** 2 * N * ho * wo
            assert float((got - ref).abs().max()) <= tol
            assert torch.equal(got, got.T)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 3), C=st.integers(1, 6), O=st.integers(1, 5), H=st.integers(1, 8),
    W=st.integers(1, 8), kh=st.integers(1, 3), kw=st.integers(1, 4), ph=st.integers(0, 3),
    pw=st.integers(0, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
    offset=st.sampled_from([0.0, 3.0, 300.0]), block=st.sampled_from([1 << 22, 40]),
    seed=st.integers(0, 2**31 - 1),
)
def test_summed_gram_both_routes(N, C, O, H, W, kh, kw, ph, pw, dh, dw, offset, block, seed):
    """The damage form of a linear follower, ``G = sum_{t,u} (W^T W o Sigma)`` collapsed over
    the taps, from the pair blocks (the im2col route) and from the lagged products without the
    pair blocks (the lag route, one or many sample blocks, dead taps, any padding and
    dilation), against the float64 im2col Gram and the full ``W^T W``."""
    ho, wo = H + 2 * ph - dh * (kh - 1), W + 2 * pw - dw * (kw - 1)
    if ho < 1 or wo < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen) + offset
    weight = torch.randn(O, C, kh, kw, generator=gen)
    T = kh * kw
    w = weight.reshape(O, C * T)
    sigma = _im2col_gram_reference(x, kh, kw, (ph, pw), (dh, dw), centre=False)
    ref = (sigma * (w.double().T @ w.double())).view(C, T, C, T).sum(dim=(1, 3))
    # the terms' scale: what float32 products of this size can resolve
    tol = 1e-5 * float((sigma.abs() * (w.double().T @ w.double()).abs()).sum())
    geo = ((1, 1), (ph, pw), (dh, dw))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_moments, "_BLOCK", block)
        for lagged in (False, True):
            mp.setattr(_moments, "_gram_route",
                       lambda C, T, P, lag, lagged=lagged: (0.0, 0.0, 0.0, lagged and lag is not None))
            got = _moments._summed_pairs(x, weight, w, *geo)
            assert got.dtype == torch.float64 and got.shape == (C, C)
            assert float((got - ref).abs().max()) <= tol, (lagged, float((got - ref).abs().max()), tol)


@pytest.mark.parametrize("norm,post", MOMENT_MODES)
@pytest.mark.parametrize(
    "shape",
    [
        dict(N=4, C=16, O=16, H=8, k=3),     # ResNet-like
        dict(N=2, C=33, O=17, H=6, k=3),     # odd widths
        dict(N=1, C=5, O=3, H=7, k=5),       # N = 1
        dict(N=3, C=70, O=9, H=4, k=1),      # many channels, 1x1 (the im2col Gram route)
        dict(N=2, C=6, O=300, H=5, k=1),     # wide follower
    ],
)
def test_moments_shapes_and_both_routes(shape, norm, post, monkeypatch):
    gen = torch.Generator().manual_seed(hash((tuple(shape.items()), norm, post)) % 2**31)
    for K in (1, 7, 300):
        x, w, masks, kw = rand_case(gen, K=K, norm=norm, **shape)
        args = dict(padding=shape["k"] // 2, norm=norm, post=post, **kw)
        ref = ops.masked_damage_reference(x, w, masks, **args)
        # both ways to the moments, and the im2col Gram both ways (the lag route where the
        # conv has stride 1), whatever the cost models say
        for route, lagged in (("sigma", False), ("sigma", True), ("z", False)):
            monkeypatch.setattr(_moments, "_build_cost",
                                lambda *a, route=route, **k: (0.0, route, 0.0, 0.0))
            monkeypatch.setattr(_moments, "_gram_route",
                                lambda C, T, P, lag, lagged=lagged: (0.0, 0.0, 0.0,
                                                                     lagged and lag is not None))
            assert_damage_close(ops.masked_damage(x, w, masks, method="moments", **args), ref)


@pytest.mark.parametrize("norm,post", MOMENT_MODES)
def test_moments_linear_follower_and_blocks(norm, post, monkeypatch):
    gen = torch.Generator().manual_seed(31)
    monkeypatch.setattr(_moments, "_BLOCK", 200)   # many sample, output and mask blocks
    for N, C, O in [(64, 50, 10), (5, 130, 7), (2, 3, 2)]:
        x, w, masks, kw = rand_case(gen, N=N, C=C, O=O, K=33, norm=norm, linear=True)
        args = dict(norm=norm, post=post, **kw)
        assert_damage_close(ops.masked_damage(x, w, masks, method="moments", **args),
                            ops.masked_damage_reference(x, w, masks, **args))
        x, w, masks, kw = rand_case(gen, N=3, C=C % 20 + 1, O=O, H=6, K=33, norm=norm)
        args = dict(padding=1, norm=norm, post=post, **kw)
        assert_damage_close(ops.masked_damage(x, w, masks, method="moments", **args),
                            ops.masked_damage_reference(x, w, masks, **args))


@pytest.mark.parametrize("norm,post", MOMENT_MODES)
def test_moments_all_keep_zero_all_drop_nan_noncontiguous(norm, post):
    gen = torch.Generator().manual_seed(37)
    x, w, masks, kw = rand_case(gen, N=3, C=12, O=7, H=6, K=9, norm=norm)
    masks[2] = False
    masks[2, 5] = True                   # a single channel kept
    args = dict(padding=1, norm=norm, post=post, **kw)
    got = ops.masked_damage(x, w, masks, method="moments", **args)
    assert got[0].item() == 0.0 and got[1].item() > 0.0   # rows 0 / 1: keep all / drop all
    ref = ops.masked_damage_reference(x, w, masks, **args)
    assert_damage_close(got, ref)
    nc = x.contiguous(memory_format=torch.channels_last)
    wt = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert_damage_close(ops.masked_damage(nc, wt, masks.t().contiguous().t(), method="moments",
                                          **args), ref)
    assert torch.equal(ops.masked_damage(x, w, masks.to(torch.uint8), method="moments", **args),
                       got)
    with pytest.raises(RuntimeError, match="only 0 and 1"):
        ops.masked_damage(x, w, masks.to(torch.uint8) * 2, method="moments", **args)
    for dt in (torch.float16, torch.float64):
        assert_damage_close(ops.masked_damage(x.to(dt), w.to(dt), masks, method="moments", **args),
                            ops.masked_damage_reference(x.to(dt), w.to(dt), masks, **args))
    x[0, 2, 1, 1] = float("nan")
    masks[:, 2] = False
    out = ops.masked_damage(x, w, masks, method="moments", **args)
    assert bool(torch.isnan(out).all()), out


def test_moments_badly_scaled_and_empty():
    gen = torch.Generator().manual_seed(13)
    x, w, masks, kw = rand_case(gen, N=4, C=9, O=5, H=8, K=25, norm="batch")
    x = x * 50.0 + 1000.0
    kw["bias"] = torch.full((5,), 3.0e3)
    for norm, post in MOMENT_MODES:
        extra = kw if norm != "none" else {"bias": kw["bias"]}
        args = dict(padding=1, norm=norm, post=post, **extra)
        assert_damage_close(ops.masked_damage(x, w, masks, method="moments", **args),
                            ops.masked_damage_reference(x, w, masks, **args), rtol=2e-3)
    w3 = torch.randn(3, 4, 3, 3)
    out = ops.masked_damage(torch.randn(0, 4, 5, 5), w3, torch.ones(6, 4, dtype=torch.bool),
                            padding=1, method="moments")
    assert out.shape == (6,) and bool((out == 0).all())
    out = ops.masked_damage(torch.randn(2, 4, 5, 5), w3, torch.ones(0, 4, dtype=torch.bool),
                            padding=1, method="moments")
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("post", ["none", "relu"])
@pytest.mark.parametrize("linear", [False, True])
def test_moments_when_the_kept_or_removed_part_carries_no_variance(linear, post):
    """A mask whose smaller set carries nearly all of an output's variance leaves the other
    set's form as a difference of nearly equal terms; it is then taken directly (and each
    closed form is the expansion without cancellation in its regime): the damage stays close to
    the float64 reference, also where it is small."""
    gen = torch.Generator().manual_seed(29)
    C = 6
    x, w, _, kw = rand_case(gen, N=64, C=C, O=4, H=5, K=1, norm="batch", linear=linear)
    # channel 0 carries nearly all the variance, channel 1 is nearly a small copy of it (after
    # BN the output without channel 0 is then close to the output with it: a small damage)
    x = x.clone()
    x[:, 0] *= 100.0
    x[:, 1] = 1e-3 * x[:, 0] + 1e-5 * x[:, 1]
    masks = torch.ones(4 * C, C, dtype=torch.bool)
    masks[:C, 0] = False                          # remove channel 0 (and sometimes one more)
    masks[torch.arange(1, C), torch.arange(1, C)] = False
    masks[C:2 * C] = ~masks[:C]                   # keep only channel 0 (and sometimes one more)
    masks[2 * C:] = torch.rand(2 * C, C, generator=gen) < 0.5
    args = dict(norm="batch", post=post, **kw, **({} if linear else dict(padding=1)))
    ref = ops.masked_damage_reference(x.double(), w.double(), masks,
                                      **{k: (v.double() if torch.is_tensor(v) else v)
                                         for k, v in args.items()}, dtype=torch.float64)
    # 100x the usual precision: a difference of nearly equal forms misses it by 5-10x here,
    # the direct forms meet it with a margin of 15x or more. With relu, 10x the usual: the
    # ReLU pass sums in float32 (5e-6 on the Linear follower, 7e-7 on the conv); the scales
    # from the cancelling difference miss it (4e-5 / 1e-4)
    assert_damage_close(ops.masked_damage(x, w, masks, method="moments", **args), ref,
                        rtol=1e-6 if post == "none" else 1e-5, atol_frac=1e-7)


# ------------------------------------------------------------------------------------------
# The varying channels: the moments of the channels the masks do not all treat alike
# (norm="batch"; _varying.FORCE takes the path wherever it applies)
# ------------------------------------------------------------------------------------------


def _roles(gen, x, K):
    """Search-like masks over ``x``'s channels: a random third gone (half of them all 0 in
    ``x``, as a base-masked input is), a random third kept, the rest varying."""
    C = x.shape[1]
    role = torch.randint(0, 3, (C,), generator=gen)
    dead = (role == 0).nonzero()[:, 0].tolist()
    masks = _search_masks(gen, K, C, dead=dead, kept=(role == 1).nonzero()[:, 0].tolist())
    x[:, dead[::2]] = 0.0
    return masks


def _with_output(x, w, args):
    """The follower's output as the training forward computes it."""
    if x.dim() == 2:
        return torch.nn.functional.linear(x, w, args.get("bias"))
    return torch.nn.functional.conv2d(x, w, args.get("bias"), args.get("stride", 1),
                                      args.get("padding", 0), args.get("dilation", 1))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**conv_sweep(), post=st.sampled_from(["none", "relu"]), given_output=st.booleans())
def test_varying_sweep(N, C, O, H, W, k, stride, padding, dilation, K, post, bias, seed,
                       given_output):
    gen = torch.Generator().manual_seed(seed)
    if not conv_fits(H, W, k, padding, dilation):
        return
    x, w, _, kw = rand_case(gen, N=N, C=C, O=O, H=H, W=W, k=k, K=K, bias=bias, norm="batch")
    masks = _roles(gen, x, K)
    args = dict(stride=stride, padding=padding, dilation=dilation, norm="batch", post=post, **kw)
    out = _with_output(x, w, args) if given_output else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_varying, "FORCE", True)
        got = ops.masked_damage(x, w, masks, method="moments", output=out, **args)
    # the float32 floor is set by the output's energy |BN(y)|^2 (the search divides every
    # damage by it), not by the largest damage: with two output positions every masked output
    # normalises to nearly the same vector and the damages (~1e-7 of it, hypothesis found one)
    # are differences of float32 terms of that size, on every path of the moments
    y = _with_output(x, w, args).double()
    dims = (0,) + tuple(range(2, y.dim()))
    yc = y - y.mean(dim=dims, keepdim=True)
    bn = yc / (yc.square().mean(dim=dims, keepdim=True) + 1e-5).sqrt()
    shape = (1, -1) + (1,) * (y.dim() - 2)
    bn = bn * kw["scale"].double().view(shape) + kw["shift"].double().view(shape)
    floor = max(1e-7 * float(bn.square().sum()), 1e-8)
    assert_damage_close(got, ops.masked_damage_reference(x, w, masks, **args), floor=floor)


@pytest.mark.parametrize("post", ["none", "relu"])
def test_varying_linear_1x1_blocks_and_k1(post, monkeypatch):
    """Linear and 1x1 followers, many output and mask blocks, K = 1 and 2 (with one mask no
    channel varies: the full moments path prices it)."""
    monkeypatch.setattr(_varying, "FORCE", True)
    monkeypatch.setattr(_moments, "_BLOCK", 300)
    gen = torch.Generator().manual_seed(41)
    for K in (1, 2, 40):
        for linear, shape in ((True, dict(N=64, C=40, O=10)), (False, dict(N=3, C=30, O=70, H=5, k=1)),
                              (False, dict(N=2, C=9, O=5, H=7, k=3))):
            x, w, _, kw = rand_case(gen, K=K, norm="batch", linear=linear, **shape)
            masks = _roles(gen, x, K)
            args = dict(norm="batch", post=post, **kw,
                        **({} if linear else dict(padding=shape["k"] // 2)))
            ref = ops.masked_damage_reference(x, w, masks, **args)
            for out in (None, _with_output(x, w, args)):
                assert_damage_close(ops.masked_damage(x, w, masks, method="moments", output=out,
                                                      **args), ref)


@pytest.mark.parametrize("post", ["none", "relu"])
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("O,block", [(4, 1 << 22), (70, 300)])
def test_varying_when_the_kept_part_carries_no_variance(linear, post, O, block, monkeypatch):
    """Masks that remove the channel carrying nearly all the variance leave the kept part's
    variance as a difference of nearly equal terms from three different products; the kept
    channels' sum is then formed once and those masks' kept forms are taken directly (without
    it the damage misses the float64 reference by up to 2e-3 here). 70 outputs with small
    blocks: the Grams come in several blocks of outputs, each with the kept column appended."""
    monkeypatch.setattr(_varying, "FORCE", True)
    monkeypatch.setattr(_moments, "_BLOCK", block)
    formed = []
    with_kept = _varying._Moments.with_kept
    monkeypatch.setattr(_varying._Moments, "with_kept",
                        lambda self: formed.append(1) or with_kept(self))
    gen = torch.Generator().manual_seed(43)
    C = 8
    x, w, _, kw = rand_case(gen, N=64, C=C, O=O, H=5, K=1, norm="batch", linear=linear)
    x = x.clone()
    x[:, 0] *= 100.0                                  # varying: carries nearly everything
    x[:, 1] = 1e-3 * x[:, 0] + 1e-5 * x[:, 1]          # varying: nearly a small copy of it
    x[:, 7] = 0.0                                      # gone and all 0
    masks = torch.ones(3 * C, C, dtype=torch.bool)    # channels 0-3 vary, 4-5 kept, 6-7 gone
    masks[:, 6:] = False
    masks[:C, 0] = False
    masks[torch.arange(C) % 4, torch.arange(C) % 4] = False
    masks[C:, :4] = torch.rand(2 * C, 4, generator=gen) < 0.5
    args = dict(norm="batch", post=post, **kw, **({} if linear else dict(padding=1)))
    ref = ops.masked_damage_reference(x.double(), w.double(), masks,
                                      **{k: (v.double() if torch.is_tensor(v) else v)
                                         for k, v in args.items()}, dtype=torch.float64)
    for out in (None, _with_output(x, w, args)):
        formed.clear()
        got = ops.masked_damage(x, w, masks, method="moments", output=out, **args)
        assert formed
        assert_damage_close(got, ref, rtol=1e-5, atol_frac=1e-7)


@pytest.mark.parametrize("post", ["none", "relu"])
@pytest.mark.parametrize("norm", ["affine", "batch"])
def test_mask_pass_skips_silent_channels_and_reads_the_output(norm, post):
    """The fused pass leaves out a removed-by-all channel that is 0 everywhere in x (a
    base-masked input) unless its weights are not finite (0 * inf is NaN, as in the reference),
    and with the follower's output given it forms no kept channel's contribution: a wrong
    output shows in the damage of ReLU and batch-statistics followers."""
    gen = torch.Generator().manual_seed(53)
    x, w, _, kw = rand_case(gen, N=3, C=10, O=6, H=7, K=9, norm=norm)
    masks = _search_masks(gen, 9, 10, dead=[0, 1], kept=[2, 3, 4])
    x[:, 0] = 0.0
    args = dict(padding=1, norm=norm, post=post, **kw)
    out = _with_output(x, w, args)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    assert_damage_close(ops.masked_damage(x, w, masks, method="fused", output=out, **args), ref)
    if norm == "batch" or post == "relu":
        got = ops.masked_damage(x, w, masks, method="fused", output=out * 1.01, **args)
        assert not torch.allclose(got, ref.float(), rtol=1e-3)
    w = w.clone()
    w[3, 0, 1, 1] = float("inf")
    ref = ops.masked_damage_reference(x, w, masks, **args)
    got = ops.masked_damage(x, w, masks, method="fused", **args)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and bool(torch.isnan(got).any())
    with pytest.raises(RuntimeError, match="output"):
        torch.ops.aofp.masked_damage(x, w, masks, padding=[1, 1], norm=norm, post=post, **kw,
                                     output=out[:, :5])


def test_varying_nan_offsets_and_bad_output(monkeypatch):
    monkeypatch.setattr(_varying, "FORCE", True)
    gen = torch.Generator().manual_seed(47)
    x, w, _, kw = rand_case(gen, N=4, C=12, O=5, H=8, K=20, norm="batch")
    masks = _search_masks(gen, 20, 12, dead=[0, 1], kept=[2, 3, 4])
    for post in ("none", "relu"):
        args = dict(padding=1, norm="batch", post=post, **kw)
        big = x * 50.0 + 1000.0                       # a large common offset
        assert_damage_close(ops.masked_damage(big, w, masks, method="moments",
                                              output=_with_output(big, w, args), **args),
                            ops.masked_damage_reference(big, w, masks, **args), rtol=2e-3)
        out = _with_output(x, w, args).contiguous(memory_format=torch.channels_last)
        assert_damage_close(ops.masked_damage(x, w, masks, method="moments", output=out, **args),
                            ops.masked_damage_reference(x, w, masks, **args))
        for c in (0, 3, 7):                           # a NaN in a gone, kept, varying channel
            xn = x.clone()
            xn[1, c, 2, 2] = float("nan")
            got = ops.masked_damage(xn, w, masks, method="moments", **args)
            want = ops.masked_damage_reference(xn, w, masks, **args)
            assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got).any())
    args = dict(padding=1, norm="batch", **kw)
    for bad in (torch.zeros(4, 5, 7, 8), torch.zeros(4, 5, 8, 8, dtype=torch.long), "y"):
        with pytest.raises(ValueError, match="output"):
            ops.masked_damage(x, w, masks, output=bad, **args)


def test_varying_is_chosen_where_few_channels_vary():
    """The cost model (measured 2026-12-03, 1 thread, K = 64, the output given): at ResNet-56's
    followers the varying path from a quarter of the channels varying (16@32x32: 7.5 ms against
    10.4 ms for every channel's moments; 64@8x8: 4.5 against 10.2 ms), not with every channel
    varying; never without norm="batch"; a gone channel costs a conv and a weight gradient."""
    choose = _varying.choose
    for C, hw in ((16, 32), (32, 16), (64, 8)):
        P = 64 * hw * hw
        lag = _moments.lag_shape(torch.empty(64, C, hw, hw, device="meta"),
                                 torch.empty(C, C, 3, 3, device="meta"), (1, 1), (1, 1), (1, 1))
        for K in (16, 64, 256):
            assert choose(C, C, 9, P, K, True, False, 1, lag, varying=C // 4,
                          output=True) == "varying"
            assert choose(C, C, 9, P, K, True, False, 1, lag, varying=C // 8,
                          output=True) == "varying"
            assert choose(C, C, 9, P, K, True, False, 1, lag, varying=C, output=True) != "varying"
            assert choose(C, C, 9, P, K, False, False, 1, lag, varying=C // 8,
                          output=True) != "varying"
        assert (_varying.cost(C, C, 9, P, 64, C // 4, 0, True, 1, lag)
                < _varying.cost(C, C, 9, P, 64, C // 4, 0, False, 1, lag)
                < _varying.cost(C, C, 9, P, 64, C // 4, 3, False, 1, lag))


# ------------------------------------------------------------------------------------------
# masked_relu_damage: a per-mask affine of the centred output, then ReLU
# ------------------------------------------------------------------------------------------


def _relu_affine(gen, K, O, y_scale=1.0):
    """Per-mask scales of both signs (and some exactly 0), shifts, a centre, base scale/shift."""
    a = torch.randn(K, O, generator=gen) * 2.0
    a[torch.rand(K, O, generator=gen) < 0.1] = 0.0
    b = torch.randn(K, O, generator=gen) * 0.5
    centre = torch.randn(O, generator=gen).double() * y_scale
    return a, b, centre, torch.randn(O, generator=gen), torch.randn(O, generator=gen) * 0.5


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**conv_sweep())
def test_masked_relu_damage_sweep(N, C, O, H, W, k, stride, padding, dilation, K, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    if not conv_fits(H, W, k, padding, dilation):
        return
    x, w, masks, kw = rand_case(gen, N=N, C=C, O=O, H=H, W=W, k=k, K=K, bias=bias)
    aff = _relu_affine(gen, K, O)
    args = dict(stride=stride, padding=padding, dilation=dilation, **kw)
    got = ops.masked_relu_damage(x, w, masks, *aff, **args)
    assert_damage_close(got, ops.masked_relu_damage_reference(x, w, masks, *aff, **args))


def test_masked_relu_damage_edges():
    """K = 1, K = 0, an empty batch, a Linear follower, non-contiguous and float16/64 inputs,
    a mask that keeps everything (0 whatever its affine), NaN propagation, argument errors."""
    gen = torch.Generator().manual_seed(53)
    x, w, masks, kw = rand_case(gen, N=3, C=11, O=6, H=7, K=8)
    aff = _relu_affine(gen, 8, 6)
    args = dict(padding=1, **kw)
    ref = ops.masked_relu_damage_reference(x, w, masks, *aff, **args)
    got = ops.masked_relu_damage(x, w, masks, *aff, **args)
    assert got[0].item() == 0.0 and ref[0].item() == 0.0 and got[1].item() > 0.0
    assert_damage_close(got, ref)
    assert_damage_close(ops.masked_relu_damage(x, w, masks[3:4], *(t[3:4] for t in aff[:2]),
                                               *aff[2:], **args), ref[3:4])
    nc = x.contiguous(memory_format=torch.channels_last)
    a_nc = aff[0].t().contiguous().t()
    assert_damage_close(ops.masked_relu_damage(nc, w, masks.t().contiguous().t(), a_nc,
                                               *aff[1:], **args), ref)
    for dt in (torch.float16, torch.float64):
        assert_damage_close(
            ops.masked_relu_damage(x.to(dt), w.to(dt), masks, *aff, **args),
            ops.masked_relu_damage_reference(x.to(dt), w.to(dt), masks, *aff, **args))
    out = ops.masked_relu_damage(x, w, masks[:0], aff[0][:0], aff[1][:0], *aff[2:], **args)
    assert out.shape == (0,) and out.dtype == torch.float32
    out = ops.masked_relu_damage(x[:0], w, masks, *aff, **args)
    assert out.shape == (8,) and bool((out == 0).all())
    xl, wl, ml, kl = rand_case(gen, N=20, C=9, O=4, K=6, linear=True)
    affl = _relu_affine(gen, 6, 4)
    assert_damage_close(ops.masked_relu_damage(xl, wl, ml, *affl, **kl),
                        ops.masked_relu_damage_reference(xl, wl, ml, *affl, **kl))
    xn = x.clone()
    xn[0, 2, 1, 1] = float("nan")
    mn = masks.clone()
    mn[:, 2] = False
    out = ops.masked_relu_damage(xn, w, mn, *aff, **args)
    assert bool(torch.isnan(out).all()), out
    a, b, centre, scale, shift = aff
    for bad, match in [((a[:, :5], b, centre, scale, shift), r"mask_scale must be \(K, O\)"),
                       ((a, b[:7], centre, scale, shift), r"mask_shift must be \(K, O\)"),
                       ((a, b, centre[:5], scale, shift), "centre must be 1-D of size O = 6"),
                       ((a, b, centre, scale[:2], shift), "scale must be 1-D of size O = 6"),
                       ((a, b.int(), centre, scale, shift), "mask_shift must be a floating")]:
        with pytest.raises(RuntimeError, match=match):
            ops.masked_relu_damage(x, w, masks, *bad, **args)
    with pytest.raises(RuntimeError, match="masked_relu_damage: masks must be"):
        ops.masked_relu_damage(x, w, masks[:, :4], *aff, **args)
    with pytest.raises(ValueError, match="masked_relu_damage: runs on the CPU only"):
        ops.masked_relu_damage(x.to("meta"), w, masks, *aff, **args)


def test_batch_relu_affine_is_each_masks_batchnorm():
    """The per-mask affine from the moments is BatchNorm on each masked output's own batch
    statistics (float64 reference), incl. a mask that drops every channel (BN gives shift)."""
    gen = torch.Generator().manual_seed(59)
    x, w, masks, kw = rand_case(gen, N=3, C=10, O=5, H=6, K=12, norm="batch")
    a, b, centre, base = _moments.batch_relu_affine(x, w, masks, kw["bias"], (1, 1), (1, 1),
                                                    (1, 1), kw["scale"], kw["shift"], 1e-5)
    y = ops._follower(x.double(), w.double(), kw["bias"].double(), 1, 1, 1)
    want_c = y.mean(dim=(0, 2, 3))
    torch.testing.assert_close(centre, want_c, rtol=1e-6, atol=1e-6)
    g, t = kw["scale"].double(), kw["shift"].double()
    torch.testing.assert_close(base, g / torch.sqrt(y.var(dim=(0, 2, 3), unbiased=False) + 1e-5),
                               rtol=1e-5, atol=0)
    for k in range(12):
        yk = ops._follower(x.double() * masks[k].double().view(1, -1, 1, 1), w.double(),
                           kw["bias"].double(), 1, 1, 1)
        bn = ops._apply_norm(yk, "batch", g, t, 1e-5)
        mine = (yk - centre.view(1, -1, 1, 1)) * a[k].view(1, -1, 1, 1) + b[k].view(1, -1, 1, 1)
        torch.testing.assert_close(mine, bn, rtol=1e-5, atol=1e-5)
    assert bool((a[1] == 0).all()) and torch.equal(b[1], t)   # row 1 drops every channel


def test_method_argument_and_cost_model():
    x, w, m = _ok()
    with pytest.raises(ValueError, match="method='moments' prices post='none'"):
        ops.masked_damage(x, w, m, post="relu", method="moments")
    with pytest.raises(ValueError, match="norm='affine', post='relu' on cpu"):
        ops.masked_damage(x, w, m, post="relu", norm="affine", scale=torch.ones(3),
                          shift=torch.zeros(3), method="moments")
    with pytest.raises(ValueError, match="relu=True applies to batch=True"):
        _moments.choose(4, 3, 9, 32, 5, False, relu=True)
    with pytest.raises(ValueError, match="method must be"):
        ops.masked_damage(x, w, m, method="gemm")
    with pytest.raises(RuntimeError, match=r"masks must be \(K, C\) with C = 4"):
        ops.masked_damage(x, w, m[:, :3], method="moments")
    assert not _moments.eligible("batch", "relu")


@pytest.mark.parametrize("threads", [1, 2])   # the range it was calibrated on
def test_cost_model_choices_are_sane(threads):
    """The cost model's choices on the shapes where one path is far ahead (measured, docs/
    kernels.md): ResNet-56 followers (3x3, C = O = 16/32/64, batch 64) on the moments path from
    K = 256; a bottleneck conv3 (1x1, 64 -> 256, 16x16, batch 32) on it at every K; the widest
    MobileNetV2 projection (1x1, 960 -> 320, 2x2, batch 64) on the fused pass at every K; a
    ResNet-50 conv3 at 4x4 (256 -> 1024, batch 32) on the moments path at small K and on the
    fused mask pass at large K (measured 2026-12-03, bench/results/cost-model.md, 1 thread:
    moments 0.023 / 0.33 / 1.6 s against fused 0.040 / 0.26 / 1.3 s at K = 16 / 256 / 1024;
    at K = 64 a near tie, 0.070 s against 0.080 s); the moments path's cost nearly flat in K
    where it is chosen."""
    choose = _moments.choose
    for C, hw in ((16, 32), (32, 16), (64, 8)):
        P = 64 * hw * hw
        assert choose(C, C, 9, P, 256, True, threads) == "moments"
        assert choose(C, C, 9, P, 1024, True, threads) == "moments"
        assert choose(C, C, 9, P, 256, False, threads) == "moments"
        m = [_moments.moments_cost(C, C, 9, P, K, True, threads) for K in (16, 256)]
        assert m[1] < 1.5 * m[0]
    for K in (1, 4, 16, 64, 256, 1024):
        assert choose(64, 256, 1, 32 * 16 * 16, K, True, threads) == "moments"
        assert choose(960, 320, 1, 64 * 2 * 2, K, True, threads) == "fused"
        if K != 64:       # a near tie there
            want = "moments" if K <= 16 else "fused"
            assert choose(256, 1024, 1, 32 * 4 * 4, K, True, threads) == want
    # batch + relu: the statistics from the moments, then one pass, where positions are many
    # against the channels; the fused BnStats pass where the map is small (measured 2026-12-03,
    # 1 thread, batch 32, K = 64, moments + one pass against the mask pass's two: 64 at 16x16
    # 40 against 58 ms; 256 at 4x4 120 against 49 ms; 512 at 2x2 1.26 s against 54 ms)
    # (as masked_damage asks: with the lag route of these stride-1 3x3 convs)
    def lag(C, hw):
        return _moments.lag_shape(torch.empty(32, C, hw, hw, device="meta"),
                                  torch.empty(C, C, 3, 3, device="meta"), (1, 1), (1, 1), (1, 1))

    for K in (64, 256):
        assert choose(64, 64, 9, 32 * 16 * 16, K, True, threads, lag(64, 16),
                      relu=True) == "moments"
        assert choose(512, 512, 9, 32 * 2 * 2, K, True, threads, lag(512, 2),
                      relu=True) == "fused"
    assert choose(256, 256, 9, 32 * 4 * 4, 64, True, threads, lag(256, 4), relu=True) == "fused"
    assert choose(128, 128, 9, 32 * 8 * 8, 256, True, threads, lag(128, 8),
                  relu=True) == "moments"
    # the CPU mask pass tabulates only the channels the masks do not all treat alike: with 32
    # of 256 varying it is measured 3.8x faster at the 4x4 conv3 (25 ms against moments 94 ms,
    # K = 64, 2026-12-03), and the model follows
    assert choose(256, 1024, 1, 32 * 4 * 4, 16, True, threads) == "moments"
    assert choose(256, 1024, 1, 32 * 4 * 4, 16, True, threads, varying=32) == "fused"
    f = [_moments.fused_cost(256, 1024, 1, 512, 64, threads, cv) for cv in (256, 64, 8)]
    assert f[0] > f[1] > f[2] and f[0] == _moments.fused_cost(256, 1024, 1, 512, 64, threads)
    # the bulk of both predictions runs on torch's threads; the per-call cost does not
    f1, f2 = (_moments.fused_cost(32, 32, 9, 16384, 64, t) for t in (threads, 2 * threads))
    assert f2 < f1 < 2 * f2
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)   # default: torch's setting
        assert _moments.fused_cost(32, 32, 9, 16384, 64) == f1
    finally:
        torch.set_num_threads(saved)


def test_channel_gram_blas_matches_kernel():
    gen = torch.Generator().manual_seed(47)
    for shape, geo in [(dict(N=3, C=7, O=5, H=9, k=3), dict(stride=2, padding=1)),
                       (dict(N=2, C=40, O=300, H=4, k=3), dict(padding=1)),
                       (dict(N=30, C=25, O=12, linear=True), {})]:
        x, w, _, kw = rand_case(gen, K=1, norm="affine", **shape)
        for scale in (None, kw["scale"]):
            Gk = ops.channel_gram(x, w, scale=scale, method="kernel", **geo)
            Gb = ops.channel_gram(x, w, scale=scale, method="blas", **geo)
            Gr = ops.channel_gram_reference(x, w, scale=scale, **geo)
            for G in (Gk, Gb):
                torch.testing.assert_close(G.double(), Gr, rtol=1e-5,
                                           atol=1e-5 * float(Gr.abs().max()))
            assert torch.equal(Gb, Gb.T)
    with pytest.raises(ValueError, match="method must be"):
        ops.channel_gram(x, w, method="syrk")


# ------------------------------------------------------------------------------------------
# output_grams / gram_forms (the moments path's per-output Grams and their forms)
# ------------------------------------------------------------------------------------------


def assert_grams_close(got, ref, rtol=1e-4, atol_frac=1e-5):
    """float32 against a float64 reference: sums of mixed signs, so the absolute floor is a
    fraction of the largest magnitude (as for the damages)."""
    assert got.dtype == torch.float32 and got.shape == ref.shape, (got.dtype, got.shape, ref.shape)
    atol = atol_frac * float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(C=st.integers(1, 40), O=st.integers(1, 70), kh=st.integers(1, 3), kw=st.integers(1, 3),
       linear=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_output_grams_sweep(C, O, kh, kw, linear, seed):
    """Random (not symmetric) blocks: the op computes the contraction as written for every
    pair c <= d and mirrors it (exactly symmetric); O across the 8- and 32-wide blocks of the
    kernel; T = 9 and T = 1 have their own compiled paths, the other tap counts the generic
    one."""
    gen = torch.Generator().manual_seed(seed)
    T = 1 if linear else kh * kw
    blocks = torch.randn(T, T, C, C, generator=gen)
    w = torch.randn(O, C, generator=gen) if linear else torch.randn(O, C, kh, kw, generator=gen)
    got = ops.output_grams(blocks, w)
    assert got.shape == (C, C, O) and got.is_contiguous()
    assert torch.equal(got, got.transpose(0, 1))
    assert_grams_close(got, ops.output_grams_reference(blocks, w))
    # the pairs c > d are not read: changing their blocks changes nothing
    lower = torch.ones(C, C, dtype=torch.bool).tril(-1)
    assert torch.equal(ops.output_grams(torch.where(lower, blocks * 3 + 1, blocks), w), got)


def test_output_grams_are_the_contributions_grams():
    """From the centred im2col Gram of a real input, grams[:, :, o] is the centred Gram of the
    contributions z_c = conv(x[:, c], W[o, c]) (each o by its own grouped conv, in float64)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 7, 9, generator=gen).relu_()
    w = torch.randn(37, 6, 3, 3, generator=gen)
    blocks = _moments._im2col_gram(x, w, (1, 1), (1, 1), (1, 1), centre=True)
    got = ops.output_grams(blocks, w)
    x64, w64 = x.double(), w.double()
    for o in (0, 17, 36):
        z = torch.nn.functional.conv2d(x64, w64[o][:, None], padding=1, groups=6)  # (N, C, H, W)
        z = z.transpose(0, 1).reshape(6, -1)
        z = z - z.mean(dim=1, keepdim=True)
        assert_grams_close(got[:, :, o], z @ z.T)


def test_output_grams_edges():
    gen = torch.Generator().manual_seed(6)
    blocks = torch.randn(9, 9, 5, 5, generator=gen)
    w = torch.randn(11, 5, 3, 3, generator=gen)
    ref = ops.output_grams_reference(blocks, w)
    assert ops.output_grams(blocks[:, :, :0, :0], w[:, :0]).shape == (0, 0, 11)
    assert ops.output_grams(blocks, w[:0]).shape == (5, 5, 0)
    # non-contiguous inputs: the moments path's (C, C, T, T) storage seen as (T, T, C, C), a
    # strided slice, a transposed weight
    cd = blocks.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    assert_grams_close(ops.output_grams(cd, w), ref)
    big = torch.randn(9, 9, 10, 10, generator=gen)
    assert_grams_close(ops.output_grams(big[:, :, ::2, ::2], w),
                       ops.output_grams_reference(big[:, :, ::2, ::2], w))
    wt = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not wt.is_contiguous()
    assert_grams_close(ops.output_grams(blocks, wt), ref)
    # float64 / float16 inputs compute in float32
    assert_grams_close(ops.output_grams(blocks.double(), w.double()), ref)
    h = ops.output_grams(blocks.half(), w.half())
    assert_grams_close(h, ops.output_grams_reference(blocks.half(), w.half()))
    # NaN: a NaN weight of (o, c) reaches exactly the pairs of c at o
    wn = w.clone()
    wn[4, 2, 1, 1] = float("nan")
    g = ops.output_grams(blocks, wn)
    nan = torch.zeros(5, 5, 11, dtype=torch.bool)
    nan[2, :, 4] = nan[:, 2, 4] = True
    assert torch.equal(g.isnan(), nan)
    errors = [((blocks[0], w), r"blocks must be \(T, T, C, C\)"),
              ((blocks[:, :4], w), r"blocks must be \(T, T, C, C\)"),
              ((blocks, w[:, :4]), "weight must have C = 5 input channels"),
              ((blocks, w[:, :, :2]), r"input channels and kh \* kw = T = 9 taps"),
              ((blocks, w[:, :, 0]), "weight must be a conv weight"),
              ((blocks.int(), w), "blocks must be a floating-point tensor"),
              ((blocks, w.int()), "weight must be a floating-point tensor")]
    for args, match in errors:
        with pytest.raises(RuntimeError, match="output_grams: .*" + match):
            ops.output_grams(*args)
    with pytest.raises(ValueError, match="output_grams: runs on the CPU only"):
        ops.output_grams(blocks.to("meta"), w.to("meta"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(C=st.integers(1, 70), O=st.integers(1, 70), K=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1))
def test_gram_forms_sweep(C, O, K, seed):
    """Random Grams, not symmetric: the op reads the upper triangle and takes the lower one as
    its mirror (the reference does the same); masks of every density, all-keep and all-drop."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(C, C, O, generator=gen)
    masks = torch.rand(K, C, generator=gen) < torch.rand(K, 1, generator=gen)
    masks[0] = True
    if K > 1:
        masks[1] = False
    got = ops.gram_forms(g, masks)
    assert got.dtype == torch.float64 and got.shape == (K, O)
    ref = ops.gram_forms_reference(g, masks)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    if K > 1:
        assert bool((got[1] == 0).all())         # no kept channel: no pair


@pytest.mark.parametrize("block", [1 << 22, 500, 1])
def test_forms_by_gemm_in_mask_blocks(block, monkeypatch):
    """The forms off the CPU (one GEMM per block of masks, run here on the CPU) equal the op's
    and the reference's, however many blocks of masks the bound on their product makes
    (500 floats: 1 mask per block of 7 x 9 x 5; 1: as few as possible, still 1)."""
    monkeypatch.setattr(_moments, "_BLOCK", block)
    gen = torch.Generator().manual_seed(23)
    a = torch.randn(9, 9, 5, generator=gen)
    g = a + a.transpose(0, 1)
    masks = torch.rand(7, 9, generator=gen) < 0.5
    masks[0] = False
    got = _moments.forms_by_gemm(g, masks)
    assert got.dtype == torch.float64 and got.shape == (7, 5)
    torch.testing.assert_close(got, ops.gram_forms_reference(g, masks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ops.gram_forms(g, masks), rtol=1e-5, atol=1e-5)
    assert bool((got[0] == 0).all())
    assert _moments.forms_by_gemm(g, masks[:0]).shape == (0, 5)


def test_gram_forms_symmetric_is_the_quadratic_form_and_edges():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(9, 9, 33, generator=gen)
    g = a + a.transpose(0, 1)                             # symmetric: the form itself
    masks = torch.rand(40, 9, generator=gen) < 0.5
    m = masks.double()
    full = torch.einsum("kc,cdo,kd->ko", m, g.double(), m)
    torch.testing.assert_close(ops.gram_forms(g, masks), full, rtol=1e-5, atol=1e-5)
    assert ops.gram_forms(g, masks[:0]).shape == (0, 33)
    assert ops.gram_forms(g[:, :, :0], masks).shape == (40, 0)
    assert bool((ops.gram_forms(g[:0, :0], masks[:, :0]) == 0).all())
    # uint8 masks, non-contiguous grams and masks, float64 / float16 grams
    torch.testing.assert_close(ops.gram_forms(g, masks.to(torch.uint8)), full, rtol=1e-5, atol=1e-5)
    gp = g.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    torch.testing.assert_close(ops.gram_forms(gp, masks[:, :]), full, rtol=1e-5, atol=1e-5)
    wide = torch.rand(40, 18, generator=gen) < 0.5
    torch.testing.assert_close(ops.gram_forms(g, wide[:, ::2]),
                               ops.gram_forms_reference(g, wide[:, ::2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.gram_forms(g.double(), masks), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.gram_forms(g.half(), masks),
                               ops.gram_forms_reference(g.half(), masks), rtol=1e-4, atol=1e-3)
    # more masks than one work item takes (1,024), outputs past a whole tile, wide channels
    big = torch.randn(70, 70, 45, generator=gen)
    many = torch.rand(1100, 70, generator=gen) < torch.rand(1100, 1, generator=gen)
    torch.testing.assert_close(ops.gram_forms(big, many), ops.gram_forms_reference(big, many),
                               rtol=1e-5, atol=1e-4)
    # NaN in the upper triangle reaches exactly the masks that keep both channels; the lower
    # triangle is not read
    gn = g.clone()
    gn[2, 5, 7] = float("nan")
    gn[6, 1, 3] = float("nan")
    nan = ops.gram_forms(gn, masks).isnan()
    want = torch.zeros(40, 33, dtype=torch.bool)
    want[:, 7] = masks[:, 2] & masks[:, 5]
    assert torch.equal(nan, want)
    errors = [((g[0], masks), r"grams must be \(C, C, O\)"),
              ((g[:, :4], masks), r"grams must be \(C, C, O\)"),
              ((g, masks[:, :4]), r"masks must be \(K, C\) with C = 9"),
              ((g, masks.float()), "masks must be bool"),
              ((g, masks.to(torch.uint8) * 2), "uint8 masks must hold only 0 and 1"),
              ((g.int(), masks), "grams must be a floating-point tensor")]
    for args, match in errors:
        with pytest.raises(RuntimeError, match="gram_forms: " + match):
            ops.gram_forms(*args)
    with pytest.raises(ValueError, match="gram_forms: runs on the CPU only"):
        ops.gram_forms(g.to("meta"), masks.to("meta"))


# ------------------------------------------------------------------------------------------
# channel_gram / quadratic_damage
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        dict(N=3, C=7, O=5, H=9, k=3, stride=2, padding=1, dilation=1),   # direct
        dict(N=2, C=11, O=300, H=5, k=1, stride=1, padding=0, dilation=1),  # factored (wide)
        dict(N=2, C=6, O=4, H=10, k=5, stride=1, padding=2, dilation=2),  # dilation
        dict(N=1, C=1, O=1, H=3, k=3, stride=1, padding=1, dilation=1),   # C = 1
    ],
)
@pytest.mark.parametrize("with_scale", [False, True])
def test_channel_gram_and_quadratic_damage(shape, with_scale):
    gen = torch.Generator().manual_seed(23)
    shape = dict(shape)
    geo = {k: shape.pop(k) for k in ("stride", "padding", "dilation")}
    x, w, masks, kw = rand_case(gen, K=40, norm="affine", **shape)
    scale = kw["scale"] if with_scale else None
    G = ops.channel_gram(x, w, scale=scale, **geo)
    Gr = ops.channel_gram_reference(x, w, scale=scale, **geo)
    torch.testing.assert_close(G.double(), Gr, rtol=1e-5, atol=1e-5 * float(Gr.abs().max()))
    assert torch.equal(G, G.T)
    q = ops.quadratic_damage(G, masks)
    assert_damage_close(q, ops.quadratic_damage_reference(Gr, masks))
    # the exact damage at a linear follower output: the same figure as masked_damage
    norm = "affine" if with_scale else "none"
    extra = dict(scale=kw["scale"], shift=kw["shift"]) if with_scale else {}
    assert_damage_close(q, ops.masked_damage_reference(x, w, masks, norm=norm, **extra, **geo))
    assert_damage_close(ops.masked_damage(x, w, masks, norm=norm, **extra, **geo), q.double())


def test_channel_gram_linear_follower():
    gen = torch.Generator().manual_seed(29)
    x, w, masks, _ = rand_case(gen, N=40, C=25, O=12, K=16, linear=True)
    G = ops.channel_gram(x, w)
    Gr = ops.channel_gram_reference(x, w)
    torch.testing.assert_close(G.double(), Gr, rtol=1e-5, atol=1e-5 * float(Gr.abs().max()))
    diag = torch.diagonal(G)
    one_hot = ~torch.eye(25, dtype=torch.bool)  # drop exactly one channel each
    assert_damage_close(ops.masked_damage(x, w, one_hot), diag.double())


# ------------------------------------------------------------------------------------------
# compact_
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_compact_matches_reference_and_keeps_objects(dim):
    gen = torch.Generator().manual_seed(31)
    a = torch.randn(6, 7, 3, generator=gen) if dim != -1 else torch.randn(4, 2, 7, generator=gen)
    size = a.shape[dim]
    keep = torch.tensor(sorted(torch.randperm(size, generator=gen)[:4].tolist()))
    b = a.clone()
    ops.compact_reference_([b], [dim], keep)
    p = torch.nn.Parameter(a.clone())
    ident, data_ptr = id(p), p.data_ptr()
    ops.compact_([p], [dim], keep)
    assert id(p) == ident and isinstance(p, torch.nn.Parameter)
    assert p.data_ptr() != 0 and p.is_contiguous()
    assert torch.equal(p.detach(), b)
    del data_ptr


def test_compact_several_tensors_channels_last_and_shrink():
    gen = torch.Generator().manual_seed(37)
    w = torch.randn(8, 5, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8, generator=gen)
    nxt = torch.randn(4, 8, 3, 3, generator=gen)
    keep = torch.tensor([0, 3, 4, 7])
    want = [w[keep], bias[keep], nxt[:, keep]]
    ops.compact_([w, bias], [0, 0], keep)
    ops.compact_([nxt], [1], keep)
    for got, exp in zip([w, bias, nxt], want):
        assert torch.equal(got, exp)
    assert w.is_contiguous(memory_format=torch.channels_last)  # layout kept, no copy
    assert nxt.untyped_storage().nbytes() == nxt.numel() * 4     # memory really freed


def test_compact_edge_cases():
    t = torch.arange(12.0).view(3, 4)
    ops.compact_([t], [1], torch.arange(4))  # keep everything: unchanged
    assert torch.equal(t, torch.arange(12.0).view(3, 4))
    ops.compact_([t], [1], torch.tensor([], dtype=torch.long))
    assert t.shape == (3, 0)
    ops.compact_([], [], torch.tensor([0]))  # nothing to do
    overlapping = torch.arange(4.0).expand(3, 4)  # stride 0: no in-place packing exists
    ops.compact_([overlapping], [1], torch.tensor([1, 3]))
    assert torch.equal(overlapping, torch.tensor([[1.0, 3.0]] * 3))


@pytest.mark.parametrize(
    "keep,match",
    [
        (torch.tensor([2, 1]), "sorted and unique"),
        (torch.tensor([1, 1]), "sorted and unique"),
        (torch.tensor([0, 9]), r"must lie in \[0, 5\)"),
        (torch.tensor([-1, 2]), r"must lie in \[0, 5\)"),
        (torch.tensor([0.0, 1.0]), "int64"),
        (torch.tensor([[0, 1]]), "1-D int64"),
    ],
)
def test_compact_errors(keep, match):
    with pytest.raises(RuntimeError, match=match):
        ops.compact_([torch.randn(5, 2)], [0], keep)


def test_compact_mismatched_sizes_and_dims():
    with pytest.raises(RuntimeError, match="same size along its dim"):
        ops.compact_([torch.randn(5), torch.randn(6)], [0, 0], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.compact_([torch.randn(5)], [2], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="one dim per tensor"):
        ops.compact_([torch.randn(5)], [0, 0], torch.tensor([0]))


# ------------------------------------------------------------------------------------------
# errors name the argument and the expectation
# ------------------------------------------------------------------------------------------
# grouped conv followers (groups=)
# ------------------------------------------------------------------------------------------


def _grouped_case(gen, N, C, O, G, H, W, k, K, norm):
    x, _, masks, kw = rand_case(gen, N=N, C=C, O=O, H=H, W=W, k=k, K=K, norm=norm)
    w = torch.randn(O, C // G, k, k, generator=gen) / (C // G * k * k) ** 0.5
    return x, w, masks, kw


GROUPED = [
    dict(N=2, C=12, O=8, G=4, H=7, W=7, k=3, stride=1, padding=1),    # ResNeXt-like
    dict(N=1, C=9, O=9, G=3, H=5, W=6, k=1, stride=1, padding=0),     # N = 1, odd widths, 1x1
    dict(N=3, C=10, O=6, G=2, H=9, W=5, k=3, stride=2, padding=0),    # strided, no padding
    dict(N=2, C=8, O=16, G=8, H=6, W=6, k=3, stride=1, padding=1),    # one input per group
]


@pytest.mark.parametrize("norm,post", NORM_POST)
@pytest.mark.parametrize("shape", GROUPED)
def test_masked_damage_grouped_follower(shape, norm, post):
    """Against one masked F.conv2d(groups=G) forward per mask, on both exact paths."""
    gen = torch.Generator().manual_seed(hash((tuple(shape.items()), norm, post)) % 2**31)
    shape = dict(shape)
    geo = {k: shape.pop(k) for k in ("stride", "padding")}
    for K in (1, 7, 64):
        x, w, masks, kw = _grouped_case(gen, K=K, norm=norm, **shape)
        args = dict(norm=norm, post=post, groups=shape["G"], **geo, **kw)
        ref = ops.masked_damage_reference(x, w, masks, **args)
        assert_damage_close(ops.masked_damage(x, w, masks, **args), ref)
        assert_damage_close(ops.masked_damage(x, w, masks, method="fused", **args), ref)
        if post == "none" or norm == "batch":
            assert_damage_close(ops.masked_damage(x, w, masks, method="moments", **args), ref)
    # non-contiguous input (channels last) and a mask of one removed channel
    masks = torch.ones(2, shape["C"], dtype=torch.bool)
    masks[1, shape["C"] - 1] = False
    xc = x.contiguous(memory_format=torch.channels_last)
    assert_damage_close(ops.masked_damage(xc, w, masks, **args),
                        ops.masked_damage_reference(x, w, masks, **args))


@pytest.mark.parametrize("shape", GROUPED)
@pytest.mark.parametrize("with_scale", [False, True])
def test_channel_gram_grouped_follower(shape, with_scale):
    gen = torch.Generator().manual_seed(31)
    shape = dict(shape)
    geo = {k: shape.pop(k) for k in ("stride", "padding")}
    x, w, masks, kw = _grouped_case(gen, K=40, norm="affine", **shape)
    scale = kw["scale"] if with_scale else None
    G = ops.channel_gram(x, w, scale=scale, groups=shape["G"], **geo)
    Gr = ops.channel_gram_reference(x, w, scale=scale, groups=shape["G"], **geo)
    torch.testing.assert_close(G.double(), Gr, rtol=1e-5, atol=1e-5 * float(Gr.abs().max()))
    norm = "affine" if with_scale else "none"
    extra = dict(scale=kw["scale"], shift=kw["shift"]) if with_scale else {}
    assert_damage_close(ops.quadratic_damage(G, masks),
                        ops.masked_damage_reference(x, w, masks, norm=norm, groups=shape["G"],
                                                    **extra, **geo))


@pytest.mark.parametrize(
    "groups,weight,match",
    [
        (0, torch.randn(4, 2, 3, 3), "groups must be a positive integer"),
        (True, torch.randn(4, 2, 3, 3), "groups must be a positive integer"),
        (3, torch.randn(3, 2, 3, 3), r"weight must be \(O, C / groups, kh, kw\) with C and O "
                                     "divisible by groups"),
        (2, torch.randn(4, 3, 3, 3), r"weight shape \[4, 3, 3, 3\] and C = 4"),
        (2, torch.randn(4, 2), "applies to conv followers only"),
    ],
)
def test_grouped_follower_errors(groups, weight, match):
    x = torch.randn(2, 4, 6, 6) if weight.dim() == 4 else torch.randn(2, 4)
    with pytest.raises(ValueError, match=match):
        ops.masked_damage(x, weight, torch.ones(3, 4, dtype=torch.bool), groups=groups)
    with pytest.raises(ValueError, match=match):
        ops.channel_gram(x, weight, groups=groups)


# ------------------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3), torch.ones(5, 4, dtype=torch.bool)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(x=torch.randn(2, 4, 6)), r"x must be \(N, C, H, W\)"),
        (lambda a: a.update(weight=torch.randn(3, 4)), r"weight must be \(O, C, kh, kw\)"),
        (lambda a: a.update(weight=torch.randn(3, 5, 3, 3)), "C = 4"),
        (lambda a: a.update(masks=torch.ones(5, 3, dtype=torch.bool)), r"masks must be \(K, C\) with C = 4"),
        (lambda a: a.update(masks=torch.ones(5, 4)), "masks must be bool"),
        (lambda a: a.update(masks=torch.full((5, 4), 2, dtype=torch.uint8)), "only 0 and 1"),
        (lambda a: a.update(masks=torch.ones(4, dtype=torch.bool)), "masks must be 2-D"),
        (lambda a: a.update(norm="layer"), 'norm must be "none", "affine" or "batch"'),
        (lambda a: a.update(post="gelu"), 'post must be "none" or "relu"'),
        (lambda a: a.update(norm="batch"), r"needs scale and shift, each of shape \(O,\) = \(3,\)"),
        (lambda a: a.update(norm="affine", scale=torch.ones(3), shift=torch.ones(4)),
         r"shift must be 1-D of size O = 3"),
        (lambda a: a.update(scale=torch.ones(3), shift=torch.ones(3)), 'norm="none"'),
        (lambda a: a.update(bias=torch.ones(2)), "bias must be 1-D of size O = 3"),
        (lambda a: a.update(x=torch.randint(0, 3, (2, 4, 6, 6))), "x must be a floating-point"),
        (lambda a: a.update(x=torch.randn(2, 4, 1, 1)), "does not fit the padded input"),
        (lambda a: a.update(stride=0), "stride must be >= 1"),
    ],
)
def test_masked_damage_errors(mutate, match):
    x, w, m = _ok()
    a = dict(x=x, weight=w, masks=m)
    mutate(a)
    x, w, m = a.pop("x"), a.pop("weight"), a.pop("masks")
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.masked_damage(x, w, m, **a)


def test_linear_follower_rejects_conv_arguments():
    with pytest.raises(RuntimeError, match="conv followers only"):
        ops.masked_damage(torch.randn(4, 3), torch.randn(2, 3), torch.ones(1, 3, dtype=torch.bool),
                          stride=2)
    with pytest.raises(RuntimeError, match=r"weight must be \(O, C\) when x is \(N, C\)"):
        ops.masked_damage(torch.randn(4, 3), torch.randn(2, 3, 1, 1), torch.ones(1, 3, dtype=torch.bool))


def test_gram_and_quadratic_errors():
    with pytest.raises(RuntimeError, match=r"gram must be a square \(C, C\)"):
        ops.quadratic_damage(torch.randn(3, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"masks must be \(K, C\) with C = 3"):
        ops.quadratic_damage(torch.randn(3, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="scale must be 1-D of size O = 3"):
        ops.channel_gram(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), scale=torch.ones(4))


def test_cuda_tensors_in_cpu_only_build(monkeypatch):
    """A CPU-only build names the device and says how to fix it (no GPU needed to check)."""
    monkeypatch.setattr(ops, "_BUILD_INFO", {"cuda": False, "torch_version": "x"})

    class FakeCuda:
        device = torch.device("cuda", 0)

    with pytest.raises(RuntimeError, match="on cuda:0, but this build of aofp_ext has no CUDA"):
        ops._check_backend("masked_damage", torch.zeros(1), FakeCuda())


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------


def test_opcheck():
    gen = torch.Generator().manual_seed(41)
    x, w, masks, kw = rand_case(gen, N=2, C=5, O=3, H=6, K=4, norm="batch")
    for norm, post in NORM_POST:
        extra = {k: v for k, v in kw.items() if norm != "none" or k == "bias"}
        torch.library.opcheck(
            torch.ops.aofp.masked_damage.default, (x, w, masks),
            dict(padding=[1, 1], norm=norm, post=post, **extra))
    aff = _relu_affine(gen, 4, 3)
    torch.library.opcheck(torch.ops.aofp.masked_relu_damage.default, (x, w, masks, *aff),
                          dict(padding=[1, 1], bias=kw["bias"]))
    torch.library.opcheck(torch.ops.aofp.channel_gram.default, (x, w), dict(padding=[1, 1]))
    G = ops.channel_gram(x, w, padding=1)
    torch.library.opcheck(torch.ops.aofp.quadratic_damage.default, (G, masks))
    blocks = _moments._im2col_gram(x, w, (1, 1), (1, 1), (1, 1), centre=True)
    torch.library.opcheck(torch.ops.aofp.output_grams.default, (blocks, w))
    torch.library.opcheck(torch.ops.aofp.gram_forms.default, (ops.output_grams(blocks, w), masks))
    torch.library.opcheck(
        torch.ops.aofp.compact_.default, ([torch.randn(5, 3), torch.randn(2, 5)], [0, 1],
                                          torch.tensor([1, 4])),
        test_utils=("test_schema", "test_autograd_registration"))


def test_compiles_with_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(43)
    x, w, masks, _ = rand_case(gen, N=2, C=5, O=3, H=6, K=4)

    def f(x, w, m):
        return ops.masked_damage(x, w, m, padding=1, post="relu").sum()

    eager = f(x, w, masks)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(x, w, masks)
    torch.testing.assert_close(compiled, eager)
