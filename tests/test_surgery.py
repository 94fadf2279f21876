"""prune_channels_ on every reference model and on hand-written nets: random keep-sets for all
prunable groups, then (a) output == masked_forward of the original, (b) Parameter identity and
optimizer state, (c) MACs as hand-computed, (d) save/load, (e) torch.export."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from _nets import CatNet, FlattenNet, ProjectionNet, calibrate, random_plan

import aofp_ext
from aofp_ext.graph import ChannelGraphError
from aofp_ext.models import lenet5_bn, mobilenet_v2_cifar, resnet56, vgg16_cifar
from aofp_ext.surgery import pruning_record

Plan = dict[str, torch.Tensor]


def _n(plan: Plan, name: str, full: int, lo: int = 0, hi: int | None = None) -> int:
    """Kept channels of group ``name`` in [lo, hi) (all of them if the group is not cut)."""
    hi = full if hi is None else hi
    if name not in plan:
        return hi - lo
    k = plan[name]
    return int(((k >= lo) & (k < hi)).sum())


# ---- hand counts of MACs (batch of one) ------------------------------------------------------


def resnet56_macs(plan: Plan, sizes: dict[str, int]) -> int:
    macs, cin, hw = 32 * 32 * 9 * 3 * 16, 16, 32
    for s, planes in enumerate((16, 32, 64)):
        for i in range(9):
            if s and not i:
                hw //= 2
            w = _n(plan, f"layer{s + 1}.{i}.conv1", planes)
            macs += hw * hw * 9 * (cin * w + w * planes)
            cin = planes
    return macs + 64 * 10


VGG_CONVS = [f"features.{j}.conv" for j in (0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16)]
VGG_HW = (32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2)


def vgg_macs(plan: Plan, sizes: dict[str, int]) -> int:
    macs, cin = 0, 3
    for name, hw in zip(VGG_CONVS, VGG_HW):
        w = _n(plan, name, sizes[name])
        macs, cin = macs + hw * hw * 9 * cin * w, w
    l1 = _n(plan, "linear1", 512)
    return macs + cin * l1 + l1 * 10


def lenet_macs(plan: Plan, sizes: dict[str, int]) -> int:
    c1, c2, f1 = _n(plan, "conv1", 20), _n(plan, "conv2", 50), _n(plan, "fc1", 500)
    return 24 * 24 * 25 * c1 + 8 * 8 * 25 * c1 * c2 + c2 * 16 * f1 + f1 * 10


def mobilenet_macs(model: nn.Module) -> Callable[[Plan, dict[str, int]], int]:
    def count(plan: Plan, sizes: dict[str, int]) -> int:
        width = lambda name: _n(plan, name, sizes[name])  # noqa: E731
        hw, cur = 32, "stem.0"
        macs = hw * hw * 9 * 3 * width(cur)
        for i, blk in enumerate(model.blocks):
            convs = [m for m in blk.block if isinstance(m, nn.Conv2d)]
            expand = len(convs) == 3
            hidden = f"blocks.{i}.block.0" if expand else cur
            out = cur if blk.residual else f"blocks.{i}.block.{6 if expand else 3}"
            hw_out = hw // convs[-2].stride[0]
            if expand:
                macs += hw * hw * width(cur) * width(hidden)
            macs += hw_out * hw_out * width(hidden) * (9 + width(out))  # depthwise, project
            hw, cur = hw_out, out
        return macs + hw * hw * width(cur) * width("head.0") + width("head.0") * 10
    return count


def projection_macs(plan: Plan, sizes: dict[str, int]) -> int:
    s, w1 = _n(plan, "stem.0", 8), _n(plan, "b1.0", 12)
    r, w2 = _n(plan, "b1_out.0", 16), _n(plan, "b2.0", 10)
    return 64 * (9 * 3 * s + 9 * s * w1 + 9 * w1 * r + s * r + 9 * r * w2 + 9 * w2 * r) + r * 5


def cat_macs(plan: Plan, sizes: dict[str, int]) -> int:
    s, a, b = _n(plan, "stem.0", 6), _n(plan, "a.0", 5), _n(plan, "b.0", 7)
    m, f = _n(plan, "mix.0", 9), _n(plan, "fc1", 20)
    c, d = _n(plan, "c.0", 10, 0, 4), _n(plan, "c.0", 10, 4, 10)
    convs = 9 * 3 * s + 9 * s * a + s * b + 9 * (a + b) * m + 9 * m * (c + d) * 2
    return 64 * convs + (c + d) * 16 * f + f * 3


def flatten_macs(plan: Plan, sizes: dict[str, int]) -> int:
    c1, c2, f = _n(plan, "conv1.0", 8), _n(plan, "conv2", 6), _n(plan, "fc1", 12)
    return 256 * 9 * 3 * c1 + 64 * 9 * c1 * c2 + c2 * 16 * f + f * 4


# ---- the cases --------------------------------------------------------------------------------


@dataclass
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    macs: Callable[[nn.Module], Callable[[Plan, dict[str, int]], int]]


CASES = {
    "resnet56": Case(resnet56, (2, 3, 32, 32), lambda m: resnet56_macs),
    "vgg16": Case(vgg16_cifar, (2, 3, 32, 32), lambda m: vgg_macs),
    "lenet5_bn": Case(lenet5_bn, (4, 1, 28, 28), lambda m: lenet_macs),
    "mobilenet_v2": Case(lambda: mobilenet_v2_cifar(width_mult=0.5), (2, 3, 32, 32),
                         mobilenet_macs),
    "projection": Case(ProjectionNet, (4, 3, 8, 8), lambda m: projection_macs),
    "cat_flatten": Case(CatNet, (4, 3, 8, 8), lambda m: cat_macs),
    "view_linear": Case(FlattenNet, (4, 3, 16, 16), lambda m: flatten_macs),
}


@dataclass
class Pruned:
    case: Case
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    plan: Plan
    sizes: dict[str, int]
    expected: torch.Tensor       # masked_forward of the original
    got: torch.Tensor            # the pruned model right after the cut
    ids: dict[str, int]
    macs_before: int


def _tie_state_to_params(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Make every grad and optimizer state tensor a known function of its parameter, so that
    after the cut we can check they were compacted exactly like the parameter."""
    for p in model.parameters():
        p.grad = p.detach() * 5
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.copy_(p.detach() * 2 + 1 if key != "exp_avg_sq" else p.detach() ** 2)


@pytest.fixture(scope="module", params=list(CASES))
def pruned(request) -> Pruned:
    case = CASES[request.param]
    torch.manual_seed(0)
    model = case.build()
    x = torch.randn(case.shape)
    calibrate(model, x)
    if request.param in ("vgg16", "cat_flatten"):
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for p in model.parameters():  # one step, so that the optimizer has state
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    _tie_state_to_params(model, opt)
    groups = aofp_ext.channel_groups(model, x)
    plan = random_plan(groups, torch.Generator().manual_seed(len(request.param)))
    macs_before, _ = aofp_ext.count_flops(model, x[:1])
    with torch.no_grad():
        expected = aofp_ext.masked_forward(model, plan, x)
    ids = {n: id(p) for n, p in model.named_parameters()}
    aofp_ext.prune_channels_(model, plan, opt)
    with torch.no_grad():
        got = model(x)
    return Pruned(case, model, opt, x, plan, {g.name: g.size for g in groups}, expected, got,
                  ids, macs_before)


def test_pruned_output_equals_masked_forward(pruned: Pruned) -> None:
    assert any(len(k) < pruned.sizes[n] for n, k in pruned.plan.items())
    assert pruned.got.shape == pruned.expected.shape
    assert pruned.expected.abs().max() > 0.1
    assert (pruned.got - pruned.expected).abs().max().item() <= 1e-5


def test_groups_and_attributes_shrink(pruned: Pruned) -> None:
    after = {g.name: g for g in aofp_ext.channel_groups(pruned.model, pruned.x)}
    for name, keep in pruned.plan.items():
        assert after[name].size == len(keep)
    for m in pruned.model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)
    assert pruning_record(pruned.model).keep.keys() == pruned.plan.keys()


def test_parameters_state_and_grads_compacted_in_place(pruned: Pruned) -> None:
    model, opt = pruned.model, pruned.optimizer
    assert {n: id(p) for n, p in model.named_parameters()} == pruned.ids
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == set(pruned.ids.values())
    for p in model.parameters():
        if not opt.state[p]:
            continue
        assert torch.equal(p.grad, p.detach() * 5)
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.dim():
                want = p.detach() * 2 + 1 if key != "exp_avg_sq" else p.detach() ** 2
                assert torch.equal(v, want), key


def test_macs_drop_as_hand_computed(pruned: Pruned) -> None:
    count = pruned.case.macs(pruned.model)
    assert pruned.macs_before == count({}, pruned.sizes)
    macs, params = aofp_ext.count_flops(pruned.model, pruned.x[:1])
    assert macs == count(pruned.plan, pruned.sizes) < pruned.macs_before
    assert params == sum(p.numel() for p in pruned.model.parameters())


def test_save_load_roundtrip(pruned: Pruned, tmp_path) -> None:
    path = tmp_path / "pruned.pt"
    aofp_ext.save(pruned.model, path)
    payload = torch.load(path, weights_only=True)
    assert set(payload["keep"]) == set(pruned.plan)
    fresh = pruned.case.build()
    assert aofp_ext.load(fresh, path) is fresh
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(pruned.x), pruned.model(pruned.x), rtol=0, atol=1e-6)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in pruned.model.state_dict().items()}


def test_export_of_pruned_model(pruned: Pruned) -> None:
    exported = torch.export.export(pruned.model, (pruned.x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(pruned.x), pruned.model(pruned.x))


def test_optimizer_steps_after_the_cut(pruned: Pruned) -> None:
    model, opt = pruned.model, pruned.optimizer
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(pruned.x).square().mean().backward()
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(changed) > len(changed) // 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- successive cuts, errors ------------------------------------------------------------------


def test_successive_cuts_compose_and_save(tmp_path) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    model = calibrate(CatNet(), x)
    gen = torch.Generator().manual_seed(3)
    first = random_plan(aofp_ext.channel_groups(model, x), gen)
    with torch.no_grad():
        ref = model(x)  # keep a copy of the original to preview the composed cut
    original = CatNet()
    original.load_state_dict(model.state_dict())
    original.eval()
    aofp_ext.prune_channels_(model, first)
    second = random_plan(aofp_ext.channel_groups(model, x), gen)
    aofp_ext.prune_channels_(model, second)
    record = pruning_record(model)
    composed = {}
    for name in set(first) | set(second):
        k = first.get(name, torch.arange(record.sizes[name]))
        composed[name] = k[second[name]] if name in second else k
        assert torch.equal(record.keep[name], composed[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x), aofp_ext.masked_forward(original, composed, x),
                                   rtol=0, atol=1e-5)
        assert not torch.equal(model(x), ref)
    aofp_ext.save(model, tmp_path / "m.pt")
    fresh = aofp_ext.load(CatNet(), tmp_path / "m.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)


@pytest.fixture
def small():
    x = torch.randn(2, 3, 8, 8)
    model = calibrate(ProjectionNet(), x)
    return model, x, {g.name: g for g in aofp_ext.channel_groups(model, x)}


@pytest.mark.parametrize("keep, message", [
    ([], "is empty"),
    ([0, 12], r"outside \[0, 12\)"),
    ([-1, 3], "outside"),
    ([2, 2, 5], "repeats index 2"),
    ([0.0, 1.0], "integer"),
    ([[0, 1]], "1-D"),
])
def test_bad_keep_sets_raise_before_any_cut(small, keep, message) -> None:
    model, x, groups = small
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ChannelGraphError, match=message):
        aofp_ext.prune_channels_(model, {"b1.0": torch.tensor(keep) if keep else []})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_unknown_and_unprunable_groups_raise(small) -> None:
    model, x, groups = small
    with pytest.raises(ChannelGraphError, match="unknown channel group 'nope'.*b1.0"):
        aofp_ext.prune_channels_(model, {"nope": [0]})
    with pytest.raises(ChannelGraphError, match="'fc' is not prunable: reaches the model output"):
        aofp_ext.prune_channels_(model, {"fc": [0, 1]})


def test_plan_that_empties_a_producer_raises() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = calibrate(CatNet(), x)
    aofp_ext.channel_groups(model, x)
    with pytest.raises(ChannelGraphError, match="leaves module 'c.0' with no channels"):
        aofp_ext.prune_channels_(model, {"c.0": torch.arange(4, 10)})  # c.0 owns 0..3


def test_unsorted_keep_is_a_set_and_list_plans_work(small) -> None:
    model, x, groups = small
    with torch.no_grad():
        ref = aofp_ext.masked_forward(model, {"b2.0": [7, 1, 4]}, x)
    aofp_ext.prune_channels_(model, {"b2.0": [7, 1, 4]})
    assert model.b2[0].out_channels == 3 and model.b2_out[0].in_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)


def test_prune_needs_the_input_shapes() -> None:
    with pytest.raises(ChannelGraphError, match="example_inputs"):
        aofp_ext.prune_channels_(FlattenNet(), {"fc1": [0]})
    model = FlattenNet().eval()
    x = torch.randn(2, 3, 16, 16)
    aofp_ext.prune_channels_(model, {"fc1": [0, 5]}, example_inputs=x)
    assert model.fc1.out_features == 2 and model.fc2.in_features == 2


def test_load_rejects_a_pruned_or_different_model(tmp_path) -> None:
    x = torch.randn(2, 3, 16, 16)
    model = FlattenNet().eval()
    aofp_ext.prune_channels_(model, {"conv2": [1, 2]}, example_inputs=x)
    aofp_ext.save(model, tmp_path / "m.pt")
    with pytest.raises(ChannelGraphError, match="freshly built"):
        aofp_ext.load(model, tmp_path / "m.pt")
    other = FlattenNet()
    other.conv2 = nn.Conv2d(8, 7, 3, padding=1)
    other.fc1 = nn.Linear(7 * 16, 12)
    with pytest.raises(ChannelGraphError, match="'conv2' had 6 channels; the model given has 7"):
        aofp_ext.load(other, tmp_path / "m.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ChannelGraphError, match="not a model saved by aofp_ext.save"):
        aofp_ext.load(FlattenNet(), tmp_path / "other.pt")


def test_unpruned_model_save_load(tmp_path) -> None:
    model = FlattenNet()
    aofp_ext.save(model, tmp_path / "m.pt")
    fresh = aofp_ext.load(FlattenNet(), tmp_path / "m.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values()))
