"""Hand-written networks and helpers shared by the channel-group / surgery tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def mnist_small(n_test: int = 1000) -> dict:
    """1,024 training images (a seeded draw) and the first ``n_test`` test images of the shipped
    MNIST, and a LeNet-5-BN trained on them for two quick epochs (its state dict, ``"state"``)."""
    import copy

    from aofp_ext.data import mnist
    from aofp_ext.models import lenet5_bn

    root = data_dir() / "mnist"
    xtr, ytr = mnist(root, "train").tensors
    xte, yte = mnist(root, "test").tensors
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xtr), generator=g)[:1024]
    data = {"xtr": xtr[idx], "ytr": ytr[idx], "xte": xte[:n_test], "yte": yte[:n_test]}
    torch.manual_seed(0)
    model = lenet5_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for i in range(0, 1024, 64):
            loss = F.cross_entropy(model(data["xtr"][i:i + 64]), data["ytr"][i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    data["state"] = copy.deepcopy(model.state_dict())
    return data


def data_dir() -> Path:
    """The shipped data; a missing folder is a failure, not a skip."""
    path = Path(os.environ.get("AOFP_DATA_DIR", REPO.parent / "shared" / "data"))
    assert path.is_dir(), f"shipped data not found at {path} (set AOFP_DATA_DIR)"
    return path


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout))


class ProjectionNet(nn.Module):
    """ResNet with projection ("option B") shortcuts: conv + BN on the shortcut, so the whole
    residual stream is a prunable group coupled through the adds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.b1 = conv_bn(8, 12)
        self.b1_out = conv_bn(12, 16)
        self.b1_short = conv_bn(8, 16, k=1)
        self.b2 = conv_bn(16, 10)
        self.b2_out = conv_bn(10, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.b1_out(F.relu(self.b1(x))) + self.b1_short(x))
        y = F.relu(self.b2_out(F.relu(self.b2(y))) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class CatNet(nn.Module):
    """Two branches concatenated into a conv; a concatenation added to a conv output (a group
    whose members sit at offsets); a max-pool and a Flatten -> Linear head with BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 6)
        self.a = conv_bn(6, 5)
        self.b = conv_bn(6, 7, k=1)
        self.mix = conv_bn(12, 9)
        self.c = conv_bn(9, 4)
        self.d = conv_bn(9, 6)
        self.e = conv_bn(9, 10)
        self.fc1 = nn.Linear(10 * 4 * 4, 20)
        self.bn_fc = nn.BatchNorm1d(20)
        self.fc2 = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        ab = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)   # 12 = 5 + 7
        m = F.relu(self.mix(ab))                                        # 9
        s = torch.cat([self.c(m), self.d(m)], dim=1) + self.e(m)        # 10 = 4 + 6, and e
        s = F.max_pool2d(F.relu(s), 2)                                  # 8x8 -> 4x4
        h = F.relu(self.bn_fc(self.fc1(s.flatten(1))))
        return self.fc2(F.dropout(h, 0.5, self.training))


class FlattenNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> view(N, -1) -> Linear: each channel owns 16 neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)  # with a bias
        self.fc1 = nn.Linear(6 * 16, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BN realistic statistics (one training-mode pass), random affine terms; eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def random_plan(groups, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random keep-set of random size for every prunable group, keeping at least one channel
    of every producing conv/Linear (a group made of several, as a concatenation, could otherwise
    leave one of them empty) and the same number in each part of a group with a granularity."""
    plan = {}
    for g in groups:
        if g.prunable and g.granularity > 1:  # the same random count in each equal part
            part = g.size // g.granularity
            n = int(torch.randint(1, part + 1, (), generator=generator))
            plan[g.name] = torch.cat([torch.randperm(part, generator=generator)[:n] + i * part
                                      for i in range(g.granularity)]).sort().values
        elif g.prunable:
            n = int(torch.randint(1, g.size + 1, (), generator=generator))
            keep = set(torch.randperm(g.size, generator=generator)[:n].tolist())
            for s in g.producers:
                own = range(s.group_start, s.group_start + s.length)
                if s.role == "out" and not keep & set(own):
                    keep.add(own[int(torch.randint(s.length, (), generator=generator))])
            plan[g.name] = torch.tensor(sorted(keep))
    return plan


class TokenNet(nn.Module):
    """A small vision transformer / ConvNeXt mix: a conv patch embedding made tokens by
    ``flatten(2).transpose(1, 2)``, LayerNorm over the channels (the residual stream is not
    prunable), two MLP blocks of Linears over the tokens (GELU, and ReLU after the second
    Linear), a ConvNeXt block in channels-last (``permute`` -> Linear -> GELU -> Linear ->
    ``permute``, a layer scale), and a head on the class token."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 12), nn.Linear(12, dim)
        self.fc3, self.fc4 = nn.Linear(dim, 10), nn.Linear(10, 6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw1, self.pw2 = nn.Linear(6, 14), nn.Linear(14, 6)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))                      # (N, h * w, dim)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        t = torch.relu(self.fc4(torch.relu(self.fc3(self.norm(t)))))     # (N, h * w, 6)
        y = t.transpose(1, 2).reshape(n, 6, h, w)
        z = self.dw(y).permute(0, 2, 3, 1)                               # channels-last
        z = self.pw2(F.gelu(self.pw1(z))).permute(0, 3, 1, 2)
        y = y + self.scale * z
        return self.head(y.flatten(2).transpose(1, 2)[:, 0])
