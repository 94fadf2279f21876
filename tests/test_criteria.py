"""The filter-selection criteria of ``prune(method=...)``: the shared interface (ranking, batched
masked losses, damage, gate gradients) against plain references, every method end to end on an
MNIST subset, and each data-driven method against its brute-force definition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _nets import FlattenNet, ProjectionNet, calibrate
from _nets import mnist_small as _mnist_small
from torch.utils.data import DataLoader, TensorDataset

import aofp_ext
from aofp_ext import ops
from aofp_ext.criteria import (CRITERIA, SelectionContext, available, get_criterion,
                               select_by_ranking)
from aofp_ext.criteria.base import relative
from aofp_ext.criteria.lfe import fit_additive
from aofp_ext.graph import analyze
from aofp_ext.models import lenet5_bn, resnet_cifar
from aofp_ext.pricing import MacsModel, build_targets, select_targets

LENET_IN = torch.zeros(1, 1, 28, 28)


# ---- helpers ----------------------------------------------------------------------------------


def make_ctx(model: nn.Module, example: torch.Tensor, batches, targets="auto",
             bn_mode: str = "running", loss_fn=F.cross_entropy, **kw) -> SelectionContext:
    """A SelectionContext built the way prune() builds it."""
    a = analyze(model, (example,))
    groups = select_targets(a.groups, targets, model)
    tgts, consumers = build_targets(model, a.gm, groups, bn_mode)
    macs = MacsModel(model, (example,), tgts)
    return SelectionContext(model, tgts, consumers, [((x,), y) for x, y in batches], loss_fn,
                            torch.device("cpu"), torch.Generator().manual_seed(0), macs, **kw)


def plan_of(ctx: SelectionContext, keeps: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """masked_forward plan (group name -> kept indices) from bool keep vectors."""
    return {ctx.targets[i].name: torch.nonzero(k).flatten() for i, k in keeps.items()}


def masked_loss(model, plan, x, y, loss_fn=F.cross_entropy) -> float:
    with torch.no_grad():
        return float(loss_fn(aofp_ext.masked_forward(model, plan, x).double(), y))


def one_hot_keeps(n: int) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool)


def lenet_batches(seed: int = 0, n_batches: int = 2, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
            for _ in range(n_batches)]


def calibrated_lenet() -> nn.Module:
    torch.manual_seed(0)
    return calibrate(lenet5_bn(), torch.randn(64, 1, 28, 28))


class LinearFollowers(nn.Module):
    """Both targets priced at linear followers (Gram path): conv1's follower conv2 -> bn2 with no
    ReLU after it; conv2's follower the Linear after flatten (16 inputs per channel), then tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5 * 16, 7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.bn2(self.conv2(x)), 2)          # 8x8 -> 4x4, no ReLU
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


class ConvNet1d(nn.Module):
    """A Conv1d target whose follower is a Conv1d + BN + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm1d(6)
        self.c2 = nn.Conv1d(6, 4, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool1d(x, 1).flatten(1))


# ---- the shared interface ---------------------------------------------------------------------


def test_registry_and_bad_options() -> None:
    for name in ("l1", "bn_scale", "random", "oracle", "oracle-loss", "taylor", "lfe"):
        assert name in CRITERIA and name in available()
    assert available()[0] == "aofp"
    for name in ("oracle", "oracle-loss", "taylor"):
        with pytest.raises(ValueError, match=f"bad method_options for method '{name}'"):
            get_criterion(name, {"k": 1})
    bad = [({"keep_prob": 0.0}, "keep_prob must be in"), ({"keep_prob": 1}, "keep_prob"),
           ({"keep_prob": "0.5"}, "keep_prob"), ({"n_masks": 1}, "n_masks must be an integer"),
           ({"n_masks": 2.5}, "n_masks"), ({"n_masks": True}, "n_masks"),
           ({"ridge": -1.0}, "ridge must be"), ({"ridge": float("nan")}, "ridge"),
           ({"samples_per_mask": 0}, "samples_per_mask"), ({"nope": 1}, "bad method_options")]
    for opts, msg in bad:
        with pytest.raises(ValueError, match=msg):
            get_criterion("lfe", opts)
    assert get_criterion("lfe").options() == {"keep_prob": 0.9, "n_masks": 1024, "ridge": 1e-3,
                                              "samples_per_mask": 32}
    with pytest.raises(ValueError, match="keep_prob must be in"):
        aofp_ext.prune(lenet5_bn(), DataLoader(TensorDataset(*lenet_batches()[0]), batch_size=8),
                       example_inputs=LENET_IN, method="lfe",
                       method_options={"keep_prob": 1.5}, progress=False)


@pytest.mark.parametrize("seed", range(4))
def test_ranking_meets_the_target_with_the_shortest_prefix(seed: int) -> None:
    model = resnet_cifar(8)
    ex = torch.zeros(1, 3, 32, 32)
    ctx = make_ctx(model, ex, [], targets="all")
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g, dtype=torch.float64) * 10 ** float(torch.randn(1, generator=g))
              for n in ctx.sizes]
    lowest = ctx.macs.smallest() / ctx.macs.total
    for target in (1.0, 0.9, 0.6, lowest + 0.02):
        alive = select_by_ranking(scores, ctx.macs, target)
        assert all(bool(a.any()) for a in alive)
        assert ctx.macs.current(alive) <= target * ctx.macs.total
        # each group keeps its best channel; normalised scores: removed <= kept (but the best)
        removed = [float(relative(s)[c]) for s, a in zip(scores, alive)
                   for c in torch.nonzero(~a).flatten()]
        kept = [float(relative(s)[c]) for s, a in zip(scores, alive)
                for c in torch.nonzero(a).flatten() if c != int(torch.argmax(s))]
        for s, a in zip(scores, alive):
            assert bool(a[torch.argmax(s)])
        if removed and kept:
            assert max(removed) <= min(kept)
            # the shortest prefix: putting back the last removed channel misses the target
            i, c = max(((i, c) for i, (s, a) in enumerate(zip(scores, alive))
                        for c in torch.nonzero(~a).flatten().tolist()),
                       key=lambda ic: float(relative(scores[ic[0]])[ic[1]]))
            back = [a.clone() for a in alive]
            back[i][c] = True
            assert ctx.macs.current(back) > target * ctx.macs.total
    with pytest.raises(ValueError, match="cannot be reached"):
        select_by_ranking(scores, ctx.macs, lowest * 0.5)


@pytest.mark.parametrize("case", ["lenet", "projection-all"])
def test_masked_losses_equal_a_loop_of_masked_forwards(case: str) -> None:
    g = torch.Generator().manual_seed(3)
    if case == "lenet":
        model, ex, batches, targets = calibrated_lenet(), LENET_IN, lenet_batches(n=8), "auto"
    else:
        torch.manual_seed(0)
        model = calibrate(ProjectionNet(), torch.randn(32, 3, 16, 16))
        ex, targets = torch.zeros(1, 3, 16, 16), "all"
        batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g))]
    ctx = make_ctx(model, ex, batches, targets=targets, max_samples=16)  # 2 masks per forward
    (x,), y = ctx.batches[0]
    model.train()           # masked_losses runs in eval mode and restores the mode
    for K in (1, 5):
        masks = {i: torch.rand(K, n, generator=g) > 0.4 for i, n in enumerate(ctx.sizes)}
        for i in masks:
            masks[i][:, 0] = True
        del masks[len(ctx.sizes) - 1]          # the last target keeps `alive`
        alive = [None] * len(ctx.sizes)
        alive[-1] = torch.rand(ctx.sizes[-1], generator=g) > 0.3
        alive[-1][0] = True
        got = ctx.masked_losses((x,), y, masks, alive=alive)
        assert model.training
        model.eval()
        want = [masked_loss(model, plan_of(ctx, {**{i: m[k] for i, m in masks.items()},
                                                 len(ctx.sizes) - 1: alive[-1]}), x, y)
                for k in range(K)]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        model.train()
    assert all(c.keep is None for c in ctx.consumers.values())
    with pytest.raises(ValueError, match="must be"):
        ctx.masked_losses((x,), y, {0: torch.ones(2, ctx.sizes[0] + 1, dtype=torch.bool)})


def _link_reference(model, ln, n, x, masks) -> tuple[torch.Tensor, float]:
    """(damage, ||f(Y)||^2) at one consumer of a target by masked forwards of the whole model:
    the mask at the consumer's input, the follower output read after its BN (eval) and ReLU."""
    c = ln.consumer
    last = c.bn if c.bn is not None else c.module

    def run(mask: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(c.width)
        keep[ln.pos_full] = mask[ln.chan_full].float()
        out = {}
        h1 = c.module.register_forward_pre_hook(
            lambda m, a: (a[0] * keep.view((1, -1) + (1,) * (a[0].dim() - 2)),))
        h2 = last.register_forward_hook(lambda m, a, o: out.__setitem__("y", o.double()))
        with torch.no_grad():
            model(x)
        h1.remove()
        h2.remove()
        return torch.relu(out["y"]) if c.post == "relu" else out["y"]

    yb = run(torch.ones(n, dtype=torch.bool))
    return torch.stack([((run(m) - yb) ** 2).sum() for m in masks]), float((yb ** 2).sum())


def _link_reference_bn_batch(model, ln, n, x, masks) -> tuple[torch.Tensor, float]:
    """The same for a conv follower whose BN normalises each masked output with its own batch
    statistics: masked_damage_reference (one masked conv per mask) on the captured input."""
    c = ln.consumer
    seen = {}
    h = c.module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    full = torch.ones(masks.shape[0], c.width, dtype=torch.bool)
    full[:, ln.pos_full] = masks[:, ln.chan_full]
    kw = dict(stride=c.module.stride, padding=c.module.padding)
    bias = None if c.module.bias is None else c.module.bias.detach()
    dmg = ops.masked_damage_reference(seen["x"], c.module.weight.detach(), full, bias=bias, **kw,
                                      norm="batch", scale=c.bn.weight.detach(),
                                      shift=c.bn.bias.detach(), eps=c.bn.eps, post=c.post)
    y = F.conv2d(seen["x"].double(), c.module.weight.detach().double(),
                 None if bias is None else bias.double(), **kw)
    y = F.batch_norm(y, None, None, c.bn.weight.detach().double(), c.bn.bias.detach().double(),
                     training=True, eps=c.bn.eps)
    return dmg.detach(), float((torch.relu(y) if c.post == "relu" else y).pow(2).sum())


def _follower_reference(model, ctx, i, x, masks) -> torch.Tensor:
    """Relative damage of target i's masks at all its followers (sum damage / sum norm)."""
    dmg = torch.zeros(masks.shape[0], dtype=torch.float64)
    base = 0.0
    for ln in ctx.targets[i].links:
        ref = _link_reference_bn_batch if ln.consumer.norm == "batch" else _link_reference
        d, b = ref(model, ln, ctx.sizes[i], x, masks)
        dmg += d
        base += b
    return dmg / base


def test_damage_equals_masked_forwards() -> None:
    model = calibrated_lenet().eval()
    ctx = make_ctx(model, LENET_IN, lenet_batches(n=8))
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(6, n, generator=g) > 0.5 for n in ctx.sizes]
    got = [(x, [ctx.damage(i, m) for i, m in enumerate(masks)]) for (x,), _ in ctx.captured()]
    assert len(got) == 2
    assert all(not c.calls and not c.capture for c in ctx.consumers.values())
    for x, dmg in got:       # (the references' forwards would be captured inside the loop)
        for i, m in enumerate(masks):
            torch.testing.assert_close(dmg[i], _follower_reference(model, ctx, i, x, m),
                                       rtol=1e-4, atol=1e-7)


# ---- oracle -----------------------------------------------------------------------------------


def _oracle_brute_force(model, ctx) -> list[torch.Tensor]:
    """Per filter: the damage of removing it alone, averaged over the batches."""
    return [sum(_follower_reference(model, ctx, i, x, one_hot_keeps(n))
                for (x,), _ in ctx.batches) / len(ctx.batches)
            for i, n in enumerate(ctx.sizes)]


@pytest.mark.parametrize("case", ["gram", "relu-running", "bn-batch", "conv1d"])
def test_oracle_equals_brute_force(case: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "gram":
        model = calibrate(LinearFollowers(), torch.randn(32, 3, 8, 8))
        ex = torch.zeros(1, 3, 8, 8)
        batches = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g))
                   for _ in range(2)]
    elif case == "conv1d":
        model = calibrate(ConvNet1d(), torch.randn(32, 2, 10))
        ex = torch.zeros(1, 2, 10)
        batches = [(torch.randn(6, 2, 10, generator=g), torch.randint(0, 3, (6,), generator=g))
                   for _ in range(2)]
    else:
        model, ex, batches = calibrated_lenet(), LENET_IN, lenet_batches(n=8)
    bn_mode = "batch" if case == "bn-batch" else "running"
    ctx = make_ctx(model, ex, batches, bn_mode=bn_mode)
    consumers = [ln.consumer for t in ctx.targets for ln in t.links]
    if case == "gram":      # both followers are linear: the Gram path, incl. Linear-after-flatten
        assert all(c.post == "none" and c.norm in ("none", "affine") for c in consumers)
        assert ctx.targets[1].links[0].view_block == 16
    else:
        assert any(c.post == "relu" for c in consumers)
    if case == "bn-batch":
        assert any(c.norm == "batch" for c in consumers)
    got = get_criterion("oracle").scores(ctx)
    want = _oracle_brute_force(model, ctx)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-8)
        assert bool((a > 0).any())


def test_oracle_gram_path_uses_channel_gram(monkeypatch) -> None:
    calls = []
    real = ops.channel_gram
    monkeypatch.setattr(ops, "channel_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = calibrate(LinearFollowers(), torch.randn(32, 3, 8, 8))
    ctx = make_ctx(model, torch.zeros(1, 3, 8, 8), [(torch.randn(4, 3, 8, 8), torch.zeros(4).long())])
    get_criterion("oracle").scores(ctx)
    assert len(calls) == 2


def test_oracle_loss_equals_brute_force() -> None:
    torch.manual_seed(0)
    model = calibrate(FlattenNet(), torch.randn(32, 3, 16, 16))   # widths 8 and 6
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(2)]
    ctx = make_ctx(model, torch.zeros(1, 3, 16, 16), batches, max_samples=24)  # 3 masks a chunk
    assert ctx.sizes == [8, 6]
    got = get_criterion("oracle-loss").scores(ctx)
    for i, n in enumerate(ctx.sizes):
        want = torch.zeros(n, dtype=torch.float64)
        for (x,), y in ctx.batches:
            full = masked_loss(model, {}, x, y)
            want += torch.tensor([masked_loss(model, plan_of(ctx, {i: k}), x, y) - full
                                  for k in one_hot_keeps(n)], dtype=torch.float64)
        torch.testing.assert_close(got[i], want / len(ctx.batches), rtol=1e-4, atol=2e-6)


# ---- lfe --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_fit_additive_recovers_planted_coefficients(ridge: float) -> None:
    g = torch.Generator().manual_seed(0)
    M, Fn = 600, 40
    X = torch.rand(M, Fn, generator=g) < 0.25
    w = torch.randn(Fn, generator=g, dtype=torch.float64)
    blocks = torch.arange(M) % 5
    intercept = torch.randn(5, generator=g, dtype=torch.float64) * 10
    y = intercept[blocks] + X.double() @ w
    torch.testing.assert_close(fit_additive(X, y, blocks, ridge), w, rtol=0,
                               atol=1e-8 if ridge == 0 else 1e-5)
    noisy = y + 0.01 * torch.randn(M, generator=g, dtype=torch.float64)
    err = (fit_additive(X, noisy, blocks, ridge) - w).abs().max()
    assert err < 5 * 0.01 / math.sqrt(M * 0.25 * 0.75)   # 5 standard errors of a coefficient
    # without block intercepts the batch offsets leak into the fit
    assert (fit_additive(X, y, None, ridge) - w).abs().max() > 0.01
    # a large ridge shrinks the coefficients towards 0
    assert fit_additive(X, y, blocks, 100.0).norm() < 0.1 * w.norm()
    with pytest.raises(ValueError, match="ridge must be"):
        fit_additive(X, y, blocks, -1.0)
    with pytest.raises(ValueError, match="removed must be"):
        fit_additive(X[:5], y, blocks)
    with pytest.raises(ValueError, match="blocks must have"):
        fit_additive(X, y, blocks[:5])
    with pytest.raises(ValueError, match="NaN"):
        fit_additive(X, y * float("nan"), blocks)


class Additive(nn.Module):
    """loss = -sum of the kept channels' outputs w_c (1x1 convs on a constant input, concatenated,
    then a Linear of ones): removing channel c raises the loss by exactly w_c."""

    def __init__(self, w_a: torch.Tensor, w_b: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, w_a.numel(), 1, bias=False)
        self.b = nn.Conv2d(1, w_b.numel(), 1, bias=False)
        self.fc = nn.Linear(w_a.numel() + w_b.numel(), 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(w_a.view(-1, 1, 1, 1))
            self.b.weight.copy_(w_b.view(-1, 1, 1, 1))
            self.fc.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], dim=1).flatten(1))


@pytest.mark.parametrize("samples_per_mask", [None, 3])
def test_lfe_recovers_an_additive_model_end_to_end(samples_per_mask) -> None:
    g = torch.Generator().manual_seed(0)
    w_a, w_b = torch.randn(6, generator=g), torch.randn(9, generator=g)
    model = Additive(w_a, w_b)
    # the labels shift each batch's loss: the per-batch intercepts must absorb it
    batches = [(torch.ones(4, 1, 1, 1), torch.full((4,), float(b))) for b in range(3)]
    ctx = make_ctx(model, torch.ones(1, 1, 1, 1), batches,
                   loss_fn=lambda out, y: -out.mean() + 5 * y.mean())
    assert [t.name for t in ctx.targets] == ["a", "b"]
    scores = get_criterion("lfe", {"n_masks": 200, "keep_prob": 0.7, "ridge": 0.0,
                                   "samples_per_mask": samples_per_mask}).scores(ctx)
    assert ctx.info["lfe"]["blocks"] == (3 if samples_per_mask is None else 6)  # 4 = 3 + 1
    torch.testing.assert_close(scores[0], w_a.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[1], w_b.double(), rtol=0, atol=1e-5)
    assert 0.2 < ctx.info["lfe"]["removed_per_mask"] / 15 < 0.4


# ---- taylor -----------------------------------------------------------------------------------


def test_taylor_equals_hand_computed_gradients() -> None:
    model = calibrated_lenet()
    model.train()          # the criterion must switch to eval and back
    state = copy.deepcopy(model.state_dict())
    batches = lenet_batches(n=8)
    ctx = make_ctx(model, LENET_IN, batches)
    got = get_criterion("taylor").scores(ctx)
    assert model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # by hand: the activations at the mask points (after relu1 / relu2), eval mode
    model.eval()
    want = [torch.zeros(20, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)]
    for x, y in batches:
        acts = []
        hs = [m.register_forward_hook(lambda m, a, o: acts.append(o))
              for m in (model.relu1, model.relu2)]
        loss = F.cross_entropy(model(x), y)
        for h in hs:
            h.remove()
        grads = torch.autograd.grad(loss, acts)
        for w, a, gr in zip(want, acts, grads):
            w += (a * gr).sum(dim=(0, 2, 3)).abs().double()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b / len(batches), rtol=1e-4, atol=1e-9)
        assert bool((a > 0).all())


def test_gate_grads_sum_over_every_consumer_position() -> None:
    # ProjectionNet with targets="all": the residual stream is read by several consumers
    torch.manual_seed(0)
    model = calibrate(ProjectionNet(), torch.randn(32, 3, 16, 16))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    ctx = make_ctx(model, torch.zeros(1, 3, 16, 16), [(x, y)], targets="all")
    got = ctx.gate_grads((x,), y)
    model.double()          # finite differences in float64
    for i, t in enumerate(ctx.targets):   # finite differences of the loss in a gate
        n = t.group.size
        c = int(torch.randint(n, ()))
        eps = 1e-4

        def loss_at(s: float) -> float:
            gate = torch.ones(n, dtype=torch.float64)
            gate[c] = s
            hs = []
            for ln in t.links:
                k = torch.ones(ln.consumer.width, dtype=torch.float64)
                k[ln.pos_full] = gate[ln.chan_full]
                hs.append(ln.consumer.module.register_forward_pre_hook(
                    lambda m, a, k=k: (a[0] * k.view((1, -1) + (1,) * (a[0].dim() - 2)),)))
            with torch.no_grad():
                v = float(F.cross_entropy(model(x.double()), y))
            for h in hs:
                h.remove()
            return v

        fd = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
        assert abs(float(got[i][c]) - fd) < 1e-4 * max(1.0, abs(fd)), (t.name, c, fd)


# ---- every method on a real task --------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_small() -> dict:
    """1,024 training and 500 test images of the shipped MNIST and a LeNet-5-BN trained on them
    for two quick epochs (its state dict)."""
    return _mnist_small(500)


METHODS = {"l1": {}, "bn_scale": {}, "random": {}, "oracle": {}, "oracle-loss": {},
           "taylor": {}, "lfe": {"n_masks": 96}}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_reaches_the_target_on_mnist(method: str, mnist_small) -> None:
    model = lenet5_bn()
    model.load_state_dict(mnist_small["state"])
    train = DataLoader(TensorDataset(mnist_small["xtr"], mnist_small["ytr"]), batch_size=64,
                       shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(mnist_small["xte"], mnist_small["yte"]), batch_size=500)
    r = aofp_ext.prune(model, train, example_inputs=LENET_IN, target_flops=0.5, method=method,
                       method_options=METHODS[method], calibration_batches=1,
                       eval_fn=aofp_ext.accuracy(test), progress=False).report
    assert r["reached_target"] and r["macs_fraction"] <= 0.5
    assert aofp_ext.count_flops(model, LENET_IN)[0] == r["macs_after"]
    assert 1 <= r["widths_after"]["conv1"] < 20 and 1 <= r["widths_after"]["conv2"] < 50
    sel = r["selection"]
    assert sel["method"] == method and sel["options"] == get_criterion(method, METHODS[method]).options()
    assert [len(v) for v in sel["scores"].values()] == [20, 50]
    assert sel["calibration_batches"] == (0 if not CRITERIA[method].needs_data else 1)
    assert r["accuracy_before"] > 60 and r["accuracy_after_search"] is not None
    assert all(p.grad is None for p in model.parameters())   # no finetuning, no stray .grad


def test_calibration_loader_is_where_criteria_read(mnist_small) -> None:
    """With ``calibration_loader`` the scores come from its batches, not the training loader's:
    the same scores as a run whose training loader yields those batches."""
    x, y = mnist_small["xtr"], mnist_small["ytr"]
    train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64)
    calib = DataLoader(TensorDataset(x[512:], y[512:]), batch_size=64)

    def scores(loader, **kw) -> dict:
        model = lenet5_bn()
        model.load_state_dict(mnist_small["state"])
        r = aofp_ext.prune(model, loader, example_inputs=LENET_IN, target_flops=0.5,
                           method="oracle", calibration_batches=2, progress=False, **kw).report
        return r["selection"]["scores"]

    via_calib = scores(train, calibration_loader=calib)
    assert via_calib == scores(calib)
    assert via_calib != scores(train)
