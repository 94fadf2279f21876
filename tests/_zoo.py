"""The model zoo of tests/test_zoo.py and bench/zoo.py: torchvision's classification and
segmentation models and a list of timm CNNs, built with random weights, and the exactness check of
a random cut of every prunable group (cut in place, compared with ``masked_forward``)."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

import aofp_ext
from aofp_ext.graph import OpaqueModuleWarning

#: timm CNNs across the families of issue 14 (ResNet/ResNeXt/SE, RegNet, EfficientNet, MobileNet,
#: MNASNet, FBNet, GhostNet, RexNet, DenseNet, DLA, DPN, HRNet, CSP, RepVGG, ConvNeXt, Res2Net,
#: VGG, and a few more), small variants where a family has them.
TIMM_MODELS = (
    "resnet18", "resnet26d", "resnet50d", "seresnet50", "resnext26ts", "seresnext26d_32x4d",
    "resnext50_32x4d", "ecaresnet26t", "skresnet18", "gernet_s",
    "regnetx_002", "regnety_002", "regnetx_004",
    "efficientnet_b0", "efficientnet_lite0", "efficientnetv2_rw_t", "tinynet_a",
    "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100", "lcnet_050",
    "mnasnet_100", "spnasnet_100", "fbnetc_100", "ghostnet_100", "rexnet_100", "mixnet_s",
    "densenet121", "dla34", "dla46_c", "dpn68", "hrnet_w18_small",
    "cspresnet50", "cspdarknet53", "darknet53",
    "repvgg_a0", "repvgg_b0",
    "convnext_atto", "convnext_nano",
    "res2net50_26w_4s", "res2next50",
    "vgg11", "vgg11_bn",
    "inception_v3", "selecsls42b", "xception41", "resnetv2_50", "nf_resnet26",
)

#: torchvision segmentation models (dict outputs, interpolate).
SEGMENTATION = ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")


def available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def torchvision_classification() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def input_size(source: str, name: str) -> int:
    """A small input the model accepts (64, or what its architecture needs)."""
    if name == "vit_h_14":
        return 56  # built for 56 x 56 (a multiple of its patch size)
    if name == "maxvit_t" or name.startswith("swin"):
        return 224  # its partitions (windows) need the full size
    if name.startswith(("inception", "xception")):
        return 96
    return 64


def build(source: str, name: str) -> nn.Module:
    """``source`` is ``"torchvision"``, ``"segmentation"`` or ``"timm"``; random weights, eval
    mode, seeded."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    elif source == "segmentation":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=5, aux_loss=False)
    else:
        import torchvision

        kw: dict = {}
        if name in ("googlenet", "inception_v3"):
            kw = {"aux_logits": False, "init_weights": False}
        elif name.startswith("vit_"):
            kw = {"image_size": input_size(source, name)}
        model = torchvision.models.get_model(name, weights=None, **kw)
    return model.eval()


def example(source: str, name: str, batch: int = 1) -> torch.Tensor:
    s = input_size(source, name)
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))


def randomize_norms(model: nn.Module) -> None:
    """Random BN statistics and affine terms, so that a wrong cut shows in the output."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and hasattr(m, "running_var"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            rv = getattr(m, "running_var", None)
            if isinstance(rv, torch.Tensor):
                rv.copy_(torch.rand(rv.shape, generator=g) + 0.5)


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model output (segmentation models return a dict)."""
    if isinstance(out, dict):
        out = out["out"]
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def groups_quietly(model: nn.Module, x: torch.Tensor) -> tuple[list, list[str]]:
    """``channel_groups`` and the opaque-module warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OpaqueModuleWarning)
        groups = aofp_ext.channel_groups(model, x)
    return groups, [str(w.message) for w in caught if issubclass(w.category,
                                                                   OpaqueModuleWarning)]


def random_plan(groups, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random keep-set for every prunable group (see tests/_nets.random_plan)."""
    from _nets import random_plan as plan

    return plan(groups, generator)


def minimal_plan(groups) -> dict[str, torch.Tensor]:
    """Keep one channel of every part of every given group, and of every producing module."""
    plan = {}
    for g in groups:
        part = g.size // g.granularity
        keep = {i * part for i in range(g.granularity)}
        for s in g.producers:
            if s.role == "out" and not keep & set(range(s.group_start, s.group_start + s.length)):
                keep.add(s.group_start)
        plan[g.name] = torch.tensor(sorted(keep))
    return plan


@dataclass
class CutCheck:
    groups: int
    prunable: int
    rel_err: float
    macs_before: int
    macs_after: int
    plan: dict


def cut_matches_preview(model: nn.Module, x: torch.Tensor, groups, seed: int = 0,
                        forward: Callable = output_tensor) -> CutCheck:
    """Cut random keep-sets of every prunable group of ``model`` in place (no copy: the big
    models stay affordable); its output must equal ``masked_forward`` before the cut. Returns
    the relative error (max abs difference / max abs output) and the MACs before and after."""
    plan = random_plan(groups, torch.Generator().manual_seed(seed))
    macs_before = aofp_ext.count_flops(model, x)[0]
    with torch.no_grad():
        expected = forward(aofp_ext.masked_forward(model, plan, x))
        aofp_ext.prune_channels_(model, plan, example_inputs=x)
        got = forward(model(x))
    err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    return CutCheck(len(groups), sum(g.prunable for g in groups), err, macs_before,
                    aofp_ext.count_flops(model, x)[0], plan)


def cut_to_minimum_(model: nn.Module, x: torch.Tensor, targets: str = "all") -> int:
    """Cut, in place, every group that ``prune(targets=...)`` would search (``"all"``) or every
    prunable group (``"prunable"``) to its minimum (one channel per part and per producing
    module); the MACs after. On an already cut model this reaches the same minimum."""
    from aofp_ext.pricing import select_targets

    groups, _ = groups_quietly(model, x)
    if targets == "prunable":
        chosen = [g for g in groups if g.prunable]
    else:
        try:
            chosen = select_targets(groups, targets, model)
        except ValueError:
            chosen = []
    if chosen:
        aofp_ext.prune_channels_(model, minimal_plan(chosen), example_inputs=x)
    return aofp_ext.count_flops(model, x)[0]


def count_targets(model: nn.Module, groups, targets: str) -> int:
    from aofp_ext.pricing import select_targets

    try:
        return len(select_targets(groups, targets, model))
    except ValueError:
        return 0


def prune_a_few_steps(model: nn.Module, x: torch.Tensor, classes: int, **kw):
    """``aofp_ext.prune`` with the smallest settings: 4 random batches, 3 search steps, no
    finetune (``targets="all"`` when the model has no "auto" target)."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(3)
    loader = [(torch.randn(x.shape, generator=g), torch.randint(0, classes, (n,), generator=g))
              for _ in range(4)]
    settings = dict(example_inputs=x, target_flops=0.9, masks_per_step=4, iters_per_half=1,
                    warmup_iters=1, max_steps=3, progress=False, calibration_batches=1,
                    loss_fn=lambda out, y: torch.nn.functional.cross_entropy(output_tensor(out),
                                                                             y))
    settings.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "stopped at max_steps", opaque modules
        try:
            return aofp_ext.prune(model, loader, **settings)
        except ValueError as exc:
            if "no prunable channel group to search" not in str(exc):
                raise
            return aofp_ext.prune(model, loader, **{**settings, "targets": "all"})
