"""The model and the data the ``prune`` and ``eval`` commands work on, from their arguments:
:func:`build_model` (``--arch`` + ``--weights``) and :func:`build_data` (``--data NAME[:DIR]``).
A new way to name a model or a dataset is a new branch in one of these two functions (and its
option in :mod:`.parser`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

__all__ = ["ARCHS", "Data", "build_model", "build_data", "load_weights", "parse_data"]

ARCHS = ("lenet5", "resnet20", "resnet56", "vgg16", "mobilenetv2")
_DATASET_FOLDERS = {"mnist": "mnist", "cifar10": "cifar10-subset/cifar-10-batches-py"}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The ``--arch`` model with the ``--weights`` loaded (:func:`load_weights`)."""
    from .. import models

    factory = {"lenet5": models.lenet5_bn, "resnet20": models.resnet20,
               "resnet56": models.resnet56, "vgg16": models.vgg16_cifar,
               "mobilenetv2": models.mobilenet_v2_cifar}[args.arch]
    return load_weights(factory(), args.weights)


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """A model saved by ``aofp_ext.save`` (pruned: keep-sets + state dict), or a plain state
    dict / ``{'state_dict': ...}`` checkpoint of the original architecture."""
    from ..checkpoint import load
    from ..models import load_pretrained

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"aofp: weights file {path} not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("format") == "aofp_ext.pruned_model":
        return load(model, path)
    return load_pretrained(model, path)


@dataclass
class Data:
    """What a command reads: the training loader (None for ``eval``), the test loader and its
    number of images, and an example input of one image (MACs are counted for it)."""

    name: str
    train: DataLoader | None
    test: DataLoader
    test_images: int
    example: torch.Tensor


def build_data(args: argparse.Namespace) -> Data:
    """``--data NAME[:DIR]`` (parsed by :func:`parse_data`). ``prune``: the training loader
    (``--train-limit``, ``--batch-size``, shuffled by ``--seed``; one shard per process under
    torchrun) and a test loader of 500-image batches; ``eval``: the test loader only, in
    ``--batch-size`` batches. ``--test-limit`` for both."""
    name, root = args.data
    example = torch.zeros(1, 1, 28, 28) if name == "mnist" else torch.zeros(1, 3, 32, 32)
    if args.command == "eval":
        test = _split(name, root, "test", args.test_limit)
        return Data(name, None, DataLoader(test, batch_size=args.batch_size), len(test), example)
    train = _split(name, root, "train", args.train_limit)
    test = _split(name, root, "test", args.test_limit)
    return Data(name, _train_loader(train, args.batch_size, args.seed),
                DataLoader(test, batch_size=500), len(test), example)


def parse_data(spec: str) -> tuple[str, Path]:
    """``cifar10[:DIR]`` or ``mnist[:DIR]``; DIR defaults to the shipped data."""
    from ..data import default_data_dir

    name, _, folder = spec.partition(":")
    if name not in _DATASET_FOLDERS:
        raise argparse.ArgumentTypeError(f"--data must be cifar10[:DIR] or mnist[:DIR], got "
                                         f"{spec!r}")
    return name, Path(folder) if folder else default_data_dir() / _DATASET_FOLDERS[name]


def _split(name: str, root: Path, split: str, limit: int | None = None):
    from torch.utils.data import Subset

    from ..data import cifar10, mnist

    try:
        ds = (mnist if name == "mnist" else cifar10)(root, split)
    except FileNotFoundError as exc:
        raise SystemExit(f"aofp: {exc}") from None
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    return ds


def _train_loader(train, batch: int, seed: int) -> DataLoader:
    """Shuffled by ``seed``. Under a process group: this rank's shard (``DistributedSampler``,
    shuffled by ``seed`` and the epoch) in batches of ``batch // world_size``: ``batch`` is the
    global batch, as in one process."""
    from torch.utils.data import DistributedSampler

    from .. import distributed as ddist

    world = ddist.world_size()
    if world <= 1:
        return DataLoader(train, batch_size=batch, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))
    if batch % world:
        raise SystemExit(f"aofp: --batch-size {batch} (the global batch) must be divisible "
                         f"by the number of processes, {world}")
    sampler = DistributedSampler(train, num_replicas=world, rank=ddist.rank(), shuffle=True,
                                 seed=seed)
    return DataLoader(train, batch_size=batch // world, sampler=sampler)
