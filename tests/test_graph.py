"""channel_groups, masked_forward and count_flops: the groups found in the reference models and
in hand-written nets, the reasons given for what cannot be pruned, and hand counts of MACs."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _nets import CatNet, FlattenNet, ProjectionNet, TokenNet, calibrate, conv_bn, random_plan

import aofp_ext
from aofp_ext.graph import ChannelGraphError, ChannelSlot, OpaqueModuleWarning
from aofp_ext.models import lenet5_bn, mobilenet_v2_cifar, resnet20, resnet56, vgg16_cifar

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def by_name(model: nn.Module, x: torch.Tensor, **kw) -> dict[str, aofp_ext.ChannelGroup]:
    return {g.name: g for g in aofp_ext.channel_groups(model, x, **kw)}


def prune_matches_preview(model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict:
    """Cut random keep-sets of every prunable group; the output must equal the preview."""
    calibrate(model, x)
    plan = random_plan(aofp_ext.channel_groups(model, x), torch.Generator().manual_seed(seed))
    assert plan
    with torch.no_grad():
        expected = aofp_ext.masked_forward(model, plan, x)
        aofp_ext.prune_channels_(model, plan)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    return plan


# ---- the reference models ---------------------------------------------------------------------


def test_resnet56_groups() -> None:
    groups = by_name(resnet56(), X32)
    prunable = {n for n, g in groups.items() if g.prunable}
    assert prunable == {f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(9)}
    g = groups["layer2.3.conv1"]
    assert g.size == 32 and g.mask_point == "layer2_3_relu1" and g.mask_module == "layer2.3.relu1"
    assert g.producers == (ChannelSlot("layer2.3.conv1", "out", 0, 0, 32),
                           ChannelSlot("layer2.3.bn1", "norm", 0, 0, 32))
    assert g.consumers == (ChannelSlot("layer2.3.conv2", "in", 0, 0, 32),)
    # the residual streams meet the option-A channel padding: not prunable, and why
    for name, pad_in in (("conv1", "layer2.0.shortcut"), ("layer2.0.conv2", "layer2.0.shortcut"),
                         ("layer3.0.conv2", "layer3.0.shortcut")):
        assert not groups[name].prunable
        assert "pads the channel dim" in groups[name].reason and pad_in in groups[name].reason
    stream = groups["layer3.0.conv2"]
    assert {s.module for s in stream.producers if s.role == "out"} == {
        f"layer3.{i}.conv2" for i in range(9)}
    assert {s.module for s in stream.consumers} == {f"layer3.{i}.conv1" for i in range(1, 9)} | {
        "linear"}
    assert groups["@x"].reason == "model input 'x'"
    assert groups["linear"].reason == "reaches the model output"


def test_vgg16_groups() -> None:
    groups = aofp_ext.channel_groups(vgg16_cifar(), X32)
    prunable = [g for g in groups if g.prunable]
    assert [g.size for g in prunable] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512,
                                          512, 512, 512]
    assert all(g.mask_module == g.name.replace(".conv", ".relu") for g in prunable[:13])
    assert prunable[12].consumers == (ChannelSlot("linear1", "in", 0, 0, 512),)
    assert prunable[13].name == "linear1" and prunable[13].mask_module == "relu"


def test_lenet_flatten_blocks() -> None:
    groups = by_name(lenet5_bn(), torch.randn(2, 1, 28, 28))
    assert groups["conv2"].consumers == (ChannelSlot("fc1", "in", 0, 0, 50, block=16),)
    assert groups["fc1"].prunable and groups["fc1"].mask_module == "relu3"


def test_mobilenet_depthwise_and_residual_streams() -> None:
    groups = by_name(mobilenet_v2_cifar(width_mult=0.5), X32)
    hidden = groups["blocks.2.block.0"]
    assert [(s.module, s.role) for s in hidden.producers] == [
        ("blocks.2.block.0", "out"), ("blocks.2.block.1", "norm"),
        ("blocks.2.block.3", "depthwise"), ("blocks.2.block.4", "norm")]
    assert hidden.mask_module == "blocks.2.block.5"  # after the depthwise conv's BN and ReLU6
    stream = groups["blocks.1.block.6"]  # blocks 1 and 2 share a residual stream
    assert stream.prunable and stream.mask_point is None
    assert [s.module for s in stream.producers if s.role == "out"] == [
        "blocks.1.block.6", "blocks.2.block.6"]
    assert groups["stem.0"].producers[2] == ChannelSlot("blocks.0.block.0", "depthwise", 0, 0, 16)


# ---- hand-written nets: cat, projection shortcuts, flatten/view, sharing, SE ----------------


def test_cat_offsets_and_flatten_blocks() -> None:
    groups = by_name(CatNet(), torch.randn(2, 3, 8, 8))
    assert groups["b.0"].consumers == (ChannelSlot("mix.0", "in", 5, 0, 7),)
    cd = groups["c.0"]  # cat([c, d]) + e: one group of 10, c and d at offsets 0 and 4
    assert cd.size == 10 and cd.mask_point is None
    assert [(s.module, s.group_start, s.length) for s in cd.producers if s.role == "out"] == [
        ("c.0", 0, 4), ("d.0", 4, 6), ("e.0", 0, 10)]
    assert cd.consumers == (ChannelSlot("fc1", "in", 0, 0, 4, 16),
                            ChannelSlot("fc1", "in", 64, 4, 6, 16))
    assert groups["fc1"].producers[1] == ChannelSlot("bn_fc", "norm", 0, 0, 20)


def test_projection_shortcut_stream_is_prunable() -> None:
    model = ProjectionNet()
    groups = by_name(model, torch.randn(2, 3, 8, 8))
    stream = groups["b1_out.0"]
    assert stream.prunable and {s.module for s in stream.producers} == {
        "b1_out.0", "b1_out.1", "b1_short.0", "b1_short.1", "b2_out.0", "b2_out.1"}
    plan = prune_matches_preview(model, torch.randn(4, 3, 8, 8), seed=5)
    assert model.b1_short[0].out_channels == model.b2_out[0].out_channels == len(
        plan["b1_out.0"]) == model.fc.in_features


def test_view_into_linear() -> None:
    groups = by_name(FlattenNet(), torch.randn(2, 3, 16, 16))
    assert groups["conv2"].consumers == (ChannelSlot("fc1", "in", 0, 0, 6, block=16),)
    assert groups["conv2"].mask_point == "relu_1"
    prune_matches_preview(FlattenNet(), torch.randn(3, 3, 16, 16), seed=2)


class SharedNet(nn.Module):
    """One conv applied to two branches: its input dim couples the branches' channels."""

    def __init__(self) -> None:
        super().__init__()
        self.s1, self.s2, self.shared = conv_bn(3, 6), conv_bn(3, 6, k=1), nn.Conv2d(6, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y = self.shared(F.relu(self.s1(x))) + self.shared(F.relu(self.s2(x)))
        return self.head(y.mean((2, 3)))


class SENet(nn.Module):
    """Squeeze-and-excitation: a (N, C, 1, 1) gate multiplies the (N, C, H, W) features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.reduce, self.expand = conv_bn(3, 8), nn.Conv2d(8, 3, 1), nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * gate).flatten(1)


def test_shared_module_couples_its_inputs() -> None:
    groups = by_name(SharedNet(), torch.randn(2, 3, 8, 8))
    assert "s2.0" not in groups  # coupled into the group of s1
    assert {s.module for s in groups["s1.0"].producers if s.role == "out"} == {"s1.0", "s2.0"}
    prune_matches_preview(SharedNet(), torch.randn(4, 3, 8, 8), seed=1)


def test_squeeze_excitation_gate_is_coupled() -> None:
    groups = by_name(SENet(), torch.randn(2, 3, 8, 8))
    g = groups["conv.0"]
    assert {s.module for s in g.producers if s.role == "out"} == {"conv.0", "expand"}
    assert {s.module for s in g.consumers} == {"reduce", "out"}
    assert groups["reduce"].prunable
    prune_matches_preview(SENet(), torch.randn(4, 3, 8, 8), seed=3)


# ---- what is not prunable, and why -------------------------------------------------------------


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = conv_bn(3, 8), conv_bn(6, 8), conv_bn(8, 8), conv_bn(8, 6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.dw2 = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # channel multiplier 2
        self.gn = nn.GroupNorm(2, 12)
        self.e, self.f = conv_bn(12, 4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.relu(self.b(y[:, :6]))          # a channel slice at bounds fixed in code
        y = F.relu(self.c(torch.softmax(y, 1)))
        y = self.grouped(F.relu(self.d(y)))
        y = self.gn(self.dw2(y))
        return self.f(F.relu(self.e(y)).transpose(2, 3))


def test_reasons_name_the_op() -> None:
    groups = by_name(Odd(), torch.randn(2, 3, 8, 8))
    reason = {n: g.reason for n, g in groups.items()}
    assert "'getitem'" in reason["a.0"] and "slices the channel dim at bounds fixed" in reason["a.0"]
    assert "'softmax'" in reason["b.0"]
    # the grouped conv's input keeps equal counts per conv group; the channel multiplier conv
    # (one input channel per group) can only keep everything
    assert groups["d.0"].prunable and groups["d.0"].granularity == 2
    assert "module 'dw2' (Conv2d) has one channel per group (6 groups)" in reason["grouped"]
    assert "module 'gn' (GroupNorm) is a group norm (num_groups=2)" in reason["dw2"]
    assert groups["e.0"].prunable  # a transpose of spatial dims keeps the channels apart
    assert [n for n, g in groups.items() if g.prunable] == ["c.0", "d.0", "e.0"]  # softmax feeds
    prune_matches_preview(Odd(), torch.randn(4, 3, 8, 8))                  # c.0, its output is plain


def test_tied_weights_are_not_cut() -> None:
    model = nn.Sequential(conv_bn(3, 4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model[4].weight = model[2].weight
    groups = by_name(model, torch.randn(2, 3, 8, 8))
    assert "modules '2' and '4' share a parameter" in groups["0.0"].reason
    assert not groups["2"].prunable and not groups["4"].prunable


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b, self.c = conv_bn(3, 4), Gate(), conv_bn(4, 5), conv_bn(5, 2)

    def forward(self, x):
        return self.c(F.relu(self.b(self.gate(F.relu(self.a(x))))))


def test_untraceable_submodule_becomes_an_opaque_leaf() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(OpaqueModuleWarning, match=r"'gate': torch.fx cannot trace it at .*"
                                                  r"if x.sum\(\) > 0:"):
        groups = by_name(Untraceable(), x)
    assert "module 'gate' (Gate) is made an opaque leaf: torch.fx cannot" in groups["a.0"].reason
    assert groups["b.0"].prunable and not groups["a.0"].prunable
    with pytest.warns(OpaqueModuleWarning):
        prune_matches_preview(Untraceable(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit leaf is no surprise: no warning
        groups = by_name(Untraceable(), x, leaf_modules=(Gate,))
    assert "module 'gate' (Gate) is a module type that aofp_ext does not follow" in (
        groups["a.0"].reason)


class UntraceableRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 4)

    def forward(self, x):
        y = self.a(x)
        return y if y.sum() > 0 else -y  # in the model's own forward: nothing to make a leaf


def test_untraceable_forward_and_bad_inputs_raise_channel_graph_error() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ChannelGraphError, match=r"fails in the forward of UntraceableRoot at "
                                                r".*return y if y.sum\(\) > 0 else -y"):
        aofp_ext.channel_groups(UntraceableRoot(), x)
    with pytest.raises(ChannelGraphError, match=r"running Sequential on the example inputs "
                                                r"\(shapes \[\(2, 5, 8, 8\)\]\) failed"):
        aofp_ext.channel_groups(conv_bn(3, 4), torch.randn(2, 5, 8, 8))


# ---- masked_forward ------------------------------------------------------------------------------


def test_masked_forward_leaves_the_model_alone() -> None:
    model = calibrate(resnet20(), X32)
    groups = by_name(model, X32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(aofp_ext.masked_forward(model, {}, X32), model(X32))
        out = aofp_ext.masked_forward(model, {"layer1.1.conv1": [0, 3, 5]}, X32)
    assert not torch.equal(out, model(X32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert groups["layer1.1.conv1"].size == 16 and model.layer1[1].conv1.out_channels == 16


def test_masked_forward_zeroes_at_the_mask_point() -> None:
    model = calibrate(vgg16_cifar(), X32)
    keep = torch.arange(0, 128, 2)
    relu = model.features[4].relu
    mask = torch.zeros(128)
    mask[keep] = 1
    handle = relu.register_forward_hook(lambda m, i, out: out * mask.view(1, -1, 1, 1))
    with torch.no_grad():
        manual = model(X32)
        handle.remove()
        torch.testing.assert_close(
            aofp_ext.masked_forward(model, {"features.4.conv": keep}, X32), manual,
            rtol=0, atol=0)


def test_analysis_does_not_touch_a_training_model() -> None:
    model = resnet20().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aofp_ext.channel_groups(model, X32)
    aofp_ext.count_flops(model, X32)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- count_flops ------------------------------------------------------------------------------


def resnet_hand_counts(n: int) -> tuple[int, int]:
    macs = 32 * 32 * 9 * 3 * 16 + 64 * 10
    params = 3 * 16 * 9 + 2 * 16 + 64 * 10 + 10
    cin = 16
    for planes, hw in ((16, 32), (32, 16), (64, 8)):
        for _ in range(n):
            macs += hw * hw * 9 * (cin * planes + planes * planes)
            params += 9 * (cin * planes + planes * planes) + 4 * planes
            cin = planes
    return macs, params


def test_count_flops_hand_counts() -> None:
    assert aofp_ext.count_flops(resnet56(), X32[:1]) == resnet_hand_counts(9)
    assert resnet_hand_counts(9)[0] == 125_485_696  # "about 125 M MACs"
    assert aofp_ext.count_flops(resnet20(), X32[:1]) == resnet_hand_counts(3)
    assert aofp_ext.count_flops(resnet20(), X32)[0] == 2 * resnet_hand_counts(3)[0]
    # LeNet-5: 24*24*20*25 + 8*8*50*20*25 + 800*500 + 500*10
    assert aofp_ext.count_flops(lenet5_bn(), torch.zeros(1, 1, 28, 28)) == (
        2_293_000, 500 + 40 + 25_000 + 100 + 400_500 + 5_010)
    widths = (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    hw = (32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2)
    vgg = sum(h * h * 9 * a * b for h, a, b in zip(hw, widths, widths[1:])) + 512 * 512 + 5120
    assert aofp_ext.count_flops(vgg16_cifar(), X32[:1])[0] == vgg == 313_463_808


def test_count_flops_depthwise() -> None:
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1))
    assert aofp_ext.count_flops(m, torch.zeros(1, 8, 5, 5)) == (25 * 8 * 9 + 25 * 4 * 8,
                                                                8 * 9 + 8 + 32 + 4)


def test_group_names_are_stable_across_cuts() -> None:
    model = calibrate(mobilenet_v2_cifar(width_mult=0.5), X32)
    before = [g.name for g in aofp_ext.channel_groups(model, X32)]
    aofp_ext.prune_channels_(model, {"blocks.3.block.6": torch.arange(0, 16, 3),
                                     "blocks.5.block.0": [1, 2]})
    after = aofp_ext.channel_groups(model, X32)
    assert [g.name for g in after] == before
    sizes = {g.name: g.size for g in after}
    assert sizes["blocks.3.block.6"] == 6 and sizes["blocks.5.block.0"] == 2
    assert re.fullmatch(r"blocks\.\d+\.block\.\d+", before[5])


# ---- constructs of torchvision / timm models (issue 14), on tiny hand-written nets ------------


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: F.batch_norm on the module's own attributes, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return F.relu(x)


class FLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FConv(nn.Conv2d):
    def forward(self, x):  # timm's Conv2dSame pads, then calls F.conv2d with its own weight
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = FConv(3, 8, 3), BNAct(8)
        self.c2, self.n2 = nn.Conv2d(8, 6, 3, padding=1), BNAct(6)
        self.c3, self.n3 = nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5)
        self.fc = FLinear(5, 3)

    def forward(self, x):
        y = self.n2(self.c2(self.n1(self.c1(x))))
        y = self.n3(self.c3(y))  # below: batch norm with a weight computed in the forward
        y = F.batch_norm(y, self.n3.running_mean, self.n3.running_var, self.n3.weight * 2)
        return self.fc(y.mean((2, 3)))


def test_functional_norm_linear_and_conv_on_module_attributes() -> None:
    x = torch.randn(2, 3, 8, 8)
    groups = by_name(Functional(), x)
    g = groups["c1"]
    assert g.prunable and g.mask_point == "relu" and g.mask_module is None
    assert g.producers == (ChannelSlot("c1", "out", 0, 0, 8), ChannelSlot("n1", "norm", 0, 0, 8))
    assert g.consumers == (ChannelSlot("c2", "in", 0, 0, 8),)
    assert groups["c2"].prunable and groups["c2"].consumers == (ChannelSlot("c3", "in", 0, 0, 6),)
    assert "'batch_norm' (fx node 'batch_norm_2') takes its weight from something other than " \
           "a module's 'weight' attribute" in groups["c3"].reason
    assert groups["fc"].reason == "reaches the model output"
    model = Functional()
    prune_matches_preview(model, x)
    assert model.n1.num_features == model.c1.out_channels == model.c2.in_channels < 8 or (
        model.n2.num_features == model.c2.out_channels < 6)


class GroupedBlock(nn.Module):
    """ResNeXt: 1x1 conv, grouped 3x3 conv, 1x1 conv; and a grouped conv fed by a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 8, 1), conv_bn(8, 12, 3)
        self.b[0] = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)
        self.c = conv_bn(12, 6, 1)
        self.d, self.e = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 2, 1)
        self.f = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.relu(self.c(F.relu(self.b(y))))
        return self.f(torch.cat([self.d(y), self.e(y)], 1))


def test_grouped_conv_keeps_equal_counts_per_conv_group() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    groups = by_name(GroupedBlock(), x)
    assert groups["a.0"].prunable and groups["a.0"].granularity == 4
    assert groups["b.0"].prunable and groups["b.0"].granularity == 4
    assert groups["c.0"].prunable and groups["c.0"].granularity == 1
    assert "splits channels into 2 equal parts that do not span one whole channel group" in (
        groups["d"].reason)
    model = GroupedBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    plan = {"a.0": [0, 3, 5, 6], "b.0": [1, 2, 4, 5, 6, 8, 9, 11]}  # 1 per part of 2; 2 of 3
    calibrate(model, x)
    with torch.no_grad():
        expected = aofp_ext.masked_forward(model, plan, x)
    aofp_ext.prune_channels_(model, plan, opt)
    assert model.b[0].weight.shape == (8, 1, 3, 3) and model.b[0].groups == 4
    assert opt.state[model.b[0].weight]["momentum_buffer"].shape == (8, 1, 3, 3)
    with torch.no_grad():
        # the SGD step on sum() makes outputs of several hundred, whose float32 sums round
        # to ~1e-7 of that scale, also where an output is small (a wrong cut is off by O(1))
        scale = float(expected.abs().max())
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5 + 1e-6 * scale)
    prune_matches_preview(GroupedBlock(), x, seed=3)
    bad = {"a.0": [0, 1, 3]}
    for call in (lambda m: aofp_ext.masked_forward(m, bad, x),
                 lambda m: aofp_ext.prune_channels_(m, bad, example_inputs=x)):
        with pytest.raises(ChannelGraphError, match=r"keep-set of 'a.0' must keep the same "
                           r"number of channels in each of its 4 parts of 2 channels .* keeps "
                           r"\[2, 1, 0, 0\]"):
            call(GroupedBlock())


class Branches(nn.Module):
    """chunk into branches and cat back (GhostNet / CSP style), a split and slices."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(4, 4), conv_bn(4, 6)
        self.d, self.e = conv_bn(14, 6), conv_bn(6, 4)
        self.f, self.g = conv_bn(3, 4), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y1, y2 = F.relu(self.a(x)).chunk(2, dim=1)      # equal parts: a granularity rule
        y = torch.cat([y1, F.relu(self.b(y1)), F.relu(self.c(y2))], 1)
        y = F.relu(self.d(y))
        u, v = torch.split(y, [2, 4], dim=1)             # sizes fixed in code
        y = torch.cat([u, v], 1)[:, :100]                # a slice past the end: the whole tensor
        z = F.relu(self.e(y))[:, 1:]                     # a slice fixed in code
        return self.g(torch.cat([F.relu(self.f(z[:, :, ::2, ::2])), z[:, :2, ::2, ::2]], 1))


def test_chunk_split_and_slices() -> None:
    x = torch.randn(2, 3, 8, 8)
    groups = by_name(Branches(), x)
    assert groups["a.0"].prunable and groups["a.0"].granularity == 2
    assert {(s.module, s.start, s.group_start, s.length) for s in groups["a.0"].consumers} == {
        ("b.0", 0, 0, 4), ("c.0", 0, 4, 4), ("d.0", 0, 0, 4)}
    assert groups["b.0"].prunable and groups["c.0"].prunable
    assert "'split' (fx node 'split') splits the channel dim into parts of sizes fixed in code " \
           "([2, 4])" in groups["d.0"].reason
    assert "slices the channel dim at bounds fixed in code" in groups["e.0"].reason
    assert groups["f.0"].prunable
    prune_matches_preview(Branches(), x)
    for seed in range(3):
        prune_matches_preview(Branches(), torch.randn(3, 3, 8, 8), seed=seed)


def drop_path(x, p: float = 0.2, training: bool = False):
    """timm's drop_path: a random per-sample mask made with ``new_empty`` in training mode."""
    if p == 0.0 or not training:
        return x
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * mask.div_(1 - p)


class DropPath(nn.Module):
    def forward(self, x):
        return drop_path(x, 0.2, self.training)


class SEBlock(nn.Module):
    """Residual block with DropPath, SE with mean / amax pooling and a hard-sigmoid gate written
    out (timm's hard_sigmoid), and an interpolate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c, self.d = conv_bn(8, 6), nn.Conv2d(6, 2, 1)
        self.drop = DropPath()

    def forward(self, x):
        y = F.relu(self.a(x))
        z = F.relu(self.b(y))
        s = z.mean((2, 3), keepdim=True) + z.amax((2, 3), keepdim=True)
        z = z * (F.relu6(self.se2(F.relu(self.se1(s))) + 3.0) / 6.0)
        y = y + self.drop(z)
        y = F.interpolate(F.relu(self.c(y)), scale_factor=2.0, mode="bilinear")
        return self.d(y)


def test_drop_path_se_gates_and_interpolate() -> None:
    x = torch.randn(2, 3, 8, 8)
    for training in (False, True):  # traced in either mode: DropPath's mask is not a channel op
        groups = by_name(SEBlock().train(training), x)
        assert groups["a.0"].prunable and {s.module for s in groups["a.0"].producers if
                                           s.role == "out"} == {"a.0", "b.0", "se2"}
        assert groups["se1"].prunable and groups["c.0"].prunable
    prune_matches_preview(SEBlock(), x)


def test_stochastic_depth_of_torchvision() -> None:
    ops = pytest.importorskip("torchvision.ops")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = conv_bn(3, 6), conv_bn(6, 6), nn.Conv2d(6, 2, 1)
            self.sd = ops.StochasticDepth(0.2, "row")

        def forward(self, x):
            y = F.relu(self.a(x))
            return self.c(y + self.sd(F.relu(self.b(y))))

    x = torch.randn(2, 3, 8, 8)
    groups = by_name(Block(), x)
    assert groups["a.0"].prunable  # the residual stream, through stochastic_depth
    assert {s.module for s in groups["a.0"].producers if s.role == "out"} == {"a.0", "b.0"}
    prune_matches_preview(Block(), x)


def test_the_search_takes_groups_with_a_granularity_and_the_criteria_skip_them() -> None:
    from aofp_ext.pricing import select_targets

    model = GroupedBlock()
    groups = aofp_ext.channel_groups(model, torch.randn(2, 3, 8, 8))
    # the AOFP search keeps equal counts per part (LayerSearch(parts=granularity))
    assert [g.name for g in select_targets(groups, "all", model)] == ["a.0", "b.0", "c.0"]
    assert [g.name for g in select_targets(groups, ["c.0", "a.0"], model)] == ["c.0", "a.0"]
    # the criteria rank channels one by one: not these groups
    assert [g.name for g in select_targets(groups, "all", model, search_parts=False)] == ["c.0"]
    with pytest.raises(ValueError, match=r"channel group 'a.0': its keep-set must keep equal "
                                         r"counts in equal parts .* \(granularity 4\)"):
        select_targets(groups, ["c.0", "a.0"], model, search_parts=False)


# ---- channels-last maps and tokens ---------------------------------------------------------------


def test_tokens_and_channels_last_are_followed() -> None:
    """Linears over tokens and channels-last maps, ``permute`` / ``transpose`` / ``reshape``
    moving the channel dim, a class-token ``[:, 0]``: the MLP hidden groups are prunable and cut
    exactly; LayerNorm over the channels and a layer scale make the residual streams not
    prunable, with reasons naming them."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    groups = by_name(TokenNet(), x)
    assert [n for n, g in groups.items() if g.prunable] == ["fc1", "fc3", "pw1"]
    assert all(groups[n].spatial for n in ("fc1", "fc3", "pw1"))
    assert "module 'norm' (LayerNorm) normalises over the channel dim" in groups["embed"].reason
    assert "tensor attribute 'scale'" in groups["fc4"].reason
    assert {(s.module, s.role) for s in groups["pw1"].producers} == {("pw1", "out")}
    assert {(s.module, s.role) for s in groups["pw1"].consumers} == {("pw2", "in")}
    model = TokenNet()
    with torch.no_grad():
        full = model(x)
        plan = prune_matches_preview(model, x, seed=4)
    assert set(plan) == {"fc1", "fc3", "pw1"}
    assert (model.fc1.out_features, model.fc3.out_features, model.pw1.out_features) == tuple(
        len(plan[n]) for n in ("fc1", "fc3", "pw1"))
    assert not torch.allclose(model(x), full)  # the cut changed the output: the masks mattered


class WrongDims(nn.Module):
    """Ops that read the channels along the wrong dim."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv1d(3, 6, 1)
        self.lin, self.d = nn.Linear(4, 5), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 1)                 # channels-last ...
        y = F.max_pool2d(y, 2)                            # ... pooled over W and C
        z = self.b(self.a(x).permute(0, 2, 1, 3))         # a conv reading H as channels
        u = self.lin(self.c(x.flatten(2))[..., :4])       # a Linear over positions, not channels
        return y.sum() + z.sum() + u.sum() + self.d(self.a(x)).sum()


def test_channel_dim_mismatches_are_not_followed() -> None:
    groups = by_name(WrongDims(), torch.randn(2, 3, 8, 8))
    reason = groups["a"].reason
    assert "works over dims after dim 1, but the channels are in dim 3" in reason
    assert "is a conv, but the channels are in dim 2" in reason
    assert "is a Linear over a dim that is not the channel dim" in groups["c"].reason


def test_flops_count_attention() -> None:
    """count_flops counts what nn.MultiheadAttention does (its inference fast path is one fused
    op): projections, scores and the weighted sum."""
    e, t, n = 16, 5, 2
    model = nn.MultiheadAttention(e, 2, batch_first=True)
    x = torch.randn(n, t, e)

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = model

        def forward(self, x):
            return self.att(x, x, x, need_weights=False)[0]

    want = n * (4 * t * e * e + 2 * t * t * e)
    assert aofp_ext.count_flops(Self(), x)[0] == want
