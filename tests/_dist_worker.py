"""One rank of the distributed prune tests (tests/test_distributed.py starts two of them).

    python tests/_dist_worker.py SCENARIO FOLDER     # RANK, WORLD_SIZE, MASTER_ADDR/PORT set

FOLDER holds ``data.pt`` (training images and the starting weights, written by the test); each
rank writes ``SCENARIO-rank{r}.pt`` with what the test compares. Scenarios:

- ``main``: (1) the BN-free net, (2) LeNet-5-BN with checkpoints and a finetune epoch, (3) the
  same LeNet run interrupted at step 7 on every rank and resumed, (4) ranks called with
  different seeds (a ValueError on every rank), then (5) a crash: rank 1 raises in ``callback``
  at step 3 and exits (after writing its results); rank 0 must stop with a DistributedError at
  once;
- ``hang``: rank 1 stops responding at step 3; rank 0 must stop with a DistributedError after the
  process group's timeout.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import aofp_ext
from aofp_ext.distributed import DistributedError
from aofp_ext.models import lenet5_bn
from aofp_ext.surgery import pruning_record

LENET_IN = torch.zeros(1, 1, 28, 28)
BATCH = 64          # the global batch; each of W ranks gets BATCH // W
SAMPLER_SEED = 1
TIMEOUTS = {"main": 60, "hang": 5}


class PlainNet(nn.Module):
    """LeNet-5 without BatchNorm: every sample's output, gradient and damage is independent of
    the others in its batch, so a distributed run must equal one process over the global batch
    up to floating-point rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


PLAIN = dict(target_flops=0.5, masks_per_step=8, thresh=0.1, iters_per_half=2, warmup_iters=1,
             max_steps=40, lr=1e-3)
LENET = dict(target_flops=0.55, masks_per_step=8, thresh=0.08, iters_per_half=2, warmup_iters=1,
             max_steps=40, checkpoint_every=4)


def loader(data: dict, world: int, rank: int) -> DataLoader:
    """The shard of ``rank``: DistributedSampler order (seeded, ``set_epoch`` by prune), global
    batch BATCH. With world=1 it yields the global batches of a W-rank run in the same order."""
    ds = TensorDataset(data["x"], data["y"])
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=SAMPLER_SEED)
    return DataLoader(ds, batch_size=BATCH // world, sampler=sampler)


def own_shard_loader(data: dict, world: int, rank: int) -> DataLoader:
    """A user's own sharding: every ``world``-th image, shuffled by a generator of this rank's
    own seed (so each rank's data position and RNG state differ, and a checkpoint must keep
    every rank's)."""
    ds = TensorDataset(data["x"][rank::world], data["y"][rank::world])
    return DataLoader(ds, batch_size=BATCH // world, shuffle=True,
                      generator=torch.Generator().manual_seed(10 + rank))


def plain_run(data: dict, world: int, rank: int, **kw):
    model = PlainNet()
    model.load_state_dict(data["plain"])
    return aofp_ext.prune(model, loader(data, world, rank), example_inputs=LENET_IN,
                          progress=False, **PLAIN, **kw)


def lenet_run(data: dict, world: int, rank: int, folder: Path, **kw):
    model = lenet5_bn()
    model.load_state_dict(data["lenet"])
    return aofp_ext.prune(model, own_shard_loader(data, world, rank), example_inputs=LENET_IN,
                          progress=False, checkpoint_dir=folder, **{**LENET, **kw})


def summary(result) -> dict:
    r = result.report
    return {"history": r["history"], "steps": r["steps"], "widths": r["widths_after"],
            "resumed_from": r["resumed_from"], "settings": r["settings"],
            "keep": dict(pruning_record(result.model).keep),
            "state": {k: v.clone() for k, v in result.model.state_dict().items()}}


class Stop(Exception):
    pass


def main_scenario(data: dict, folder: Path, rank: int, world: int) -> dict:
    out: dict = {}
    t0 = time.perf_counter()
    out["plain"] = summary(plain_run(data, world, rank))
    # Each rank names its own folders: only rank 0's may appear (only rank 0 writes). Time-based
    # checkpoints with clocks that disagree (rank 0: due at every step, rank 1: never): rank 0's
    # decision must hold on both, else the ranks' collectives no longer match.
    aofp_ext.pruner._CHECKPOINT_SECONDS = 0.0 if rank == 0 else float("inf")
    res = lenet_run(data, world, rank, folder / f"ckpt-a-rank{rank}", finetune_epochs=1,
                    out_dir=folder / f"out-rank{rank}", checkpoint_every=None)
    aofp_ext.pruner._CHECKPOINT_SECONDS = 60.0
    out["lenet"] = summary(res)

    def interrupt(step: int, info: dict) -> None:
        if step == 7:
            raise Stop

    try:
        lenet_run(data, world, rank, folder / "ckpt-b", finetune_epochs=1, callback=interrupt)
        out["interrupted"] = False
    except Stop:
        out["interrupted"] = True
    if rank == 0:
        saved = torch.load(folder / "ckpt-b" / aofp_ext.pruner.CHECKPOINT_NAME,
                           weights_only=True)
        out["saved"] = {"step": saved["step"], "phase": saved["phase"],
                        "ranks": [e["loader"] for e in saved["ranks"]]}
    out["resumed"] = summary(lenet_run(data, world, rank, folder / "ckpt-b", finetune_epochs=1))
    try:
        plain_run(data, world, rank, seed=rank)
        out["mismatch"] = None
    except ValueError as exc:
        out["mismatch"] = str(exc)
    out["seconds"] = time.perf_counter() - t0
    return out


def failure_scenario(data: dict, folder: Path, rank: int, world: int, how: str) -> dict:
    def fail(step: int, info: dict) -> None:
        if rank == 1 and step == 3:
            if how == "crash":
                raise RuntimeError("rank 1 fails on purpose")
            time.sleep(300)  # stops responding; the test kills it

    t0 = time.perf_counter()
    try:
        plain_run(data, world, rank, callback=fail)
    except DistributedError as exc:
        return {"error": str(exc), "type": type(exc).__name__,
                "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def main() -> int:
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUTS[scenario]))
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.load(folder / "data.pt", weights_only=True)
    try:
        out = {}
        if scenario == "main":
            out = main_scenario(data, folder, rank, world)
            if rank == 1:  # its results first: it is about to crash
                torch.save(out, folder / f"{scenario}-rank{rank}.pt")
            how = "crash"
        else:
            how = scenario
        out[how] = failure_scenario(data, folder, rank, world, how)
        torch.save(out, folder / f"{scenario}-rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # no process-group teardown: the other rank must notice on its own
    sys.stdout.flush()
    os._exit(0)  # the peer is gone: skip the teardown


if __name__ == "__main__":
    sys.exit(main())
