"""aofp_ext.prune end to end: pricing against masked forwards, the MACs bookkeeping, a real
LeNet-5-BN prune on shipped MNIST images, resume equality, and clear errors on bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _nets import ProjectionNet, TokenNet
from _nets import mnist_small as _mnist_small
from torch.utils.data import DataLoader, TensorDataset

import aofp_ext
from aofp_ext import pricing, pruner
from aofp_ext.graph import analyze
from aofp_ext.models import lenet5_bn, resnet_cifar
from aofp_ext.search import LayerSearch
from aofp_ext.surgery import pruning_record

LENET_IN = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def mnist_small() -> dict[str, torch.Tensor]:
    """1,024 training and 1,000 test images of the shipped MNIST, and a LeNet-5-BN trained on
    them for two quick epochs (its state dict)."""
    return _mnist_small()


def trained_lenet(data: dict) -> nn.Module:
    model = lenet5_bn()
    model.load_state_dict(data["state"])
    return model


def loader(data: dict, n: int = 1024, seed: int = 0, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(data["xtr"][:n], data["ytr"][:n]), batch_size=64,
                      shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


# ---- pricing and MACs -----------------------------------------------------------------------


def _reference_t(model, target, x_in, masks, base_keep, bn_eval: bool) -> torch.Tensor:
    """Damage at each consumer's follower output with the target's channels masked at that
    consumer's input (every base mask applied, the rest of the model as it runs), summed, over
    the summed base norms."""
    dmg = torch.zeros(masks.shape[0], dtype=torch.float64)
    base = 0.0
    for link in target.links:
        c = link.consumer
        feats = {}

        def fwd(mask: torch.Tensor) -> torch.Tensor:
            hooks = []
            for c2, keep in base_keep.items():
                keep = keep.clone()
                if c2 is c:
                    keep[link.pos_full] *= mask[link.chan_full].float()
                hooks.append(c2.module.register_forward_pre_hook(
                    lambda mod, args, keep=keep: (args[0] * (
                        keep if isinstance(mod, nn.Linear)  # over the last dim
                        else keep.view((1, -1) + (1,) * (args[0].dim() - 2))),)))
            last = c.bn if c.bn is not None else c.module
            hooks.append(last.register_forward_hook(
                lambda mod, args, out: feats.__setitem__("y", out.detach().double().clone())))
            if bn_eval and c.bn is not None:
                c.bn.eval()
            with torch.no_grad():
                model(x_in)
            if c.bn is not None:
                c.bn.train()
            for h in hooks:
                h.remove()
            y = feats["y"]
            return torch.relu(y) if c.post == "relu" else y

        yb = fwd(target.search.alive)
        dmg += torch.stack([((fwd(m) - yb) ** 2).sum() for m in masks])
        base += float((yb ** 2).sum())
    return dmg / base


def _targets(model, example, names, bn_mode):
    a = analyze(model, example)
    groups = {g.name: g for g in a.groups}
    consumers: dict = {}
    out = []
    for name in names:
        g = groups[name]
        links = []
        for cname in dict.fromkeys(s.module for s in g.consumers):
            if cname not in consumers:
                consumers[cname] = pricing.consumer_for(model, a.gm, cname, bn_mode, name)
            links.append(pricing.link(g, consumers[cname]))
        out.append(pricing.Target(g, LayerSearch(name, g.size, start=0, iters_per_half=1,
                                                 thresh=0.1, parts=g.granularity), links))
    return out, consumers


def _cbr(cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class TinyResNeXt(nn.Module):
    """A ResNeXt bottleneck (1x1 -> grouped 3x3, 4 conv groups -> 1x1, residual add) and a
    ``chunk(2)`` into two branches: groups with granularity 4 (``reduce.0``: read by the grouped
    conv; ``grouped.0``: made by it) and 2 (``split.0``: each half read by its own conv)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.reduce = _cbr(16, 12)
        self.grouped = _cbr(12, 12, 3, groups=4)
        self.expand = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.split = _cbr(16, 10)
        self.left, self.right = _cbr(5, 6, 3), _cbr(5, 6, 3)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.expand(self.grouped(self.reduce(x))))
        a, b = self.split(x).chunk(2, dim=1)
        y = torch.cat([self.left(a), self.right(b)], dim=1)
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("case", ["lenet-batch", "lenet-running", "resnet8", "projection-all",
                                  "grouped", "tokens"])
def test_price_equals_masked_forwards(case: str, monkeypatch) -> None:
    torch.manual_seed(0)
    if case.startswith("lenet"):
        model, x = lenet5_bn(), torch.randn(16, 1, 28, 28)
        names = ["conv1", "conv2"]
    elif case == "resnet8":
        model, x = resnet_cifar(8), torch.randn(8, 3, 32, 32)
        names = ["layer1.0.conv1", "layer3.0.conv1"]
    elif case == "tokens":  # Linears over tokens and channels-last maps, post none and ReLU
        model, x = TokenNet(), torch.randn(4, 3, 16, 16)
        names = ["fc1", "fc3", "pw1"]
    elif case == "grouped":  # read by a grouped conv; made by one; two chunk halves
        model, x = TinyResNeXt(), torch.randn(8, 3, 12, 12)
        names = ["reduce.0", "grouped.0", "split.0"]
    else:  # a residual stream coupled through adds, read by a conv and the Linear; and a
        # group read by two convs
        model, x = ProjectionNet(), torch.randn(8, 3, 16, 16)
        names = ["b1_out.0", "stem.0"]
    bn_mode = "running" if case == "lenet-running" else "batch"
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # running statistics stay put across the forwards below
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    model.train()
    tgts, consumers = _targets(model, x[:1], names, bn_mode)
    gen = torch.Generator().manual_seed(1)
    for t in tgts:  # two filters of every part off (one of a part of 3)
        parts, part = t.search.parts, t.group.size // t.search.parts
        for j in range(parts):
            off = torch.randperm(part, generator=gen)[:2 if part > 3 else 1]
            t.search.alive[j * part + off] = False
        t.search.space = t.search.alive.clone()
    for c in consumers.values():
        keep = torch.ones(c.width)
        for t in tgts:
            for link in t.links:
                if link.consumer is c:
                    keep[link.pos_full] = t.search.alive[link.chan_full].float()
        c.keep, c.capture = keep, True
    hooks = [h for c in consumers.values() for h in (
        c.module.register_forward_pre_hook(c.pre_hook),
        c.module.register_forward_hook(c.post_hook))]
    model(x)
    for h in hooks:
        h.remove()
    if case == "projection-all":
        assert [link.consumer.name for link in tgts[0].links] == ["b2.0", "fc"]
        assert [link.consumer.name for link in tgts[1].links] == ["b1.0", "b1_short.0"]
    if case == "tokens":
        assert [(c.name, c.post) for c in consumers.values()] == [
            ("fc2", "none"), ("fc4", "relu"), ("pw2", "none")]
    if case == "grouped":
        assert [t.search.parts for t in tgts] == [4, 4, 2]
        assert [link.consumer.module.groups for link in tgts[0].links] == [4]
        assert [link.consumer.name for link in tgts[2].links] == ["left.0", "right.0"]
    if case == "lenet-batch":
        assert [(c.norm, c.post) for c in consumers.values()] == [("batch", "relu"),
                                                                  ("none", "relu")]
        assert tgts[1].links[0].view_block == 16   # fc1 read as a conv with a (16, 1) kernel
    base_keep = {c: c.keep for c in consumers.values()}
    for c in consumers.values():
        c.keep = None  # the reference applies its own masks
    for t in tgts:
        masks = t.search.draw(6, gen)
        got = pricing.price(t, masks)
        want = _reference_t(model, t, x, masks, base_keep, bn_eval=bn_mode == "running")
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (t.name, got, want)
        monkeypatch.setattr(pricing, "PRICING", "loop")  # the authors' way, for the K = 1 bench
        assert torch.allclose(pricing.price(t, masks), want, rtol=1e-4, atol=1e-7)
        monkeypatch.setattr(pricing, "PRICING", "fused")


def _plain_output_norm2(self, y: torch.Tensor) -> torch.Tensor:
    """``||f(y)||^2`` the plain way: the follower's BN and ReLU applied, squared, summed in
    float64."""
    scale, shift, eps = self.norm_terms()
    y = y.detach().double()
    if self.norm == "batch":
        y = F.batch_norm(y, None, None, scale.double(), shift.double(), training=True, eps=eps)
    elif self.norm == "affine":
        y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if self.post == "relu":
        y = torch.relu(y)
    return y.pow(2).sum()


@pytest.mark.parametrize("shape", [(64, 16, 32, 32), (3, 5, 7, 1), (1, 4, 1, 1), (9, 7),
                                   (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("offset", [0.0, 3.0, 1e3])
def test_channel_variance_is_bn_batch_variance(shape, offset) -> None:
    """The per-channel sums of y and y^2 (float64) against the float64 variance over every dim
    but 1, data far from zero included (a mean 1e3 times the spread), on a non-contiguous
    input."""
    g = torch.Generator().manual_seed(hash((shape, offset)) % 2**31)
    y = (torch.randn(shape[::-1], generator=g) + offset).permute(*range(len(shape) - 1, -1, -1))
    dims = [d for d in range(y.dim()) if d != 1]
    want = y.double().var(dim=dims, unbiased=False)
    got = pricing.channel_variance(y)
    assert got.dtype == torch.float64 and got.shape == (shape[1],)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-12 * (1 + offset ** 2)), (got, want)
    const = torch.full(shape, offset)       # a constant channel: exactly 0, never negative
    assert (pricing.channel_variance(const) >= 0).all()
    assert pricing.channel_variance(const).max() <= 1e-12 * (1 + offset ** 2)


def test_decisions_do_not_depend_on_the_pricing_path(monkeypatch) -> None:
    """The same seed gives the same decisions whether the step prices on the fast paths (every
    post-none follower on the moments path, ``||Y_base||^2`` by the closed form, one copy to the
    host per step) or on the fused kernel with ``||Y_base||^2`` computed the plain way."""
    from aofp_ext import ops
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(3)]

    def run() -> list[dict]:
        torch.manual_seed(0)
        r = aofp_ext.prune(resnet_cifar(8), data, example_inputs=data[0][0][:1],
                           target_flops=0.3, masks_per_step=8, thresh=0.3, iters_per_half=1,
                           warmup_iters=0, max_steps=8, progress=False)
        return r.report["history"]

    chosen = []
    auto = ops._path

    def moments(x, weight, masks, args, forced, output):
        chosen.append(auto(x, weight, masks, args, True, output))
        return chosen[-1]

    monkeypatch.setattr(ops, "_path", moments)
    fast = run()
    # the resnet's followers (conv + BN, post none) all priced so
    assert chosen and all(c in ("moments", "varying") for c in chosen)
    assert sum(m["action"] == "prune" for m in fast) >= 2
    assert sum(m["action"] == "halve" for m in fast) >= 2
    monkeypatch.setattr(ops, "_path", lambda *a, **k: "fused")
    monkeypatch.setattr(pricing.Consumer, "output_norm2", _plain_output_norm2)
    plain = run()
    assert len(plain) == len(fast)
    for a, b in zip(fast, plain):
        assert {k: v for k, v in a.items() if k != "worst"} == {
            k: v for k, v in b.items() if k != "worst"}
        assert a["worst"] == pytest.approx(b["worst"], rel=1e-4)


def test_macs_bookkeeping_equals_count_flops_after_the_cut() -> None:
    gen = torch.Generator().manual_seed(0)
    for model, example, targets in ((lenet5_bn(), LENET_IN, "auto"),
                                    (resnet_cifar(20), torch.zeros(1, 3, 32, 32), "auto"),
                                    (TinyResNeXt(), torch.zeros(1, 3, 12, 12), "all")):
        a = analyze(model, example)
        groups = pricing.select_targets(a.groups, targets, model)
        tgts = [pricing.Target(g, LayerSearch(g.name, g.size, start=0, iters_per_half=1,
                                              thresh=0.1, parts=g.granularity), [])
                for g in groups]
        macs = pricing.MacsModel(model, example, tgts)
        assert macs.total == aofp_ext.count_flops(model, example)[0]
        least = copy.deepcopy(model)  # one filter left per target, one per part with parts
        aofp_ext.prune_channels_(least, {t.name: torch.arange(0, t.group.size,
                                                              t.group.size // t.search.parts)
                                         for t in tgts}, example_inputs=example)
        assert macs.smallest() == aofp_ext.count_flops(least, example)[0]
        for t in tgts:  # the same random count off in every part
            part = t.group.size // t.search.parts
            n = int(torch.randint(1, part, (), generator=gen))
            for j in range(t.search.parts):
                t.search.alive[j * part + torch.randperm(part, generator=gen)[:n]] = False
        cut = copy.deepcopy(model)
        aofp_ext.prune_channels_(cut, {t.name: t.search.alive.nonzero().flatten() for t in tgts},
                                 example_inputs=example)
        assert macs.current() == aofp_ext.count_flops(cut, example)[0]


# ---- end to end -----------------------------------------------------------------------------


def test_prune_lenet_on_mnist_end_to_end(mnist_small, tmp_path) -> None:
    model = trained_lenet(mnist_small)
    test = DataLoader(TensorDataset(mnist_small["xte"], mnist_small["yte"]), batch_size=500)
    x_probe = mnist_small["xte"][:8]
    result = aofp_ext.prune(
        model, loader(mnist_small), example_inputs=LENET_IN, target_flops=0.6,
        masks_per_step=16, thresh=0.05, iters_per_half=2, warmup_iters=1, max_steps=80,
        finetune_epochs=1, eval_fn=aofp_ext.accuracy(test), progress=False, out_dir=tmp_path)
    r = result.report
    assert result.model is model
    assert r["stop_reason"] == "target" and r["reached_target"]
    macs, params = aofp_ext.count_flops(model, LENET_IN)
    assert (macs, params) == (r["macs_after"], r["params_after"])
    assert macs <= 0.6 * r["macs_before"] and r["macs_before"] == 2_293_000
    # channels are gone for real, and the keep-sets say which
    assert model.conv1.out_channels == r["widths_after"]["conv1"] < 20 or (
        model.conv2.out_channels == r["widths_after"]["conv2"] < 50)
    assert model.bn2.num_features == model.conv2.out_channels == model.fc1.in_features // 16
    rec = pruning_record(model)
    assert {k: len(v) for k, v in rec.keep.items()} == {
        k: v for k, v in r["widths_after"].items() if v < r["widths_before"][k]}
    # the history explains every pruned channel
    pruned = {n: sum(len(m["pruned"]) for m in r["history"] if m["layer"] == n)
              for n in r["targets"]}
    assert pruned == {n: r["widths_before"][n] - r["widths_after"][n] for n in r["targets"]}
    assert r["steps"] >= 1 and r["search_seconds"] > 0 and r["finetune_seconds"] > 0
    assert r["accuracy_before"] > 70
    assert r["accuracy_after_finetune"] > r["accuracy_before"] - 10
    # inference latency of the pruned model next to the original's (on by default), at batch 1
    # and the training batch (64), in one run
    lat = r["latency"]
    assert lat["training_batch"] == 64 and lat["threads"] == torch.get_num_threads()
    assert set(lat["original"]) == set(lat["pruned"]) == set(lat["speedup"]) == {1, 64}
    for b in (1, 64):
        assert lat["original"][b]["repeats"] == lat["pruned"][b]["repeats"] == 10
        assert 0 < lat["pruned"][b]["min_s"] <= lat["pruned"][b]["median_s"]
        assert lat["speedup"][b] == pytest.approx(
            lat["original"][b]["median_s"] / lat["pruned"][b]["median_s"])
    # outputs: report files and a model that aofp_ext.load restores
    assert json.loads((tmp_path / "report.json").read_text())["macs_after"] == macs
    md = (tmp_path / "report.md").read_text()
    assert "| conv1 | 20 |" in md and "Inference latency (cpu, " in md
    assert f"| 64 | {lat['original'][64]['median_s'] * 1e3:.2f} ms | " in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "widths.png").stat().st_size > 1000
    fresh = aofp_ext.load(lenet5_bn(), tmp_path / "model.pt").eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x_probe), model(x_probe), atol=1e-5)


def _run(data, folder, finetune_epochs=1, **kw):
    torch.manual_seed(123)  # the run reseeds; this only proves the outside RNG does not matter
    return aofp_ext.prune(
        trained_lenet(data), loader(data, n=384, seed=5), example_inputs=LENET_IN,
        target_flops=0.55, masks_per_step=8, thresh=0.08, iters_per_half=2, warmup_iters=1,
        max_steps=40, finetune_epochs=finetune_epochs, progress=False, checkpoint_dir=folder,
        checkpoint_every=4, **kw)


def _same_models(a: nn.Module, b: nn.Module) -> None:
    rec_a, rec_b = pruning_record(a), pruning_record(b)
    assert rec_a.keep.keys() == rec_b.keep.keys() and rec_a.keep
    for k in rec_a.keep:
        assert torch.equal(rec_a.keep[k], rec_b.keep[k])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_after_an_interruption_equals_an_uninterrupted_run(mnist_small, tmp_path) -> None:
    full = _run(mnist_small, tmp_path / "a")

    class Stop(Exception):
        pass

    def interrupt(step: int, info: dict) -> None:
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        _run(mnist_small, tmp_path / "b", callback=interrupt)
    saved = torch.load(tmp_path / "b" / pruner.CHECKPOINT_NAME, weights_only=True)
    assert saved["phase"] == "search" and saved["step"] == 4
    resumed = _run(mnist_small, tmp_path / "b")
    assert resumed.report["resumed_from"] == "search step 4"
    assert full.report["history"] == resumed.report["history"]
    assert full.report["steps"] == resumed.report["steps"]
    assert any(m["action"] == "prune" and m["step"] > 4 for m in full.report["history"])
    _same_models(full.model, resumed.model)
    # a finished folder: calling again returns the same model without running anything
    again = _run(mnist_small, tmp_path / "b")
    assert again.report["resumed_from"].startswith("done")
    _same_models(again.model, full.model)


def test_resume_during_finetuning(mnist_small, tmp_path) -> None:
    full = _run(mnist_small, tmp_path / "a", finetune_epochs=2)
    calls = []

    class Stop(Exception):
        pass

    def loss_fn(out, y):  # called once per search step, then once per finetune step
        calls.append(1)
        if len(calls) == full.report["steps"] + 6 + 3:  # 6 batches per epoch: in epoch 2
            raise Stop
        return F.cross_entropy(out, y)

    with pytest.raises(Stop):
        _run(mnist_small, tmp_path / "b", finetune_epochs=2, loss_fn=loss_fn)
    saved = torch.load(tmp_path / "b" / pruner.CHECKPOINT_NAME, weights_only=True)
    assert saved["phase"] == "finetune" and saved["epoch"] == 1
    resumed = _run(mnist_small, tmp_path / "b", finetune_epochs=2)
    assert resumed.report["resumed_from"].startswith("finetune")
    assert resumed.report["history"] == full.report["history"]
    assert resumed.report["accuracy_after_search"] == full.report["accuracy_after_search"]
    _same_models(full.model, resumed.model)


# ---- bad input ------------------------------------------------------------------------------


def _small_loader(shape=(1, 28, 28), n=64):
    return DataLoader(TensorDataset(torch.randn(n, *shape), torch.randint(0, 10, (n,))),
                      batch_size=32)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_target_flops_outside_0_1(value) -> None:
    with pytest.raises(ValueError, match=r"target_flops must be a fraction in \(0, 1\]"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), example_inputs=LENET_IN,
                       target_flops=value, progress=False)


def test_loader_with_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"train_loader yields inputs of shape \(32, 3, 32, 32\)"
                                         r".*must be \(1, 28, 28\)"):
        aofp_ext.prune(lenet5_bn(), _small_loader((3, 32, 32)), example_inputs=LENET_IN,
                       progress=False)
    bare = DataLoader(torch.randn(64, 1, 28, 28), batch_size=32)  # tensors, not pairs
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pairs"):
        aofp_ext.prune(lenet5_bn(), bare, example_inputs=LENET_IN, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        aofp_ext.prune(lenet5_bn(), [], example_inputs=LENET_IN, progress=False)


def test_no_prunable_groups() -> None:
    flat = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())  # its channels reach the output
    with pytest.raises(ValueError, match="no prunable channel group.*reaches the model output"):
        aofp_ext.prune(flat, _small_loader(), example_inputs=LENET_IN, progress=False)

    class Residual(nn.Module):  # the only conv group meets a residual add
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            y = F.relu(self.a(x))
            y = F.relu(self.b(y) + y)
            return self.fc(y.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="targets='all'"):
        aofp_ext.prune(Residual(), _small_loader(), example_inputs=LENET_IN, progress=False)
    with pytest.raises(ValueError, match="unknown channel group 'nope'"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), example_inputs=LENET_IN,
                       targets=["nope"], progress=False)


def test_other_bad_arguments(tmp_path) -> None:
    kw = dict(example_inputs=LENET_IN, progress=False)
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of aofp, "):
        aofp_ext.prune(lenet5_bn(), _small_loader(), method="nope", **kw)
    with pytest.raises(ValueError, match="bad method_options for method 'l1'"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), method="l1", method_options={"x": 1}, **kw)
    with pytest.raises(ValueError, match="method_options applies to the criteria"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), method_options={"x": 1}, **kw)
    with pytest.raises(ValueError, match="calibration_batches must be a positive integer"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), method="l1", calibration_batches=0, **kw)
    with pytest.raises(ValueError, match="masks_per_step must be a positive integer"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), masks_per_step=0, **kw)
    with pytest.raises(ValueError, match="bn_mode"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), bn_mode="eval", **kw)
    with pytest.raises(ValueError, match="cannot be reached"):  # fc1 and fc2 are not searched
        aofp_ext.prune(lenet5_bn(), _small_loader(), target_flops=0.01, **kw)
    with pytest.warns(UserWarning, match="stopped at max_steps=1"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), max_steps=1, checkpoint_dir=tmp_path,
                       masks_per_step=4, **kw)
    with pytest.raises(ValueError, match="other settings.*masks_per_step"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), max_steps=1, checkpoint_dir=tmp_path,
                       masks_per_step=8, **kw)


def test_nan_loss_stops_saves_and_says_so(tmp_path) -> None:
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if len(calls) == 4 else loss

    model = lenet5_bn()
    with pytest.raises(aofp_ext.NonFiniteLossError,
                       match=r"loss is nan at search step 3.*saved in .*aofp-checkpoint.pt"):
        aofp_ext.prune(model, _small_loader(), example_inputs=LENET_IN, loss_fn=loss_fn,
                       masks_per_step=4, checkpoint_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / pruner.CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 3 and saved["nonfinite"]
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    with pytest.raises(aofp_ext.NonFiniteLossError, match="pass checkpoint_dir"):
        aofp_ext.prune(lenet5_bn(), _small_loader(), example_inputs=LENET_IN,
                       loss_fn=lambda o, y: F.cross_entropy(o, y) * float("inf"),
                       progress=False)


def test_targets_all_and_named_groups_end_to_end() -> None:
    # a residual stream coupled through adds (targets="all") and a Linear-made group (by name)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,))
    data = DataLoader(TensorDataset(x, y), batch_size=32)
    net = ProjectionNet()
    r = aofp_ext.prune(net, data, example_inputs=x[:1], target_flops=0.8, targets="all",
                       masks_per_step=4, thresh=10.0, iters_per_half=1, warmup_iters=0,
                       progress=False).report
    assert "b1_out.0" in r["targets"] and r["reached_target"]
    assert r["latency"]["training_batch"] == 32 and set(r["latency"]["speedup"]) == {1, 32}
    assert aofp_ext.count_flops(net, x[:1])[0] == r["macs_after"]
    assert net(x).shape == (64, 5)
    lenet = lenet5_bn()
    r = aofp_ext.prune(lenet, _small_loader(), example_inputs=LENET_IN, target_flops=0.9,
                       targets=["fc1"], masks_per_step=4, thresh=10.0, iters_per_half=1,
                       warmup_iters=0, progress=False, latency=False).report
    assert r["targets"] == ["fc1"] and lenet.fc1.out_features == r["widths_after"]["fc1"] < 500
    assert r["latency"] is None   # latency=False: not measured, no copy of the model kept
    assert lenet.fc2.in_features == lenet.fc1.out_features


def test_grouped_conv_and_chunk_groups_are_searched_with_equal_counts_per_part() -> None:
    # targets="all" on a ResNeXt-like block and a chunk: the groups with a granularity are
    # searched (equal counts pruned in every part), cut with `groups` valid, and the pruned model
    # computes what masked_forward of the model at the cut computes with the same keep-sets
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 5, (64,))
    data = DataLoader(TensorDataset(x, y), batch_size=32)
    net = TinyResNeXt()
    states: list[dict] = []  # the model after every search step: the last one is cut
    r = aofp_ext.prune(net, data, example_inputs=x[:1], target_flops=0.3, targets="all",
                       masks_per_step=4, thresh=10.0, iters_per_half=1, warmup_iters=0,
                       max_steps=12, progress=False,
                       callback=lambda step, info: states.append(copy.deepcopy(net.state_dict())))
    r = r.report
    parts = {"reduce.0": 4, "grouped.0": 4, "split.0": 2}
    assert set(parts) <= set(r["targets"]) and r["reached_target"]
    for name, n in parts.items():  # every part keeps the same count, and fewer than before
        assert r["widths_after"][name] < r["widths_before"][name]
        assert r["widths_after"][name] % n == 0
    for move in r["history"]:
        assert move["parts"] == parts.get(move["layer"], 1)
    keep = pruning_record(net).keep
    for name, n in parts.items():
        counts = torch.bincount(keep[name] // (r["widths_before"][name] // n), minlength=n)
        assert (counts == counts[0]).all() and len(keep[name]) == r["widths_after"][name]
    conv = net.grouped[0]
    assert conv.groups == 4 and conv.in_channels == r["widths_after"]["reduce.0"]
    assert conv.out_channels == r["widths_after"]["grouped.0"]
    assert net.left[0].in_channels == net.right[0].in_channels == r["widths_after"]["split.0"] // 2
    original = TinyResNeXt()
    original.load_state_dict(states[-1])
    net.eval(), original.eval()
    with torch.no_grad():
        want = aofp_ext.masked_forward(original, keep, x)
        got = net(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


def test_criteria_still_skip_groups_with_a_granularity() -> None:
    # a criterion ranks channels one by one: it does not search grouped-conv or chunk groups
    x, y = torch.randn(32, 3, 12, 12), torch.randint(0, 5, (32,))
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    kw = dict(example_inputs=x[:1], target_flops=0.8, progress=False, calibration_batches=1)
    r = aofp_ext.prune(TinyResNeXt(), data, method="l1", targets="all", **kw).report
    assert r["targets"] == ["stem.0", "left.0", "right.0"]
    with pytest.raises(ValueError, match="'reduce.0'.*method='aofp' searches it"):
        aofp_ext.prune(TinyResNeXt(), data, method="l1", targets=["reduce.0"], **kw)


def test_resnext50_auto_targets_its_grouped_conv_groups() -> None:
    # torchvision's ResNeXt-50 (32x4d): every bottleneck's conv1 (read by the grouped conv2) and
    # conv2 (the grouped conv's own output) groups have granularity 32; "auto" searches them all
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnext50_32x4d(weights=None).eval()
    groups = aofp_ext.channel_groups(model, torch.zeros(1, 3, 64, 64))
    names = {g.name for g in pricing.select_targets(groups, "auto", model)}
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 16
    for b in blocks:
        assert {f"{b}.conv1", f"{b}.conv2"} <= names
    by_name = {g.name: g for g in groups}
    assert {by_name[f"{b}.conv{i}"].granularity for b in blocks for i in (1, 2)} == {32}
    assert all(g.granularity == 1  # the criteria's selection
               for g in pricing.select_targets(groups, "auto", model, search_parts=False))


def test_grouped_search_resumes_identically(tmp_path) -> None:
    # the per-part search state (parts, equal-count spaces) goes through a run checkpoint
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 5, (64,))
    data = DataLoader(TensorDataset(x, y), batch_size=32)
    init = TinyResNeXt().state_dict()

    def run(folder, callback=None):
        net = TinyResNeXt()
        net.load_state_dict(init)
        return aofp_ext.prune(net, data, example_inputs=x[:1], target_flops=0.3, targets="all",
                              masks_per_step=4, thresh=0.5, iters_per_half=2, warmup_iters=0,
                              max_steps=30, checkpoint_dir=folder, checkpoint_every=2,
                              progress=False, callback=callback)

    class Stop(Exception):
        pass

    def interrupt(step: int, info: dict) -> None:
        if step == 5:
            raise Stop

    full = run(tmp_path / "a")
    with pytest.raises(Stop):
        run(tmp_path / "b", callback=interrupt)
    resumed = run(tmp_path / "b")
    assert resumed.report["resumed_from"] == "search step 4"
    assert full.report["history"] == resumed.report["history"]
    assert any(m["action"] == "prune" and m["parts"] > 1 and m["step"] >= 4  # after the resume
               for m in full.report["history"])
    _same_models(full.model, resumed.model)


@pytest.mark.parametrize("kind", ["conv1d", "linear", "tokens", "flatten", "grouped"])
def test_captured_output_views_match_the_follower_views(kind, monkeypatch) -> None:
    """The output a BN follower's hook keeps is viewed as the pricing views the follower (a
    Conv1d as a conv of width 1, a Linear over tokens over every position, a Linear after
    flatten as a conv with a (block, 1) kernel, a grouped conv split by groups): the damages
    with it equal those without it, on the varying path and on the fused pass; an output
    changed in place after the capture is not used."""
    from aofp_ext import _varying, ops, pricing
    g = torch.Generator().manual_seed(61)
    block = 1
    if kind == "conv1d":
        m, x = nn.Conv1d(8, 6, 3, padding=1), torch.randn(5, 8, 9, generator=g)
    elif kind == "linear":
        m, x = nn.Linear(8, 6), torch.randn(40, 8, generator=g)
    elif kind == "tokens":
        m, x = nn.Linear(8, 6), torch.randn(4, 7, 8, generator=g)
    elif kind == "flatten":
        block = 4
        m, x = nn.Linear(8 * block, 6), torch.randn(30, 8 * block, generator=g)
    else:
        m, x = nn.Conv2d(8, 6, 3, padding=1, groups=2), torch.randn(3, 8, 5, 5, generator=g)
    bn = nn.BatchNorm1d(6) if kind != "grouped" else nn.BatchNorm2d(6)
    c = pricing.Consumer("f", m, 8 * block, "batch", bn, "none", capture=True)
    m.register_forward_pre_hook(c.pre_hook)
    m.register_forward_hook(c.post_hook)
    with torch.no_grad():
        m(x)
    (call,) = c.calls
    assert call.output() is not None
    pos = torch.arange(8 * block) if block == 1 else torch.arange(8)
    link = pricing.Link(c, torch.arange(8), pos if block == 1 else torch.arange(8),
                        torch.arange(8 * block), torch.arange(8).repeat_interleave(block), block)
    xv, wv, kw = pricing.follower_view(link, call.x)
    yv = pricing.output_view(link, call.output(), call.x)
    masks = torch.rand(9, xv.shape[1], generator=g) < 0.5
    masks[:, :2] = True                                  # kept by every mask
    scale, shift, eps = c.norm_terms()
    args = dict(**kw, norm="batch", scale=scale, shift=shift, eps=eps,
                bias=m.bias.detach())
    ref = ops.masked_damage_reference(xv, wv.detach(), masks, **args)
    monkeypatch.setattr(_varying, "FORCE", True)
    for method in ("moments", "fused"):
        got = ops.masked_damage(xv, wv.detach(), masks, method=method, output=yv, **args)
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-6), (method, got, ref)
    call.y.add_(1.0)                                     # changed in place: not used
    assert call.output() is None
