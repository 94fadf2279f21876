"""``method="functional"`` and ``method="agent"`` (issue 7): both meet the MACs target on a trained
LeNet-5-BN and beat random selection there; the agent's reward; the functional clustering finds
planted duplicate filters; the accuracy metric of the batched masked forwards; bad options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _nets import mnist_small as _mnist_small
from torch.utils.data import DataLoader, TensorDataset

import aofp_ext
from aofp_ext.criteria import SelectionContext, get_criterion
from aofp_ext.criteria.agent import agent_reward
from aofp_ext.criteria.functional import cluster_filters
from aofp_ext.graph import analyze
from aofp_ext.models import lenet5_bn
from aofp_ext.pricing import MacsModel, build_targets, select_targets

LENET_IN = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def mnist_small() -> dict[str, torch.Tensor]:
    """1,024 training and 1,000 test images of the shipped MNIST, and a LeNet-5-BN trained on
    them for two quick epochs (its state dict): the recipe of tests/test_prune.py."""
    return _mnist_small()


def prune_lenet(data: dict, method: str, seed: int = 0, target: float = 0.5,
                options: dict | None = None) -> dict:
    model = lenet5_bn()
    model.load_state_dict(data["state"])
    train = DataLoader(TensorDataset(data["xtr"], data["ytr"]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(data["xte"], data["yte"]), batch_size=500)
    result = aofp_ext.prune(model, train, example_inputs=LENET_IN, target_flops=target,
                            method=method, method_options=options, seed=seed,
                            eval_fn=aofp_ext.accuracy(test), progress=False)
    macs, _ = aofp_ext.count_flops(result.model, LENET_IN)
    report = result.report
    assert report["reached_target"] and macs == report["macs_after"]
    assert macs <= target * report["macs_before"]
    return report


@pytest.fixture(scope="module")
def random_accuracy(mnist_small) -> float:
    """Mean accuracy (the same 1,000 test images, right after the cut, no finetune) of random
    selection at 50 % MACs over 10 seeds. Measured: 82.5 (std 4.0 over the seeds)."""
    accs = [prune_lenet(mnist_small, "random", seed=s)["accuracy_after_search"]
            for s in range(10)]
    return sum(accs) / len(accs)


# ---- end to end on a trained LeNet ------------------------------------------------------------


def test_functional_reaches_the_target_and_beats_random(mnist_small, random_accuracy) -> None:
    r = prune_lenet(mnist_small, "functional")
    sel = r["selection"]
    assert sel["method"] == "functional" and sel["options"] == {"threshold": 0.9}
    assert set(sel["functional"]) == {"conv1", "conv2"}
    # measured 86.1 against 82.5 for random (std over seeds 4.0); across six LeNets trained
    # with other seeds the mean gain is +5 points (docs/methods.md)
    assert r["accuracy_after_search"] >= random_accuracy + 2.0, (
        r["accuracy_after_search"], random_accuracy)


def test_agent_reaches_the_target_and_beats_random(mnist_small, random_accuracy) -> None:
    r = prune_lenet(mnist_small, "agent")
    sel = r["selection"]
    assert sel["updates_per_layer"] == 80          # the budget rule's cap on this small model
    assert [a["layer"] for a in sel["agents"]] == ["conv1", "conv2"]
    # measured 90.6 (86.1 and 88.6 with seeds 1 and 2) against 82.5 for random
    assert r["accuracy_after_search"] >= random_accuracy + 4.0, (
        r["accuracy_after_search"], random_accuracy)


def test_agent_is_reproducible(mnist_small) -> None:
    opts = {"updates": 2, "actions": 4, "val_samples": 16}
    a = prune_lenet(mnist_small, "agent", seed=3, options=opts)
    b = prune_lenet(mnist_small, "agent", seed=3, options=opts)
    assert a["selection"]["scores"] == b["selection"]["scores"]
    assert a["widths_after"] == b["widths_after"]
    assert a["selection"]["updates_per_layer"] == 2


# ---- the agent's reward -----------------------------------------------------------------------


def test_agent_reward_values() -> None:
    log2 = math.log(2)
    assert float(agent_reward(90.0, 89.0, 8, 16, 2.0)) == pytest.approx(0.5 * log2)
    assert float(agent_reward(90.0, 88.0, 8, 16, 2.0)) == pytest.approx(0.0, abs=1e-15)
    assert float(agent_reward(90.0, 87.0, 4, 16, 2.0)) == pytest.approx(-0.5 * math.log(4))
    assert float(agent_reward(90.0, 90.0, 1, 64, 5.0)) == pytest.approx(math.log(64))
    # broadcast over a batch of actions
    r = agent_reward(torch.tensor(90.0), torch.tensor([90.0, 85.0, 80.0]),
                     torch.tensor([4, 4, 2]), 8, 5.0)
    assert r.dtype == torch.float64
    assert torch.allclose(r, torch.tensor([log2, 0.0, -math.log(4)], dtype=torch.float64))


def test_agent_reward_budget_knob() -> None:
    # the same drop of 1 point: a larger bound b makes it cheaper, monotonically
    rs = [float(agent_reward(90.0, 89.0, 8, 16, b)) for b in (0.5, 1.0, 2.0, 4.0, 100.0)]
    assert rs == sorted(rs) and rs[1] == pytest.approx(0.0, abs=1e-15)
    assert rs[0] < 0 < rs[2]
    assert rs[-1] == pytest.approx(0.99 * math.log(2))
    # an improvement counts less as b grows (the accuracy term tends to 1 from above)
    up = [float(agent_reward(90.0, 91.0, 8, 16, b)) for b in (1.0, 2.0, 4.0)]
    assert up == sorted(up, reverse=True) and up[-1] > math.log(2)


def test_agent_reward_edge_cases() -> None:
    # nothing removed: no efficiency, whatever happens to the accuracy
    for p_hat in (95.0, 90.0, 50.0):
        assert float(agent_reward(90.0, p_hat, 16, 16, 2.0)) == 0.0
    # p_hat > p: the accuracy term exceeds 1 (not clipped)
    assert float(agent_reward(80.0, 82.0, 4, 16, 2.0)) == pytest.approx(2.0 * math.log(4))
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="accuracy bound b"):
            agent_reward(90.0, 89.0, 8, 16, bad)
    with pytest.raises(ValueError, match="kept must be between 1 and total"):
        agent_reward(90.0, 89.0, 0, 16, 2.0)
    with pytest.raises(ValueError, match="kept must be between 1 and total"):
        agent_reward(90.0, 89.0, 17, 16, 2.0)
    with pytest.raises(ValueError, match="total"):
        agent_reward(90.0, 89.0, 1, 0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        agent_reward(float("nan"), 89.0, 8, 16, 2.0)


# ---- functional: the clustering ---------------------------------------------------------------


def test_cluster_filters_is_complete_linkage() -> None:
    # 0~1 and 1~2 are above the threshold but 0~2 is not: single linkage would chain all three
    s = torch.tensor([[1.0, 0.95, 0.8, 0.1],
                      [0.95, 1.0, 0.94, 0.2],
                      [0.8, 0.94, 1.0, 0.3],
                      [0.1, 0.2, 0.3, 1.0]], dtype=torch.float64)
    assert cluster_filters(s, 0.9) == [[0, 1], [2], [3]]
    assert cluster_filters(s, 0.75) == [[0, 1, 2], [3]]
    assert cluster_filters(s, 1.0) == [[0], [1], [2], [3]]
    assert cluster_filters(s, 0.9, torch.tensor([False, True, True, True])) == [[1, 2], [3]]


class Planted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


def test_functional_finds_planted_duplicate_filters() -> None:
    torch.manual_seed(0)
    model = Planted()
    protos = torch.randn(5, 3, 3, 3)
    # filter -> (prototype, scale): three planted groups, two singletons, a negated copy of
    # prototype 1 (the opposite function after the ReLU) and an all-zero filter
    plan = {0: (0, 1.0), 3: (0, 2.5), 7: (0, 0.4), 1: (1, 1.0), 5: (1, 3.0), 6: (1, -1.0),
            2: (2, 0.7), 8: (2, 1.0), 10: (2, 1.9), 4: (3, 1.0), 11: (4, 1.0), 9: (0, 0.0)}
    planted = [[0, 3, 7], [1, 5], [2, 8, 10]]
    with torch.no_grad():
        for f, (p, scale) in plan.items():
            model.conv1.weight[f] = scale * protos[p]
        model.conv2.weight.mul_(torch.linspace(0.5, 2.0, 12).view(1, 12, 1, 1))
    reliance = model.conv2.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
    x = torch.randn(256, 3, 16, 16)
    y = torch.randint(0, 4, (256,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    result = aofp_ext.prune(model, loader, example_inputs=torch.zeros(1, 3, 16, 16),
                            target_flops=0.9, method="functional", progress=False)
    sel = result.report["selection"]
    assert sel["functional"]["conv1"]["groups"] == planted
    assert sel["functional"]["conv1"]["constant"] == 1
    assert sel["functional"]["conv1"]["redundant"] == 5
    # removal order in conv1: the zero filter, then every group member except the one the next
    # layer weights most, before any other filter
    reps = {max(g, key=lambda c: float(reliance[c])) for g in planted}
    first = {9} | {c for g in planted for c in g if c not in reps}
    scores = torch.tensor(sel["scores"]["conv1"])
    assert set(torch.argsort(scores)[:6].tolist()) == first


# ---- the accuracy metric of the batched masked forwards ---------------------------------------


def test_masked_losses_metric_matches_masked_forward(mnist_small) -> None:
    model = lenet5_bn()
    model.load_state_dict(mnist_small["state"])
    model.eval()
    a = analyze(model, (LENET_IN,))
    groups = select_targets(a.groups, "auto", model)
    tgts, consumers = build_targets(model, a.gm, groups, "running")
    ctx = SelectionContext(model, tgts, consumers, [], F.cross_entropy, torch.device("cpu"),
                           torch.Generator().manual_seed(0), MacsModel(model, (LENET_IN,), tgts))
    x, y = mnist_small["xte"][:100], mnist_small["yte"][:100]
    masks = torch.rand(3, 50, generator=torch.Generator().manual_seed(1)) < 0.5
    alive1 = torch.arange(20) % 3 != 0

    def acc(out: torch.Tensor, labels: torch.Tensor) -> float:
        return float((out.argmax(1) == labels).double().mean()) * 100

    got = ctx.masked_losses((x,), y, {1: masks}, alive=[alive1, None], metric=acc)
    for k in range(3):
        plan = {"conv1": torch.nonzero(alive1).flatten(),
                "conv2": torch.nonzero(masks[k]).flatten()}
        with torch.no_grad():
            want = acc(aofp_ext.masked_forward(model, plan, x), y)
        assert float(got[k]) == pytest.approx(want, abs=1e-9)
    loss = ctx.masked_losses((x,), y, {1: masks})       # default: loss_fn
    assert not torch.allclose(loss, got)


# ---- bad options ------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options,match", [
    ("functional", {"threshold": 0.0}, "threshold"),
    ("functional", {"threshold": 1.5}, "threshold"),
    ("functional", {"threshold": float("nan")}, "threshold"),
    ("functional", {"threshold": True}, "threshold"),
    ("functional", {"treshold": 0.9}, "bad method_options for method 'functional'"),
    ("agent", {"b": 0}, "option b"),
    ("agent", {"b": -2.0}, "option b"),
    ("agent", {"updates": 0}, "option updates"),
    ("agent", {"updates": 2.5}, "option updates"),
    ("agent", {"actions": 1}, "option actions"),
    ("agent", {"val_samples": 0}, "option val_samples"),
    ("agent", {"hidden": 0}, "option hidden"),
    ("agent", {"lr": 0.0}, "option lr"),
    ("agent", {"budget": -1.0}, "option budget"),
    ("agent", {"init_keep": 1.0}, "option init_keep"),
    ("agent", {"init_keep": "half"}, "option init_keep"),
    ("agent", {"warm_start": 1}, "option warm_start"),
    ("agent", {"per_filter": "no"}, "option per_filter"),
    ("agent", {"reward": "log"}, "bad method_options for method 'agent'"),
])
def test_bad_options(method: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_criterion(method, options)


def test_agent_needs_class_labels() -> None:
    model = Planted()
    x = torch.randn(64, 3, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.randn(64, 4)), batch_size=32)
    with pytest.raises(ValueError, match="integer class labels"):
        aofp_ext.prune(model, loader, example_inputs=torch.zeros(1, 3, 8, 8), target_flops=0.8,
                       method="agent", loss_fn=F.mse_loss, progress=False)
