"""The CUDA build's registration, checked without a GPU: every op has a CUDA kernel registered in
the dispatcher, and the fake (meta) kernels give the right shapes, dtypes and devices for CUDA
tensors, also when traced (make_fx, as torch.compile's AOT stage does).

Runs where the extension was built with its CUDA kernels (a CUDA torch and nvcc at build time).
CI's CUDA configuration sets AOFP_EXPECT_CUDA_BUILD=1, which turns a CPU-only build into a failure
instead of a skip.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import aofp_ext
from aofp_ext import ops

OPS = ("masked_damage", "channel_gram", "quadratic_damage", "compact_")


def _cuda_built() -> bool:
    return bool(aofp_ext.build_info()["cuda"])


if os.environ.get("AOFP_EXPECT_CUDA_BUILD") == "1":
    assert _cuda_built(), f"AOFP_EXPECT_CUDA_BUILD=1 but the extension has no CUDA kernels: {aofp_ext.build_info()}"
pytestmark = pytest.mark.skipif(not _cuda_built(), reason="extension built without CUDA kernels")


def test_build_info_names_the_archs():
    info = aofp_ext.build_info()
    archs = info["cuda_archs"].split(",")
    assert archs and all(a.strip() for a in archs), info
    assert info["nvcc_version"], info


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_every_op_has_a_kernel(name, key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aofp::{name}", key), \
        f"aofp::{name} has no {key} kernel registered"


def _fake_cuda(*shapes_dtypes):
    return [torch.empty(s, dtype=d, device="cuda") for s, d in shapes_dtypes]


def test_fake_kernels_on_cuda_tensors():
    with FakeTensorMode():
        x, w, masks = _fake_cuda(((4, 6, 9, 9), torch.float32), ((5, 6, 3, 3), torch.float32),
                                 ((17, 6), torch.bool))
        d = ops.masked_damage(x, w, masks, padding=1, norm="batch",
                              scale=torch.ones(5, device="cuda"), shift=torch.zeros(5, device="cuda"),
                              post="relu")
        assert d.shape == (17,) and d.dtype == torch.float32 and d.device.type == "cuda"
        g = ops.channel_gram(x, w, padding=1)
        assert g.shape == (6, 6) and g.device.type == "cuda"
        q = ops.quadratic_damage(g, masks)
        assert q.shape == (17,) and q.device.type == "cuda"
        # fp16 input: the damage is float32, as the CUDA kernel returns it
        d16 = ops.masked_damage(x.half(), w.half(), masks)
        assert d16.dtype == torch.float32 and d16.device.type == "cuda"


def test_fake_kernels_trace_with_make_fx_on_cuda():
    def f(x, w, masks):
        g = ops.channel_gram(x, w, padding=1)
        return ops.masked_damage(x, w, masks, padding=1) + ops.quadratic_damage(g, masks)

    with FakeTensorMode():
        x, w, masks = _fake_cuda(((2, 3, 7, 7), torch.float32), ((4, 3, 3, 3), torch.float32),
                                 ((9, 3), torch.bool))
        gm = make_fx(f, tracing_mode="fake")(x, w, masks)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    for name in ("aofp.masked_damage.default", "aofp.channel_gram.default", "aofp.quadratic_damage.default"):
        assert name in targets, targets
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert out.meta["val"].shape == (9,) and out.meta["val"].device.type == "cuda"
