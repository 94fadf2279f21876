"""Prunability of the models people use: every torchvision classification model, torchvision's
segmentation models and a list of timm CNNs (tests/_zoo.py), random weights, small inputs.

For each model: channel groups are found and every group that is not prunable says why; random
keep-sets on every prunable group are cut in place and the output equals ``masked_forward``
(relative error <= 1e-4); the MACs drop; ``aofp_ext.save`` / ``load`` restore the cut model. A few
models also run ``aofp_ext.prune`` for a few steps.

The default run covers one or two models of every family (a few minutes on 2 cores); the rest of
torchvision, timm and the prune() runs are marked ``slow`` (run with ``-m slow``). Skips cleanly
when torchvision or timm is not installed.
"""

from __future__ import annotations

import pytest
import torch
from _zoo import (SEGMENTATION, TIMM_MODELS, available, build, cut_matches_preview, example,
                  groups_quietly, output_tensor, prune_a_few_steps, randomize_norms,
                  torchvision_classification)

import aofp_ext

HAVE_TV, HAVE_TIMM = available("torchvision"), available("timm")

#: One or two models of every family: the default (not slow) run.
QUICK = {
    "torchvision": ("resnet18", "resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf",
                    "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5",
                    "shufflenet_v2_x0_5", "squeezenet1_1", "googlenet", "alexnet",
                    "convnext_tiny", "vit_b_32"),
    "timm": ("efficientnet_lite0", "mobilenetv3_large_100", "cspresnet50", "repvgg_a0",
             "fbnetc_100", "dpn68", "vgg11", "seresnext26d_32x4d", "regnety_002",
             "ghostnet_100", "res2net50_26w_4s", "dla34"),
    "segmentation": ("lraspp_mobilenet_v3_large",),
}

#: Families with no prunable conv group yet, and the op their reasons must name.
NOT_FOLLOWED = {
    "nf_": "applies a weight that is not a conv/Linear module's own attribute",  # weight std.
}

#: prune() for a few steps: these by default, every model of the lists with -m slow.
PRUNE_QUICK = {("torchvision", "mobilenet_v3_small"), ("timm", "efficientnet_lite0")}


def _cases() -> list:
    names = []
    if HAVE_TV:
        names += [("torchvision", n) for n in torchvision_classification()]
        names += [("segmentation", n) for n in SEGMENTATION]
    if HAVE_TIMM:
        names += [("timm", n) for n in TIMM_MODELS]
    return [pytest.param(src, n, id=f"{src}-{n}",
                         marks=() if n in QUICK[src] else pytest.mark.slow) for src, n in names]


def _not_followed(name: str) -> str | None:
    return next((why for prefix, why in NOT_FOLLOWED.items() if name.startswith(prefix)), None)


@pytest.mark.parametrize(("source", "name"), _cases())
def test_model_cuts_exactly(source: str, name: str, tmp_path) -> None:
    model = build(source, name)
    randomize_norms(model)
    x = example(source, name, batch=2)
    groups, _ = groups_quietly(model, x)
    assert groups
    for g in groups:
        assert g.prunable or g.reason, g.name
    prunable = [g for g in groups if g.prunable]
    if not prunable:
        why = _not_followed(name)
        assert why is not None, f"{name}: no prunable group: {[g.reason for g in groups]}"
        assert any(why in g.reason for g in groups)
        return
    check = cut_matches_preview(model, x, groups)
    assert check.rel_err <= 1e-4, (name, check.rel_err)
    conv_cut = any(s.role == "out" and isinstance(model.get_submodule(s.module),
                                                  torch.nn.modules.conv._ConvNd)
                   for g in prunable for s in g.producers)
    assert check.macs_after < check.macs_before or not conv_cut
    # save / load: a fresh model of the same architecture, cut by the stored keep-sets
    aofp_ext.save(model, tmp_path / "model.pt")
    fresh = aofp_ext.load(build(source, name), tmp_path / "model.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(fresh(x)), output_tensor(model(x)),
                                   rtol=1e-4, atol=1e-5)


def _prune_cases() -> list:
    names = []
    if HAVE_TV:
        names += [("torchvision", n) for n in QUICK["torchvision"]]
    if HAVE_TIMM:
        names += [("timm", n) for n in QUICK["timm"]]
    return [pytest.param(src, n, id=f"{src}-{n}",
                         marks=() if (src, n) in PRUNE_QUICK else pytest.mark.slow)
            for src, n in names if not _not_followed(n)]


@pytest.mark.parametrize(("source", "name"), _prune_cases())
def test_prune_runs_a_few_steps(source: str, name: str) -> None:
    model = build(source, name)
    x = example(source, name, batch=2)
    macs = aofp_ext.count_flops(model, x)[0]  # of the example inputs, as the report counts
    result = prune_a_few_steps(model, x, classes=1000)
    r = result.report
    assert result.model is model and r["steps"] >= 1
    assert r["macs_before"] == macs and r["macs_after"] <= r["macs_before"]
    assert r["macs_after"] == aofp_ext.count_flops(model, x)[0]
    with torch.no_grad():
        assert torch.isfinite(output_tensor(model(x))).all()
