"""The model-level paths with the model on the GPU: a channel cut (compact_ on device tensors,
optimizer state included) equals the masked forward there and on the CPU, and prune() runs end
to end on the device (capture, fused pricing, decisions, cuts, report).

Marker `cuda`: skipped unless a GPU is present and aofp_ext has its CUDA kernels.
``AOFP_CUDA_TEST_DEVICE=cpu`` dry-runs the same logic on the CPU (bench/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _cases import CUDA_TEST_DEVICE as DEVICE
from _cases import cuda_skip_reason
from _nets import CatNet, ProjectionNet, calibrate, random_plan
from torch.utils.data import DataLoader, TensorDataset

import aofp_ext
from aofp_ext.models import lenet5_bn, resnet56

_REASON = cuda_skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(autouse=True)
def float32_math():
    """TF32 convolutions would make the cut and the masked model differ by ~1e-3."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


MODELS = {
    "resnet56": (resnet56, (4, 3, 32, 32)),
    "projection": (ProjectionNet, (4, 3, 8, 8)),
    "cat_flatten": (CatNet, (4, 3, 8, 8)),
}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 rounding through up to 56 layers; on a GPU cuDNN may pick other algorithms
    (Winograd, FFT) for the cut model than for the masked one: 10x looser there. A wrong
    channel anywhere changes the outputs at O(1)."""
    tol = 1e-4 if torch.device(DEVICE).type == "cpu" else 1e-3
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=tol,
                               atol=tol * 0.1 * float(want.abs().max()))


@pytest.mark.parametrize("name", list(MODELS))
def test_cut_on_device_equals_masked_forward(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    calibrate(model, x)
    groups = aofp_ext.channel_groups(model, x)
    plan = random_plan(groups, torch.Generator().manual_seed(len(name)))
    sizes = {g.name: g.size for g in groups}
    assert any(len(k) < sizes[n] for n, k in plan.items())

    model.to(DEVICE)
    xd = x.to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for p in model.parameters():  # one step, so that the momentum buffers live on the device
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    with torch.no_grad():
        want = aofp_ext.masked_forward(model, plan, xd)
        want_cpu = aofp_ext.masked_forward(_cpu_copy(model), plan, x)
    assert want.device.type == torch.device(DEVICE).type and float(want.abs().max()) > 0.1
    ids = {n: id(p) for n, p in model.named_parameters()}

    aofp_ext.prune_channels_(model, plan, opt)
    with torch.no_grad():
        got = model(xd)
    _close(got, want)
    _close(got, want_cpu)
    for n, p in model.named_parameters():
        assert id(p) == ids[n] and p.device.type == torch.device(DEVICE).type, n
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.device == p.device, n
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape and buf.device == p.device, n
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.device.type == torch.device(DEVICE).type
            assert m.running_mean.shape == (m.num_features,)


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu()


NETS = {
    # residual stream coupled through adds; followers conv+BN+ReLU and conv+BN (batch+none)
    "projection": (ProjectionNet, (3, 8, 8), 5),
    # conv followers and a Linear follower after flatten (priced as a conv)
    "lenet5_bn": (lenet5_bn, (1, 28, 28), 10),
}


@pytest.mark.parametrize("name", list(NETS))
def test_prune_on_device_end_to_end(name: str, tmp_path) -> None:
    build, shape, classes = NETS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(96, *shape)
    y = torch.randint(0, classes, (96,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    example = x[:1]
    macs_before, _ = aofp_ext.count_flops(model, example)
    result = aofp_ext.prune(
        model, loader, example_inputs=example, target_flops=0.8, masks_per_step=16,
        thresh=10.0, iters_per_half=1, warmup_iters=0, max_steps=40, device=DEVICE,
        progress=False, out_dir=tmp_path)
    r = result.report
    assert result.model is model and r["device"].startswith(DEVICE)
    assert r["macs_before"] == macs_before
    assert r["stop_reason"] == "target" and r["reached_target"], r["stop_reason"]
    assert r["steps"] >= 1 and r["macs_after"] <= 0.8 * macs_before
    for n, p in model.named_parameters():
        assert p.device.type == torch.device(DEVICE).type, n
    macs, params = aofp_ext.count_flops(model, example.to(DEVICE))
    assert (macs, params) == (r["macs_after"], r["params_after"])
    pruned = {n: sum(len(m["pruned"]) for m in r["history"] if m["layer"] == n)
              for n in r["targets"]}
    assert pruned == {n: r["widths_before"][n] - r["widths_after"][n] for n in r["targets"]}
    assert sum(pruned.values()) > 0
    model.eval()
    with torch.no_grad():
        out = model(x[:8].to(DEVICE))
    assert out.shape == (8, classes) and bool(torch.isfinite(out).all())
    fresh = aofp_ext.load(build(), tmp_path / "model.pt").to(DEVICE).eval()
    with torch.no_grad():
        _close(fresh(x[:8].to(DEVICE)), out)
