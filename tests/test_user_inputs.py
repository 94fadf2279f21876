"""What users bring: a model named by a spec (built-in, ``PKG.MODULE:FACTORY``, ``timm:NAME``),
a weights file (state dict or ``aofp_ext.save`` file; missing, corrupt, foreign or ill-fitting
files give one clear error naming the file) and an image folder."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import aofp_ext
from aofp_ext.checkpoint import WeightsFileError, load_weights
from aofp_ext.models import ModelSpecError, from_spec
from aofp_ext.models.resnet_cifar import resnet20


def test_builtin_and_module_factory_specs():
    assert type(from_spec("resnet20")).__name__ == "ResNetCifar"
    conv = from_spec("torch.nn:Conv2d", {"in_channels": 3, "out_channels": 5, "kernel_size": 3})
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == 5
    seq = from_spec("torch.nn.modules.container:Sequential")
    assert isinstance(seq, nn.Sequential)


@pytest.mark.parametrize("spec, kwargs, message", [
    ("resnet5000", {}, "expected a built-in name"),
    ("no_such_pkg.nets:build", {}, "cannot import module 'no_such_pkg.nets'"),
    ("torch.nn:NoSuchNet", {}, "has no attribute 'NoSuchNet'"),
    ("torch.nn:Conv2d", {"bogus": 1}, "the factory raised TypeError"),
    ("torch:pi", {}, "'pi' is not callable"),
    ("torch:zeros", {"size": (2,)}, "returned Tensor, not a torch.nn.Module"),
    ("torch.nn:Conv2d", {"pretrained": True}, "would download weights"),
    (":x", {}, "expected a built-in name"),
])
def test_bad_specs_name_the_spec(spec, kwargs, message):
    with pytest.raises(ModelSpecError, match=re.escape(message)) as info:
        from_spec(spec, kwargs)
    assert repr(spec) in str(info.value)


def test_torchvision_and_timm_specs():
    pytest.importorskip("torchvision")
    m = from_spec("torchvision.models:resnet18", {"num_classes": 7})
    assert m.fc.out_features == 7
    with pytest.raises(ModelSpecError, match="would download"):
        from_spec("torchvision.models:resnet18", {"weights": "DEFAULT"})
    timm = pytest.importorskip("timm")
    assert isinstance(from_spec("timm:resnet18", {"num_classes": 3}), timm.models.ResNet)
    with pytest.raises(ModelSpecError, match="timm has no model 'no_such_model'"):
        from_spec("timm:no_such_model")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return resnet20()


def test_load_weights_plain_wrapped_and_pruned(tmp_path):
    src = _net()
    x = torch.randn(2, 3, 32, 32)
    src.eval()
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        dst = resnet20().eval()
        load_weights(dst, tmp_path / name)
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # an aofp_ext.save file: cut to its keep-sets, then loaded
    groups = [g for g in aofp_ext.channel_groups(src, x[:1]) if g.prunable]
    plan = {g.name: torch.arange(0, g.size, 2) for g in groups}
    aofp_ext.prune_channels_(src, plan, example_inputs=x[:1])
    aofp_ext.save(src, tmp_path / "pruned.pt")
    dst = load_weights(resnet20(), tmp_path / "pruned.pt").eval()
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_weights_errors_name_the_file(tmp_path):
    model = _net()
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {"missing.pt": "no such file", "garbage.pt": "corrupt or not a PyTorch file",
             "text.pt": "corrupt or not a PyTorch file", "truncated.pt": "corrupt or not a PyTorch file",
             "module.pt": "pickled Python objects", "list.pt": "holds no state dict"}
    for name, message in cases.items():
        with pytest.raises(WeightsFileError, match=re.escape(message)) as info:
            load_weights(resnet20(), tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(WeightsFileError, match="corrupt"):
        aofp_ext.load(resnet20(), tmp_path / "truncated.pt")


def test_weights_that_do_not_fit_are_named(tmp_path):
    state = _net().state_dict()
    torch.save(state, tmp_path / "ok.pt")
    bad = dict(state)
    bad["linear.weight"] = torch.zeros(7, 64)
    bad["extra.weight"] = torch.zeros(1)
    del bad["conv1.weight"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(WeightsFileError) as info:
        load_weights(resnet20(), tmp_path / "bad.pt")
    msg = str(info.value)
    for part in ("bad.pt", "linear.weight: file (7, 64) vs model (10, 64)", "1 missing (conv1.weight)",
                 "1 unexpected (extra.weight)"):
        assert part in msg, msg
    with pytest.raises(WeightsFileError, match="does not fit Linear"):
        load_weights(nn.Linear(3, 3), tmp_path / "ok.pt")


def test_image_folder(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    from aofp_ext.data import DataFormatError, image_folder

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (40, 50, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / split / cls / f"{i}.png")
    train, val = image_folder(tmp_path, "train", 32), image_folder(tmp_path, "val", 32)
    assert (len(train), len(val)) == (6, 4) and train.classes == ["cat", "dog"]
    x, y = val[3]
    assert x.shape == (3, 32, 32) and y == 1 and x.dtype == torch.float32
    assert train[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="one subfolder of images per class"):
        image_folder(tmp_path / "nowhere", "train")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataFormatError, match=re.escape(str(tmp_path / "empty" / "train"))):
        image_folder(tmp_path / "empty", "train")
