"""The ``aofp`` command line: --help everywhere, the LeNet demo, prune then eval, bad flags."""

from __future__ import annotations

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


@pytest.mark.parametrize("argv, message", [
    (["prune", "--arch", "lenet5", "--weights", "w", "--data", "mnist", "--out", "o",
      "--target-flops", "1.5"], "must be a fraction in (0, 1]"),
    (["prune", "--arch", "lenet5", "--weights", "w", "--data", "imagenet", "--out", "o"],
     "--data must be cifar10[:DIR] or mnist[:DIR]"),
    (["eval", "--arch", "nope", "--weights", "w", "--data", "mnist"], "invalid choice"),
])
def test_bad_flags(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_weights_file(tmp_path) -> None:
    with pytest.raises(SystemExit, match="weights file .* not found"):
        main(["eval", "--arch", "lenet5", "--weights", str(tmp_path / "none.pt"), "--data",
              "mnist"])
