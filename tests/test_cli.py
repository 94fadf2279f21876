"""The ``aofp`` command line: --help everywhere, the LeNet demo, prune then eval, bad flags."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from _nets import data_dir

from aofp_ext.cli import main
from aofp_ext.models import lenet5_bn


@pytest.mark.parametrize("argv", [[], ["prune"], ["eval"], ["demo"], ["bench"], ["info"]])
def test_help(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: aofp {' '.join(argv)}".rstrip())
    if argv == ["prune"]:
        for flag in ("--arch", "--weights", "--data", "--target-flops", "--out", "--device",
                     "--masks-per-step", "--finetune-epochs"):
            assert flag in out


def test_console_script_and_bench_passthrough() -> None:
    exe = [sys.executable, "-m", "aofp_ext.cli"]
    out = subprocess.run([*exe, "bench", "kernels", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage: kernels.py" in out.stdout


def test_demo_quick(capsys) -> None:
    rc = main(["demo", "--quick", "--no-progress", "--data-dir", str(data_dir())])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "LeNet-5-BN on the shipped MNIST" in out
    assert "accuracy before" in out and "after finetuning" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("MACs"))
    assert "2,293,000 ->" in line and float(line.split("(")[1].rstrip("%)")) <= 50


def test_prune_then_eval(tmp_path, capsys) -> None:
    weights = tmp_path / "lenet.pt"
    torch.save(lenet5_bn().state_dict(), weights)
    mnist = f"mnist:{data_dir() / 'mnist'}"
    rc = main(["prune", "--arch", "lenet5", "--weights", str(weights), "--data", mnist,
               "--target-flops", "0.8", "--out", str(tmp_path / "out"), "--masks-per-step", "8",
               "--iters-per-half", "2", "--warmup-iters", "1", "--thresh", "0.5",
               "--max-steps", "40", "--train-limit", "256", "--test-limit", "200",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "out" / "model.pt").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert (tmp_path / "out" / "checkpoint" / "aofp-checkpoint.pt").is_file()
    rc = main(["eval", "--arch", "lenet5", "--weights", str(tmp_path / "out" / "model.pt"),
               "--data", mnist, "--test-limit", "200"])
    out = capsys.readouterr().out
    assert rc == 0 and "on 200 mnist test images: accuracy" in out
    macs = int(out.split("%, ")[1].split(" MACs")[0].replace(",", ""))
    assert macs <= 0.8 * 2_293_000
    rc = main(["eval", "--arch", "lenet5", "--weights", str(tmp_path / "out" / "model.pt"),
               "--data", mnist, "--test-limit", "20", "--latency", "--latency-batch", "8",
               "--latency-repeats", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "latency (cpu, " in out and "median of 3 interleaved" in out, out
    rows = [ln for ln in out.splitlines() if ln.strip().startswith("batch")]
    assert [int(r.split()[1].rstrip(":")) for r in rows] == [1, 8], out
    for r in rows:  # both times positive, and a speed-up printed
        assert re.search(r"original +\d+\.\d{3} ms, this model +\d+\.\d{3} ms \(\d+\.\d\dx\)$", r), r
        assert float(r.split("this model")[1].split("ms")[0]) > 0, r


@pytest.mark.parametrize("argv, message", [
    (["prune", "--arch", "lenet5", "--weights", "w", "--data", "mnist", "--out", "o",
      "--target-flops", "1.5"], "must be a fraction in (0, 1]"),
    (["prune", "--arch", "lenet5", "--weights", "w", "--data", "imagenet", "--out", "o"],
     "--data must be cifar10[:DIR], mnist[:DIR] or folder:DIR"),
    (["eval", "--arch", "nope", "--weights", "w", "--data", "mnist"], "invalid choice"),
    (["eval", "--model", "resnet20", "--arch", "resnet20", "--weights", "w", "--data", "mnist"],
     "not allowed with argument"),
    (["eval", "--weights", "w", "--data", "mnist"], "one of the arguments --model --arch is required"),
    (["eval", "--model", "resnet20", "--model-kwargs", "[1]", "--weights", "w", "--data", "mnist"],
     "expected a JSON object"),
    (["eval", "--model", "resnet20", "--model-kwargs", "{num_classes: 3}", "--weights", "w",
      "--data", "mnist"], "expected a JSON object such as"),
    (["eval", "--model", "resnet20", "--weights", "w", "--data", "folder"],
     "--data folder:DIR needs the folder"),
])
def test_bad_flags(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_weights_file(tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"aofp: --weights: .*none\.pt: no such file"):
        main(["eval", "--arch", "lenet5", "--weights", str(tmp_path / "none.pt"), "--data",
              "mnist"])


def test_model_weights_and_data_errors_name_the_argument(tmp_path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)))
    lenet = tmp_path / "lenet.pt"
    torch.save(lenet5_bn().state_dict(), lenet)
    cases = [
        (["--model", "no_such_pkg.nets:build", "--weights", str(lenet), "--data", "mnist"],
         r"aofp: --model: model 'no_such_pkg.nets:build': cannot import module"),
        (["--model", "torch.nn:Conv2d", "--weights", str(lenet), "--data", "mnist"],
         r"aofp: --model: .*the factory raised TypeError"),
        (["--model", "lenet5", "--weights", str(garbage), "--data", "mnist"],
         r"aofp: --weights: .*garbage\.pt is corrupt or not a PyTorch file"),
        (["--model", "resnet20", "--weights", str(lenet), "--data", "cifar10"],
         r"aofp: --weights: .*lenet\.pt does not fit ResNetCifar"),
        (["--model", "lenet5", "--weights", str(lenet), "--data", f"folder:{tmp_path / 'nowhere'}"],
         r"aofp: --data: "),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(["eval", *argv])


def _image_folder(root, size: int = 20):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (size, size + 3, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(px.numpy()).save(root / split / cls / f"{i}.png")
    return root


def test_prune_own_model_on_an_image_folder(tmp_path, capsys) -> None:
    pytest.importorskip("torchvision")
    from _nets import ProjectionNet

    root = _image_folder(tmp_path / "images")
    torch.manual_seed(0)
    weights = tmp_path / "net.pt"
    torch.save({"state_dict": ProjectionNet().state_dict()}, weights)
    data = f"folder:{root}"
    rc = main(["prune", "--model", "_nets:ProjectionNet", "--weights", str(weights), "--data",
               data, "--input-size", "16", "--target-flops", "0.9", "--out", str(tmp_path / "out"),
               "--masks-per-step", "8", "--iters-per-half", "1", "--warmup-iters", "0",
               "--thresh", "1e9", "--max-steps", "8", "--batch-size", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rc = main(["eval", "--model", "_nets:ProjectionNet", "--weights",
               str(tmp_path / "out" / "model.pt"), "--data", data, "--input-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and "on 6 folder test images: accuracy" in out, out
    macs = int(out.split("%, ")[1].split(" MACs")[0].replace(",", ""))
    from aofp_ext import count_flops

    full, _ = count_flops(ProjectionNet(), torch.zeros(1, 3, 16, 16))
    assert macs <= 0.9 * full


def test_eval_a_torchvision_model_by_spec(tmp_path, capsys) -> None:
    tv = pytest.importorskip("torchvision")
    root = _image_folder(tmp_path / "images")
    torch.manual_seed(0)
    weights = tmp_path / "rn18.pt"
    torch.save(tv.models.resnet18(num_classes=2).state_dict(), weights)
    rc = main(["eval", "--model", "torchvision.models:resnet18", "--model-kwargs",
               '{"num_classes": 2}', "--weights", str(weights), "--data", f"folder:{root}",
               "--input-size", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("torchvision.models:resnet18 (") and "6 folder test images" in out
