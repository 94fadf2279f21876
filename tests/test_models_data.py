"""The shipped weights and data: ResNet accuracy on the CIFAR-10 subset, the MNIST and CIFAR-10
readers, the restricted unpickler, and clear errors on corrupt files."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from _nets import data_dir

import aofp_ext
from aofp_ext.data import DataFormatError, cifar10, read_cifar10, read_cifar10_batch, read_idx
from aofp_ext.models import load_pretrained, resnet20, resnet56

CIFAR = data_dir() / "cifar10-subset" / "cifar-10-batches-py"
WEIGHTS = data_dir() / "weights"


def accuracy(model: torch.nn.Module) -> float:
    x, y = cifar10(CIFAR, "test").tensors
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return (pred == y).float().mean().item()


def test_resnet56_shipped_weights_accuracy_and_macs() -> None:
    model = load_pretrained(resnet56(), WEIGHTS / "resnet56-4bfd9763.th")
    acc = accuracy(model)
    print(f"ResNet-56 on the 1,017 shipped CIFAR-10 test images: {acc:.2%}")
    assert acc >= 0.92
    macs, params = aofp_ext.count_flops(model, torch.zeros(1, 3, 32, 32))
    assert 125e6 <= macs <= 126e6 and params == 853_018


def test_resnet20_shipped_weights_accuracy() -> None:
    acc = accuracy(load_pretrained(resnet20(), WEIGHTS / "resnet20-12fca82f.th"))
    print(f"ResNet-20 on the 1,017 shipped CIFAR-10 test images: {acc:.2%}")
    assert acc >= 0.90


def test_pruned_pretrained_resnet56_matches_its_preview() -> None:
    model = load_pretrained(resnet56(), WEIGHTS / "resnet56-4bfd9763.th").eval()
    x = cifar10(CIFAR, "test").tensors[0][:8]
    plan = {f"layer{s}.{i}.conv1": torch.arange(0, 16 * 2 ** (s - 1), 2)
            for s in (1, 2, 3) for i in range(9)}  # half of every first conv of a block
    aofp_ext.channel_groups(model, x)
    with torch.no_grad():
        expected = aofp_ext.masked_forward(model, plan, x)
        aofp_ext.prune_channels_(model, plan)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    macs, _ = aofp_ext.count_flops(model, x[:1])
    assert macs == 125_485_696 - sum(  # each halved conv1 saves half of itself and of conv2
        hw * hw * 9 * planes * planes for planes, hw in ((16, 32), (32, 16), (64, 8))
        for _ in range(9)) + (32 * 16 * 16 * 9 * 16 + 64 * 8 * 8 * 9 * 32) // 2


def test_load_pretrained_variants_and_mismatch(tmp_path) -> None:
    state = resnet20().state_dict()
    plain = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, tmp_path / "plain.pt")  # no wrapper, no prefix
    model = load_pretrained(resnet20(), tmp_path / "plain.pt")
    assert torch.equal(model.linear.weight, state["linear.weight"])
    with pytest.raises(ValueError, match="does not fit ResNetCifar"):
        load_pretrained(resnet56(), WEIGHTS / "resnet20-12fca82f.th")


# ---- MNIST --------------------------------------------------------------------------------------


def test_mnist_reader() -> None:
    images, labels = aofp_ext.data.read_mnist(data_dir() / "mnist", "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                               1009]
    train = aofp_ext.data.mnist(data_dir() / "mnist", "train")
    x, y = train.tensors
    assert x.shape == (60_000, 1, 28, 28) and y.shape == (60_000,)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2  # normalised
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_idx_errors(tmp_path) -> None:
    good = gzip.decompress((data_dir() / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "short").write_bytes(good[:-3])
    with pytest.raises(DataFormatError, match="header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(DataFormatError, match="not an idx file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:200])
    with pytest.raises(DataFormatError, match="cannot read"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        aofp_ext.data.read_mnist(tmp_path, "test")


# ---- CIFAR-10 ------------------------------------------------------------------------------------


def test_cifar10_reader() -> None:
    images, labels = read_cifar10(CIFAR, "test")
    assert images.shape == (1017, 3, 32, 32) and images.dtype == torch.uint8
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    train_x, train_y = read_cifar10(CIFAR.parent, "train")  # the parent folder works too
    assert train_x.shape == (4000, 3, 32, 32) and train_y.shape == (4000,)
    x, _ = cifar10(CIFAR, "test").tensors
    mean = torch.tensor(aofp_ext.data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(aofp_ext.data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)


def _batch(data, labels, protocol: int = 4) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data}, protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_rebuilds_numpy_arrays(tmp_path, protocol) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    labels = [1, 0, 9, 3, 3]
    for i, (d, lab) in enumerate([(data, labels), (np.asfortranarray(data), labels),
                                  (data, np.array(labels, dtype=np.int64))]):
        (tmp_path / f"b{i}").write_bytes(_batch(d, lab, protocol))
        x, y = read_cifar10_batch(tmp_path / f"b{i}")
        assert torch.equal(x, torch.from_numpy(data).view(5, 3, 32, 32))
        assert y.tolist() == labels


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_runs_no_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil").write_bytes(_batch(_Evil(str(marker)), [0]))
    with pytest.raises(DataFormatError, match=r"refusing global (posix|os)\.system"):
        read_cifar10_batch(tmp_path / "evil")
    assert not marker.exists()
    (tmp_path / "objects").write_bytes(_batch(np.array([[1]], dtype=object), [0]))
    with pytest.raises(DataFormatError, match="not a plain integer dtype"):
        read_cifar10_batch(tmp_path / "objects")


def test_corrupt_cifar_batches(tmp_path) -> None:
    raw = (CIFAR / "test_batch").read_bytes()
    (tmp_path / "truncated").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="truncated.*not a valid CIFAR-10 python batch"):
        read_cifar10_batch(tmp_path / "truncated")
    (tmp_path / "noise").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataFormatError, match="not a valid CIFAR-10"):
        read_cifar10_batch(tmp_path / "noise")
    (tmp_path / "shape").write_bytes(_batch(np.zeros((2, 100), np.uint8), [0, 1]))
    with pytest.raises(DataFormatError, match=r"\(N, 3072\)"):
        read_cifar10_batch(tmp_path / "shape")
    (tmp_path / "labels").write_bytes(_batch(np.zeros((2, 3072), np.uint8), [0, 10]))
    with pytest.raises(DataFormatError, match="2 ints in 0..9"):
        read_cifar10_batch(tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 train batches"):
        read_cifar10(tmp_path, "train")


def test_default_data_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AOFP_DATA_DIR", str(tmp_path))
    assert aofp_ext.data.default_data_dir() == tmp_path
    monkeypatch.delenv("AOFP_DATA_DIR")
    assert aofp_ext.data.default_data_dir().parts[-2:] == ("shared", "data")
