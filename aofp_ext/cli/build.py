"""The model and the data the ``prune`` and ``eval`` commands work on, from their arguments:
:func:`build_model` (``--model SPEC`` or ``--arch``, ``--model-kwargs``, ``--weights``) and
:func:`build_data` (``--data NAME[:DIR]`` or ``folder:DIR``, ``--input-size``). A new way to name a
model or a dataset is a new branch in one of these two functions (and its option in
:mod:`.parser`). Every error names the argument and the file."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

__all__ = ["ARCHS", "Data", "build_model", "build_data", "load_weights", "parse_data",
           "parse_model_kwargs"]

ARCHS = ("lenet5", "resnet20", "resnet56", "vgg16", "mobilenetv2")
_DATASET_FOLDERS = {"mnist": "mnist", "cifar10": "cifar10-subset/cifar-10-batches-py"}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The ``--model`` (or ``--arch``) model, built with ``--model-kwargs``, with the
    ``--weights`` loaded (:func:`load_weights`)."""
    from ..models import ModelSpecError, from_spec

    spec = args.model or args.arch
    try:
        model = from_spec(spec, args.model_kwargs)
    except ModelSpecError as exc:
        raise SystemExit(f"aofp: --model: {exc}") from None
    return load_weights(model, args.weights)


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """A model saved by ``aofp_ext.save`` (pruned: keep-sets + state dict), or a plain state
    dict / ``{'state_dict': ...}`` checkpoint of the original architecture."""
    from ..checkpoint import WeightsFileError
    from ..checkpoint import load_weights as load
    from ..graph import ChannelGraphError

    try:
        return load(model, path)
    except (WeightsFileError, ChannelGraphError) as exc:
        raise SystemExit(f"aofp: --weights: {exc}") from None


def parse_model_kwargs(text: str) -> dict:
    """``--model-kwargs '{"num_classes": 10}'``: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"num_classes\": 10}}', got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


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
    torchrun) and a test loader of 500-image batches (an image folder: its val/ split, in
    ``--batch-size`` batches); ``eval``: the test loader only, in ``--batch-size`` batches.
    ``--test-limit`` for both."""
    name, root = args.data
    size = args.input_size
    example = {"mnist": torch.zeros(1, 1, 28, 28), "cifar10": torch.zeros(1, 3, 32, 32)}.get(
        name, torch.zeros(1, 3, size, size))
    workers = args.workers
    if args.command == "eval":
        test = _split(name, root, "test", args.test_limit, size)
        return Data(name, None, DataLoader(test, batch_size=args.batch_size, num_workers=workers),
                    len(test), example)
    train = _split(name, root, "train", args.train_limit, size)
    test = _split(name, root, "test", args.test_limit, size)
    test_batch = args.batch_size if name == "folder" else 500
    return Data(name, _train_loader(train, args.batch_size, args.seed, workers),
                DataLoader(test, batch_size=test_batch, num_workers=workers), len(test), example)


def parse_data(spec: str) -> tuple[str, Path]:
    """``cifar10[:DIR]`` or ``mnist[:DIR]`` (DIR defaults to the shipped data), or
    ``folder:DIR`` (an image folder with train/ and val/, one subfolder per class)."""
    from ..data import default_data_dir

    name, _, folder = spec.partition(":")
    if name == "folder":
        if not folder:
            raise argparse.ArgumentTypeError("--data folder:DIR needs the folder, e.g. "
                                             "folder:/data/imagenette (with train/ and val/)")
        return name, Path(folder)
    if name not in _DATASET_FOLDERS:
        raise argparse.ArgumentTypeError(f"--data must be cifar10[:DIR], mnist[:DIR] or "
                                         f"folder:DIR, got {spec!r}")
    return name, Path(folder) if folder else default_data_dir() / _DATASET_FOLDERS[name]


def _split(name: str, root: Path, split: str, limit: int | None = None, size: int = 224):
    from torch.utils.data import Subset

    from ..data import DataFormatError, cifar10, image_folder, mnist

    try:
        if name == "folder":
            ds = image_folder(root, "val" if split == "test" else split, size)
        else:
            ds = (mnist if name == "mnist" else cifar10)(root, split)
    except (FileNotFoundError, DataFormatError) as exc:
        raise SystemExit(f"aofp: --data: {exc}") from None
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    return ds


def _train_loader(train, batch: int, seed: int, workers: int = 0) -> DataLoader:
    """Shuffled by ``seed``. Under a process group: this rank's shard (``DistributedSampler``,
    shuffled by ``seed`` and the epoch) in batches of ``batch // world_size``: ``batch`` is the
    global batch, as in one process."""
    from torch.utils.data import DistributedSampler

    from .. import distributed as ddist

    world = ddist.world_size()
    if world <= 1:
        return DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers,
                          generator=torch.Generator().manual_seed(seed))
    if batch % world:
        raise SystemExit(f"aofp: --batch-size {batch} (the global batch) must be divisible "
                         f"by the number of processes, {world}")
    sampler = DistributedSampler(train, num_replicas=world, rank=ddist.rank(), shuffle=True,
                                 seed=seed)
    return DataLoader(train, batch_size=batch // world, sampler=sampler, num_workers=workers)
