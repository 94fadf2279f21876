"""prune() under torch.distributed: two gloo processes on 127.0.0.1 (tests/_dist_worker.py).

(a) both ranks end with identical keep-sets and weights; (b) on a BN-free net the decisions
equal one process over the same global batches (with BatchNorm they cannot: DDP normalises each
rank's shard with its own batch statistics, docs/prune.md "Distributed"); (c) a rank that
crashes or stops responding makes the other stop with a DistributedError, never hang; (d) an
interrupted two-process run resumes to the uninterrupted result; and the CLI under torchrun.
Every process has a hard timeout, and every collective the process group's timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _nets import REPO, data_dir
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import aofp_ext
from aofp_ext import pruner
from aofp_ext.data import mnist
from aofp_ext.models import lenet5_bn

WORKER = Path(__file__).with_name("_dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
import _dist_worker as worker  # noqa: E402

N_TRAIN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(rank: int, world: int, port: int) -> dict[str, str]:
    e = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
             LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
             OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    if Path("/sys/class/net/lo").exists():
        e["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    return e


def start(scenario: str, folder: Path) -> dict[int, subprocess.Popen]:
    """Two ranks of ``scenario`` (their output goes to FOLDER/SCENARIO-rank{r}.log)."""
    port = free_port()
    procs = {}
    for r in (0, 1):
        with open(folder / f"{scenario}-rank{r}.log", "w") as log:
            procs[r] = subprocess.Popen([sys.executable, str(WORKER), scenario, str(folder)],
                                        env=env(r, 2, port), stdout=log,
                                        stderr=subprocess.STDOUT)
        procs[r].log = Path(log.name)
    return procs


def finish(procs: dict[int, subprocess.Popen], timeout: float,
           wait_for: tuple[int, ...] = (0, 1)) -> tuple[dict[int, int | None], dict[int, str]]:
    """Wait (at most ``timeout`` seconds in all) for the ranks ``wait_for``, then kill whatever
    still runs. Returns the exit codes (None: killed by the timeout) and the outputs."""
    deadline = time.monotonic() + timeout
    codes: dict[int, int | None] = {}
    try:
        for r in wait_for:
            try:
                codes[r] = procs[r].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[r] = None
    finally:
        for r, p in procs.items():
            if p.poll() is None:
                p.kill()
            p.wait()
            codes.setdefault(r, p.returncode)
    return codes, {r: p.log.read_text() for r, p in procs.items()}


def test_batches_set_the_sampler_epoch() -> None:
    """A DistributedSampler shuffles by epoch number: prune's loader position sets it at every
    new epoch and when a resumed run re-creates the saved epoch (a new process's sampler)."""
    ds = TensorDataset(torch.arange(16.0).view(16, 1), torch.zeros(16, dtype=torch.long))

    def make() -> DataLoader:
        return DataLoader(ds, batch_size=4, sampler=DistributedSampler(
            ds, num_replicas=2, rank=1, shuffle=True, seed=3))

    def expected(epoch: int) -> list[float]:
        s = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
        s.set_epoch(epoch)
        return [float(i) for i in s]

    assert expected(0) != expected(1)
    example, cpu = (torch.zeros(1, 1),), torch.device("cpu")
    b = pruner._Batches(make(), example, cpu)
    got = [b.next()[0][0].flatten().tolist() for _ in range(3)]  # 2 batches per epoch
    assert got == [expected(0)[:4], expected(0)[4:], expected(1)[:4]]
    resumed = pruner._Batches(make(), example, cpu)
    resumed.restore(b.state())
    assert resumed.next()[0][0].flatten().tolist() == b.next()[0][0].flatten().tolist() == (
        expected(1)[4:])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """512 shipped MNIST images (of the 10,000 test images: the smaller file to read), and
    starting weights for both nets (each trained for one quick epoch on them)."""
    path = tmp_path_factory.mktemp("dist")
    xtr, ytr = mnist(data_dir() / "mnist", "test").tensors
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:N_TRAIN]
    data = {"x": xtr[idx].clone(), "y": ytr[idx].clone()}
    for key, net in (("plain", worker.PlainNet), ("lenet", lenet5_bn)):
        torch.manual_seed(0)
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for i in range(0, N_TRAIN, 64):
            loss = F.cross_entropy(model(data["x"][i:i + 64]), data["y"][i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        data[key] = model.state_dict()
    torch.save(data, path / "data.pt")
    return path


@pytest.fixture(scope="module")
def main_run(folder) -> dict:
    """Both ranks' results of the ``main`` scenario (which ends with rank 1 crashing)."""
    codes, outs = finish(start("main", folder), timeout=150)
    assert codes == {0: 0, 1: 1}, f"exit codes {codes}\n--- rank 0\n{outs[0]}\n--- rank 1\n{outs[1]}"
    res = {r: torch.load(folder / f"main-rank{r}.pt", weights_only=False) for r in (0, 1)}
    res["outs"] = outs
    return res


def _same(a: dict, b: dict) -> None:
    assert a["keep"].keys() == b["keep"].keys()
    for k in a["keep"]:
        assert torch.equal(a["keep"][k], b["keep"][k]), k
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_ranks_end_identical(main_run, folder) -> None:
    for run in ("plain", "lenet", "resumed"):
        r0, r1 = main_run[0][run], main_run[1][run]
        assert r0["history"] == r1["history"] and r0["steps"] == r1["steps"]
        assert any(m["action"] == "prune" for m in r0["history"]), run
        assert r0["keep"], f"{run}: nothing was cut"
        _same(r0, r1)
        assert r0["settings"]["world_size"] == 2
    # only rank 0 wrote: rank 1's output and checkpoint folders were never created
    assert (folder / "out-rank0" / "report.json").is_file()
    assert (folder / "out-rank0" / "model.pt").is_file()
    assert (folder / "ckpt-a-rank0" / aofp_ext.pruner.CHECKPOINT_NAME).is_file()
    assert not (folder / "out-rank1").exists() and not (folder / "ckpt-a-rank1").exists()
    report = json.loads((folder / "out-rank0" / "report.json").read_text())
    assert report["history"] == main_run[0]["lenet"]["history"]


def test_decisions_equal_one_process_over_the_global_batches(main_run, folder) -> None:
    """The BN-free net: same global batches (DistributedSampler order with one replica and the
    global batch), same seed. The damages and gradients are summed over the ranks instead of over
    one batch, so they agree to rounding only; the decisions must be the same."""
    data = torch.load(folder / "data.pt", weights_only=True)
    one = worker.summary(worker.plain_run(data, world=1, rank=0))
    two = main_run[0]["plain"]
    assert one["steps"] == two["steps"]
    strip = [{k: v for k, v in m.items() if k != "worst"} for m in one["history"]]
    assert strip == [{k: v for k, v in m.items() if k != "worst"} for m in two["history"]]
    for a, b in zip(one["history"], two["history"]):
        assert (a["worst"] is None) == (b["worst"] is None)
        if a["worst"] is not None:
            assert b["worst"] == pytest.approx(a["worst"], rel=1e-4, abs=1e-9)
    assert one["keep"].keys() == two["keep"].keys()
    for k in one["keep"]:
        assert torch.equal(one["keep"][k], two["keep"][k]), k
    for k in one["state"]:
        assert torch.allclose(one["state"][k], two["state"][k], rtol=1e-4, atol=1e-5), k


def test_resume_under_two_processes(main_run) -> None:
    for r in (0, 1):
        assert main_run[r]["interrupted"]
        full, resumed = main_run[r]["lenet"], main_run[r]["resumed"]
        assert resumed["resumed_from"] == "search step 4"
        assert resumed["history"] == full["history"] and resumed["steps"] == full["steps"]
        _same(full, resumed)
    saved = main_run[0]["saved"]
    assert saved["phase"] == "search" and saved["step"] == 4
    # the checkpoint holds each rank's own data position: 4 batches into its shard, whose order
    # its own loader generator decides (states that differ between the ranks)
    assert [e["index"] for e in saved["ranks"]] == [4, 4]
    gens = [e["epoch_rng"]["gen"] for e in saved["ranks"]]
    assert not torch.equal(gens[0], gens[1])


def test_ranks_with_other_settings_are_refused(main_run) -> None:
    for r in (0, 1):
        msg = main_run[r]["mismatch"]
        assert msg is not None and "seed: rank 0 0, rank 1 1" in msg, msg


def _stopped_with_a_clear_error(res: dict) -> None:
    assert res["type"] == "DistributedError", res
    assert res["error"].startswith("rank 0 of 2: a collective operation failed (search step 3)")
    assert "Another rank most likely failed" in res["error"]


def test_a_crashed_rank_stops_the_other_at_once(main_run) -> None:
    res = main_run[0]["crash"]
    _stopped_with_a_clear_error(res)
    assert "rank 1 fails on purpose" in main_run["outs"][1]  # rank 1 failed with its own error
    assert res["seconds"] < worker.TIMEOUTS["main"] / 2  # noticed at once, not by the timeout


def test_a_rank_that_stops_responding_times_out(folder) -> None:
    codes, outs = finish(start("hang", folder), timeout=90, wait_for=(0,))
    assert codes[0] == 0, f"rank 0 did not stop cleanly ({codes})\n{outs[0]}\n--- rank 1\n{outs[1]}"
    assert codes[1] == -9  # still asleep: killed by the test
    res = torch.load(folder / "hang-rank0.pt", weights_only=False)["hang"]
    _stopped_with_a_clear_error(res)
    assert "timed out" in res["error"].lower()
    assert res["seconds"] >= worker.TIMEOUTS["hang"]


def test_cli_under_torchrun(folder, tmp_path) -> None:
    """`aofp prune --nproc 2` launches itself under torchrun; rank 0 writes the outputs."""
    weights = tmp_path / "lenet.pt"
    torch.save(torch.load(folder / "data.pt", weights_only=True)["lenet"], weights)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "aofp_ext.cli", "prune", "--nproc", "2", "--arch", "lenet5",
           "--weights", str(weights), "--data", "mnist", "--train-limit", "256",
           "--test-limit", "200", "--target-flops", "0.8", "--masks-per-step", "8",
           "--iters-per-half", "2", "--warmup-iters", "1", "--max-steps", "30", "--thresh",
           "0.1", "--out", str(out), "--dist-timeout", "60"]
    e = env(0, 1, free_port())
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k)
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["world_size"] == 2 and report["steps"] >= 1
    assert "- device: cpu x 2 processes;" in (out / "report.md").read_text()
    assert proc.stdout.count("wrote ") == 1  # the summary is printed once, by rank 0
    model = aofp_ext.load(lenet5_bn(), out / "model.pt")
    assert aofp_ext.count_flops(model, worker.LENET_IN)[0] == report["macs_after"]
