"""The CUDA ops against the float64 references and against the CPU ops, on fresh random inputs.

Marker `cuda`: skipped unless a GPU is present and aofp_ext was built with its CUDA kernels.
The test logic itself can be dry-run on the CPU ops (useful on a machine without a GPU):
``AOFP_CUDA_TEST_DEVICE=cpu pytest tests/test_cuda.py`` (GPU-only checks -- memory bounds,
workspace budgets, streams -- skip themselves then).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aofp_ext import ops

from _cases import (CUDA_TEST_DEVICE, assert_damage_close, conv_fits, conv_sweep, cuda_skip_reason,
                    rand_case)

DEVICE = CUDA_TEST_DEVICE
ON_GPU = DEVICE == "cuda"


_REASON = cuda_skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="checks a GPU-only property")

NORM_POST = list(itertools.product(["none", "affine", "batch"], ["none", "relu"]))


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def dev(*ts, device=DEVICE):
    out = [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]
    return out[0] if len(out) == 1 else out


def dev_kw(kw, device=DEVICE):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def batched_reference(x, weight, masks, *, bias=None, stride=1, padding=0, dilation=1,
                      norm="none", scale=None, shift=None, eps=1e-5, post="none",
                      max_elems=1 << 25):
    """float64 reference for large K and N on the inputs' device: Z by one grouped convolution,
    then chunks of masks at once (y_k = y - R_k Z), the same f as the loop reference."""
    x, w = x.double(), weight.double()
    if w.dim() == 2:
        x, w = x[:, :, None, None], w[:, :, None, None]
    N, C = x.shape[:2]
    O = w.shape[0]
    wg = w.transpose(0, 1).reshape(C * O, 1, *w.shape[2:])
    z = F.conv2d(x, wg, None, stride, padding, dilation, groups=C)    # (N, C*O, Ho, Wo)
    z = z.reshape(N, C, O, -1).permute(1, 0, 2, 3).contiguous()        # (C, N, O, P)
    y = z.sum(0)
    if bias is not None:
        y = y + bias.double().view(1, O, 1)
    s = None if scale is None else scale.double().view(1, 1, O, 1)
    t = None if shift is None else shift.double().view(1, 1, O, 1)

    def f(v):  # v: (k, N, O, P)
        if norm == "affine":
            v = v * s + t
        elif norm == "batch":
            mean = v.mean(dim=(1, 3), keepdim=True)
            var = ((v - mean) ** 2).mean(dim=(1, 3), keepdim=True)
            v = (v - mean) / torch.sqrt(var + eps) * s + t
        return torch.relu(v) if post == "relu" else v

    base = f(y[None])
    r = (~masks.to(torch.bool)).double().to(z.device)
    per_mask = max(1, y.numel())
    out = []
    for k0 in range(0, r.shape[0], max(1, max_elems // per_mask)):
        rk = r[k0:k0 + max(1, max_elems // per_mask)]
        d = torch.einsum("kc,cnop->knop", rk, z)
        out.append(((f(y[None] - d) - base) ** 2).sum(dim=(1, 2, 3)))
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def compare(x, w, masks, *, cpu_too=True, rtol=1e-4, ref=None, **args):
    """The op on DEVICE against the float64 reference and against the CPU op."""
    got = ops.masked_damage(*dev(x, w, masks), **dev_kw(args))
    assert got.device.type == torch.device(DEVICE).type
    if ref is None:
        ref = ops.masked_damage_reference(x, w, masks, **args)
    assert_damage_close(got, ref, rtol=rtol)
    if cpu_too:
        cpu = ops.masked_damage(x, w, masks, **args)
        assert_damage_close(got, cpu.double(), rtol=max(rtol, 2e-4))
    return got


# ------------------------------------------------------------------------------------------
# masked_damage
# ------------------------------------------------------------------------------------------

SHAPES = [
    dict(N=4, C=16, O=16, H=8, k=3),                              # ResNet-like
    dict(N=2, C=33, O=17, H=6, k=3),                              # odd widths
    dict(N=1, C=5, O=3, H=7, k=5),                                # N = 1
    dict(N=3, C=70, O=9, H=4, k=1),                               # many channels, 1x1
    dict(N=2, C=12, O=7, H=11, W=9, k=3, stride=2, padding=2, dilation=2),
]


@pytest.mark.parametrize("norm,post", NORM_POST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s.values()))
def test_masked_damage_shapes(shape, norm, post):
    shape = dict(shape)
    geo = dict(stride=shape.pop("stride", 1), padding=shape.pop("padding", shape["k"] // 2),
               dilation=shape.pop("dilation", 1))
    gen = torch.Generator().manual_seed(hash((tuple(shape.items()), norm, post)) % 2**31)
    for K in (1, 7, 130, 300):  # K = 1, one partial tile, more than one tile of 128 masks
        x, w, masks, kw = rand_case(gen, K=K, norm=norm, **shape)
        got = compare(x, w, masks, norm=norm, post=post, **geo, **kw)
        if K > 1:
            assert got[0].item() == 0.0 and got[1].item() > 0.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**conv_sweep(C=40, HW=12, K=200), mode=st.sampled_from(NORM_POST))
def test_masked_damage_random_sweep(N, C, O, H, W, k, stride, padding, dilation, K, mode, bias,
                                    seed):
    norm, post = mode
    if not conv_fits(H, W, k, padding, dilation):
        return
    if norm == "batch" and N == 1 and min(H, W) <= dilation * (k - 1) - 2 * padding + 1:
        return  # a single output position: BN variance 0
    gen = torch.Generator().manual_seed(seed)
    x, w, masks, kw = rand_case(gen, N=N, C=C, O=O, H=H, W=W, k=k, K=K, bias=bias, norm=norm)
    compare(x, w, masks, cpu_too=False, stride=stride, padding=padding, dilation=dilation,
            norm=norm, post=post, **kw)


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_masked_damage_linear_follower(norm, post):
    gen = torch.Generator().manual_seed(7)
    for N, C, O, K in [(64, 50, 10, 33), (1, 3, 2, 5), (5, 130, 7, 260), (300, 512, 20, 64)]:
        if norm == "batch" and N == 1:
            continue  # BN over a single value: variance 0
        x, w, masks, kw = rand_case(gen, N=N, C=C, O=O, K=K, norm=norm, linear=True)
        compare(x, w, masks, norm=norm, post=post, **kw)


def test_batched_reference_matches_loop_reference():
    gen = torch.Generator().manual_seed(2)
    for norm, post in NORM_POST:
        x, w, masks, kw = rand_case(gen, N=2, C=6, O=4, H=7, K=9, norm=norm)
        args = dict(stride=2, padding=1, norm=norm, post=post, **kw)
        torch.testing.assert_close(batched_reference(x, w, masks, max_elems=200, **args),
                                   ops.masked_damage_reference(x, w, masks, **args))
    x, w, masks, kw = rand_case(gen, N=9, C=6, O=4, K=9, norm="batch", linear=True)
    args = dict(norm="batch", post="relu", **kw)
    torch.testing.assert_close(batched_reference(x, w, masks, **args),
                               ops.masked_damage_reference(x, w, masks, **args))


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_masked_damage_large_K(norm, post):
    """K = 4096 masks on a ResNet-56-like layer (32 tiles of 128 masks)."""
    gen = torch.Generator().manual_seed(4096)
    x, w, masks, kw = rand_case(gen, N=8, C=16, O=16, H=16, K=4096, norm=norm)
    args = dict(padding=1, norm=norm, post=post, **kw)
    ref = batched_reference(*dev(x, w, masks), **dev_kw(args))
    compare(x, w, masks, ref=ref, cpu_too=ON_GPU, **args)


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_masked_damage_large_N(norm, post):
    """N = 1024 (65536 output positions per channel, 512 position tiles)."""
    gen = torch.Generator().manual_seed(1024)
    x, w, masks, kw = rand_case(gen, N=1024, C=8, O=6, H=8, K=70, norm=norm)
    args = dict(padding=1, norm=norm, post=post, **kw)
    ref = batched_reference(*dev(x, w, masks), **dev_kw(args))
    compare(x, w, masks, ref=ref, cpu_too=False, **args)


@gpu_only
@pytest.mark.parametrize("norm,post", NORM_POST)
@pytest.mark.parametrize("budget", [(64 << 10, 1), (2048, 1 << 20), (1 << 20, 4096)],
                         ids=["z64k-mask1", "z2k", "mask4k"])
def test_masked_damage_chunked_paths(monkeypatch, norm, post, budget):
    """Small workspace budgets: chunks of positions and of masks give the same damage."""
    gen = torch.Generator().manual_seed(77)
    x, w, masks, kw = rand_case(gen, N=6, C=24, O=5, H=10, K=300, norm=norm)
    args = dict(padding=1, norm=norm, post=post, **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    monkeypatch.setenv("AOFP_CUDA_Z_BYTES", str(budget[0]))
    monkeypatch.setenv("AOFP_CUDA_MASK_BYTES", str(budget[1]))
    compare(x, w, masks, ref=ref, cpu_too=False, **args)


@gpu_only
def test_masked_damage_memory_is_bounded(monkeypatch):
    """The workspace does not grow with K or N beyond the budgets (no K masked outputs)."""
    monkeypatch.setenv("AOFP_CUDA_Z_BYTES", str(1 << 20))
    monkeypatch.setenv("AOFP_CUDA_MASK_BYTES", str(1 << 20))
    gen = torch.Generator().manual_seed(5)
    peaks = []
    for N, K in [(8, 256), (64, 8192)]:
        x, w, masks, kw = rand_case(gen, N=N, C=16, O=16, H=16, K=K, norm="batch")
        x, w, masks, kw = dev(x), dev(w), dev(masks), dev_kw(kw)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ops.masked_damage(x, w, masks, padding=1, norm="batch", post="relu", **kw)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        masked_outputs = K * x.numel() * 4  # what storing the K outputs would take
        assert peaks[-1] < 8 << 20 and peaks[-1] < masked_outputs / 10, peaks
    assert peaks[1] < 4 * peaks[0] + (2 << 20), peaks


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_masked_damage_all_keep_exact_zero_all_drop(norm, post):
    gen = torch.Generator().manual_seed(11)
    x, w, _, kw = rand_case(gen, N=3, C=12, O=7, H=6, K=1, norm=norm)
    masks = torch.stack([torch.ones(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)])
    got = compare(x, w, masks, padding=1, norm=norm, post=post, **kw)
    assert got[0].item() == 0.0 and got[1].item() > 0.0


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_masked_damage_non_contiguous(norm, post):
    gen = torch.Generator().manual_seed(5)
    x, w, masks, kw = rand_case(gen, N=3, C=10, O=6, H=9, K=12, norm=norm)
    args = dict(padding=1, norm=norm, post=post, **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    xd, wd, md = dev(x, w, masks)
    views = [
        xd.contiguous(memory_format=torch.channels_last),
        xd.transpose(2, 3).contiguous().transpose(2, 3),
        torch.stack([xd, torch.zeros_like(xd)], dim=2)[:, :, 0],       # strided channels
        torch.cat([torch.randn_like(xd[:2]), xd])[2:],                  # storage offset
    ]
    wt = wd.transpose(0, 1).contiguous().transpose(0, 1)
    mt = md.t().contiguous().t()
    extra = dev_kw(kw)
    if norm != "none":  # strided per-channel vectors
        extra["scale"] = torch.stack([extra["scale"], extra["scale"]], 1)[:, 0]
        extra["shift"] = torch.stack([extra["shift"], extra["shift"]], 1)[:, 1]
        assert not extra["scale"].is_contiguous()
    for v in views:
        torch.testing.assert_close(v, xd)
        got = ops.masked_damage(v, wt, mt, padding=1, norm=norm, post=post, **extra)
        assert_damage_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm,post", [("none", "none"), ("affine", "relu"), ("batch", "none"),
                                       ("batch", "relu")])
def test_masked_damage_half_inputs(dtype, norm, post):
    """float16/bfloat16 inputs are computed in float32: exact to float32 rounding for the given
    (rounded) inputs, and never worse than PyTorch's own loop in that precision."""
    gen = torch.Generator().manual_seed(17)
    x, w, masks, kw = rand_case(gen, N=2, C=8, O=4, H=6, K=10, norm=norm)
    xr, wr = x.to(dtype), w.to(dtype)
    args = dict(padding=1, norm=norm, post=post, **kw)
    got = ops.masked_damage(*dev(xr, wr, masks), **dev_kw(args))
    assert got.dtype == torch.float32
    ref = ops.masked_damage_reference(xr, wr, masks, **args)        # float64 of the same inputs
    assert_damage_close(got, ref)
    if ON_GPU:  # PyTorch's own error in that precision (half convolutions need a GPU)
        torch_low = ops.masked_damage_reference(*dev(xr, wr, masks), dtype=dtype, **dev_kw(args))
        ours = (got.cpu().double() - ref).abs().max()
        theirs = (torch_low.cpu().double() - ref).abs().max()
        assert ours <= theirs + 1e-6 * float(ref.abs().max()), (float(ours), float(theirs))


def test_masked_damage_matches_nn_batchnorm():
    gen = torch.Generator().manual_seed(3)
    x, w, masks, kw = rand_case(gen, N=4, C=6, O=5, H=7, K=5, norm="batch")
    x, w, masks, kw = dev(x), dev(w), dev(masks), dev_kw(kw)
    bn = torch.nn.BatchNorm2d(5).to(DEVICE).train()
    with torch.no_grad():
        bn.weight.copy_(kw["scale"])
        bn.bias.copy_(kw["shift"])
        f = lambda inp: torch.relu(bn(F.conv2d(inp, w, kw["bias"], padding=1)))
        base = f(x)
        want = torch.stack([((f(x * m.view(1, -1, 1, 1)) - base) ** 2).sum() for m in masks.float()])
    got = ops.masked_damage(x, w, masks, padding=1, norm="batch", post="relu", **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_masked_damage_badly_scaled_batchnorm():
    gen = torch.Generator().manual_seed(13)
    x, w, masks, kw = rand_case(gen, N=4, C=9, O=5, H=8, K=25, norm="batch")
    x = x * 50.0 + 1000.0
    kw["bias"] = torch.full((5,), 3.0e3)
    for post in ("none", "relu"):
        compare(x, w, masks, rtol=2e-3, padding=1, norm="batch", post=post, **kw)


def test_masked_damage_uint8_masks():
    gen = torch.Generator().manual_seed(17)
    x, w, masks, kw = rand_case(gen, N=2, C=8, O=4, H=6, K=10, norm="affine")
    args = dev_kw(dict(padding=1, norm="affine", post="relu", **kw))
    xd, wd, md = dev(x, w, masks)
    assert torch.equal(ops.masked_damage(xd, wd, md.to(torch.uint8), **args),
                       ops.masked_damage(xd, wd, md, **args))


def test_masked_damage_nan_propagates():
    gen = torch.Generator().manual_seed(19)
    for norm, post in NORM_POST:
        x, w, masks, kw = rand_case(gen, N=2, C=6, O=4, H=5, K=4, norm=norm)
        x[0, 2, 1, 1] = float("nan")
        masks[:, 2] = False
        out = ops.masked_damage(*dev(x, w, masks), padding=1, norm=norm, post=post, **dev_kw(kw))
        assert bool(torch.isnan(out).all()), (norm, post, out)


def test_masked_damage_empty_inputs():
    w = dev(torch.randn(3, 4, 3, 3))
    m = dev(torch.ones(6, 4, dtype=torch.bool))
    out = ops.masked_damage(dev(torch.randn(0, 4, 5, 5)), w, m, padding=1)
    assert out.shape == (6,) and out.device.type == w.device.type and bool((out == 0).all())
    out = ops.masked_damage(dev(torch.randn(2, 4, 5, 5)), w, m[:0], padding=1)
    assert out.shape == (0,) and out.dtype == torch.float32
    out = ops.masked_damage(dev(torch.randn(2, 0, 5, 5)), dev(torch.randn(3, 0, 3, 3)),
                            dev(torch.ones(4, 0, dtype=torch.bool)), padding=1)
    assert out.shape == (4,) and bool((out == 0).all())
    assert ops.quadratic_damage(dev(torch.zeros(0, 0)), dev(torch.ones(3, 0, dtype=torch.bool))).shape == (3,)
    assert ops.channel_gram(dev(torch.randn(0, 4, 5, 5)), w, padding=1).abs().sum() == 0


@gpu_only
def test_masked_damage_runs_on_the_current_stream_and_device():
    gen = torch.Generator().manual_seed(23)
    x, w, masks, kw = rand_case(gen, N=4, C=16, O=8, H=8, K=200, norm="batch")
    args = dict(padding=1, norm="batch", post="relu", **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    s = torch.cuda.Stream()
    xd, wd, md = dev(x, w, masks)
    kd = dev_kw(args)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        got = ops.masked_damage(xd, wd, md, **kd)
    s.synchronize()
    assert_damage_close(got, ref)
    if torch.cuda.device_count() > 1:
        d1 = torch.device("cuda", 1)
        got1 = ops.masked_damage(*dev(x, w, masks, device=d1), **dev_kw(args, device=d1))
        assert got1.device == d1
        assert_damage_close(got1, ref)


@gpu_only
def test_masked_damage_mixed_devices_error():
    x, w, masks, _ = rand_case(torch.Generator().manual_seed(1), N=2, C=4, O=3, H=6, K=5)
    with pytest.raises(RuntimeError, match="weight must be on the same device as x"):
        ops.masked_damage(dev(x), w, dev(masks), padding=1)
    with pytest.raises(RuntimeError, match="masks must be on the same device as x"):
        ops.masked_damage(dev(x), dev(w), masks, padding=1)


# ------------------------------------------------------------------------------------------
# channel_gram / quadratic_damage
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        dict(N=3, C=7, O=5, H=9, k=3, stride=2, padding=1, dilation=1),
        dict(N=2, C=11, O=300, H=5, k=1, stride=1, padding=0, dilation=1),
        dict(N=2, C=6, O=4, H=10, k=5, stride=1, padding=2, dilation=2),
        dict(N=1, C=1, O=1, H=3, k=3, stride=1, padding=1, dilation=1),
        dict(N=2, C=150, O=3, H=6, k=3, stride=1, padding=1, dilation=1),   # 64-wide tiles
    ],
    ids=lambda s: "x".join(str(v) for v in s.values()),
)
@pytest.mark.parametrize("with_scale", [False, True])
def test_channel_gram_and_quadratic_damage(shape, with_scale):
    gen = torch.Generator().manual_seed(23)
    shape = dict(shape)
    geo = {k: shape.pop(k) for k in ("stride", "padding", "dilation")}
    x, w, masks, kw = rand_case(gen, K=40, norm="affine", **shape)
    scale = kw["scale"] if with_scale else None
    G = ops.channel_gram(*dev(x, w), scale=dev(scale), **geo)
    Gr = ops.channel_gram_reference(x, w, scale=scale, **geo)
    torch.testing.assert_close(G.cpu().double(), Gr, rtol=1e-5, atol=1e-5 * float(Gr.abs().max()))
    assert torch.equal(G, G.T)
    Gc = ops.channel_gram(x, w, scale=scale, **geo)
    torch.testing.assert_close(G.cpu(), Gc, rtol=1e-5, atol=1e-5 * float(Gc.abs().max()))
    q = ops.quadratic_damage(G, dev(masks))
    assert_damage_close(q, ops.quadratic_damage_reference(Gr, masks))
    norm = "affine" if with_scale else "none"
    extra = dict(scale=kw["scale"], shift=kw["shift"]) if with_scale else {}
    assert_damage_close(q, ops.masked_damage_reference(x, w, masks, norm=norm, **extra, **geo))


def test_channel_gram_linear_follower():
    gen = torch.Generator().manual_seed(29)
    x, w, masks, _ = rand_case(gen, N=40, C=25, O=12, K=16, linear=True)
    G = ops.channel_gram(*dev(x, w))
    Gr = ops.channel_gram_reference(x, w)
    torch.testing.assert_close(G.cpu().double(), Gr, rtol=1e-5, atol=1e-5 * float(Gr.abs().max()))
    one_hot = ~torch.eye(25, dtype=torch.bool)
    assert_damage_close(ops.masked_damage(*dev(x, w, one_hot)), torch.diagonal(Gr))


@pytest.mark.parametrize("C,K", [(1, 3), (13, 17), (300, 1000), (40, 4096)])
def test_quadratic_damage_any_gram(C, K):
    """Any square matrix (not only a Gram matrix; not symmetric): the full form r^T G r."""
    gen = torch.Generator().manual_seed(C + K)
    A = torch.randn(C, C + 3, generator=gen)
    G = A @ A.T + 0.1 * torch.randn(C, C, generator=gen)
    masks = torch.rand(K, C, generator=gen) < torch.rand(K, 1, generator=gen)
    masks[0] = True
    got = ops.quadratic_damage(*dev(G, masks))
    assert got[0].item() == 0.0
    assert_damage_close(got, ops.quadratic_damage_reference(G, masks), rtol=1e-5)
    Gt = dev(G).t().contiguous().t()  # non-contiguous gram, uint8 masks
    assert_damage_close(ops.quadratic_damage(Gt, dev(masks).to(torch.uint8)),
                        ops.quadratic_damage_reference(G, masks), rtol=1e-5)
    assert_damage_close(ops.quadratic_damage(dev(G.half()), dev(masks)),
                        ops.quadratic_damage_reference(G.half(), masks), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# compact_
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8, torch.int64,
                                   torch.bool, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_compact_matches_reference_and_keeps_objects(dtype, dim):
    gen = torch.Generator().manual_seed(31)
    base = torch.randn(9, 7, 5, generator=gen) * 10
    a = base.to(dtype) if dtype != torch.bool else base > 0
    size = a.shape[dim]
    for keep in [torch.tensor(sorted(torch.randperm(size, generator=gen)[:3].tolist())),
                 torch.arange(1, size), torch.arange(size - 1), torch.tensor([size - 1]),
                 torch.tensor([], dtype=torch.long)]:
        want = a.index_select(dim, keep)
        t = dev(a.clone())
        if dtype.is_floating_point:
            t = torch.nn.Parameter(t)
        ident = id(t)
        for keep_dev in (keep, dev(keep)):
            u = dev(a.clone())
            ops.compact_([u], [dim], keep_dev)
            assert torch.equal(u.cpu(), want)
        ops.compact_([t], [dim], keep)
        assert id(t) == ident and t.is_contiguous() and t.device.type == torch.device(DEVICE).type
        assert torch.equal(t.detach().cpu(), want)


def test_compact_several_tensors_channels_last_and_shrink():
    gen = torch.Generator().manual_seed(37)
    w = dev(torch.randn(8, 5, 3, 3, generator=gen)).contiguous(memory_format=torch.channels_last)
    bias = dev(torch.randn(8, generator=gen))
    nxt = dev(torch.randn(4, 8, 3, 3, generator=gen))
    keep = torch.tensor([0, 3, 4, 7])
    want = [w[dev(keep)].cpu(), bias[dev(keep)].cpu(), nxt[:, dev(keep)].cpu()]
    ops.compact_([w, bias], [0, 0], keep)
    ops.compact_([nxt], [1], keep)
    for got, exp in zip([w, bias, nxt], want):
        assert torch.equal(got.cpu(), exp)
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert nxt.untyped_storage().nbytes() == nxt.numel() * 4  # memory really freed


@gpu_only
@pytest.mark.parametrize("temp", [1, 48, 4096])
def test_compact_tiny_temporary(monkeypatch, temp):
    """A temporary of a few bytes: many chunks, each read before it is overwritten."""
    monkeypatch.setenv("AOFP_CUDA_COMPACT_TEMP_BYTES", str(temp))
    gen = torch.Generator().manual_seed(temp)
    for shape, dim in [((6, 50, 7), 1), ((40, 3), 0), ((3, 9, 2, 5), 2), ((5, 33), 1)]:
        a = torch.randn(*shape, generator=gen)
        size = shape[dim]
        keep = torch.tensor(sorted(torch.randperm(size, generator=gen)[: size // 2 + 1].tolist()))
        t = dev(a.clone())
        ops.compact_([t], [dim], keep)
        assert torch.equal(t.cpu(), a.index_select(dim, keep))


@gpu_only
def test_compact_is_in_place_with_a_bounded_temporary(monkeypatch):
    """No second copy of the tensor: the peak extra memory is the temporary (while another view
    shares the storage, so that it is not reallocated)."""
    monkeypatch.setenv("AOFP_CUDA_COMPACT_TEMP_BYTES", str(1 << 20))
    t = dev(torch.randn(256, 256, 256))  # 64 MiB
    alias = t.view(-1)
    keep = torch.arange(0, 256, 2)
    want = t[:, dev(keep)].cpu()
    ptr = t.data_ptr()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ops.compact_([t], [1], keep)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert t.data_ptr() == ptr
    assert extra <= (1 << 20) + (64 << 10), extra
    assert torch.equal(t.cpu(), want)
    del alias


@gpu_only
def test_compact_device_handling():
    keep_cuda = dev(torch.tensor([0, 2]))
    c = torch.randn(4, 3)
    want = c[[0, 2]]
    ops.compact_([c], [0], keep_cuda)  # CPU tensors, keep on the GPU: handled by the CPU kernel
    assert torch.equal(c, want)
    with pytest.raises(RuntimeError, match="separate call"):
        ops.compact_([dev(torch.randn(4)), torch.randn(4)], [0, 0], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="sorted and unique"):
        ops.compact_([dev(torch.randn(5, 2))], [0], torch.tensor([2, 1]))


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------


def test_opcheck():
    gen = torch.Generator().manual_seed(41)
    x, w, masks, kw = rand_case(gen, N=2, C=5, O=3, H=6, K=4, norm="batch")
    x, w, masks, kw = dev(x), dev(w), dev(masks), dev_kw(kw)
    for norm, post in NORM_POST:
        extra = {k: v for k, v in kw.items() if norm != "none" or k == "bias"}
        torch.library.opcheck(torch.ops.aofp.masked_damage.default, (x, w, masks),
                              dict(padding=[1, 1], norm=norm, post=post, **extra))
    torch.library.opcheck(torch.ops.aofp.channel_gram.default, (x, w), dict(padding=[1, 1]))
    G = ops.channel_gram(x, w, padding=1)
    torch.library.opcheck(torch.ops.aofp.quadratic_damage.default, (G, masks))
    torch.library.opcheck(
        torch.ops.aofp.compact_.default,
        ([dev(torch.randn(5, 3)), dev(torch.randn(2, 5))], [0, 1], dev(torch.tensor([1, 4]))),
        test_utils=("test_schema", "test_autograd_registration"))


def test_compiles_with_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(43)
    x, w, masks, _ = rand_case(gen, N=2, C=5, O=3, H=6, K=4)
    x, w, masks = dev(x, w, masks)

    def f(x, w, m):
        return ops.masked_damage(x, w, m, padding=1, post="relu").sum()

    eager = f(x, w, masks)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(x, w, masks)
    torch.testing.assert_close(compiled, eager)
