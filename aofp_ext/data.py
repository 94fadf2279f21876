"""Local dataset readers: MNIST idx files and CIFAR-10 python batches. Nothing is downloaded.

The CIFAR-10 reader never runs pickle code: a restricted unpickler accepts only the plain types
of a batch (dict, list, bytes, str, int) and maps the three numpy globals an array needs to
harmless stand-ins that rebuild the pixel bytes as a tensor. Corrupt or unexpected files raise
:class:`DataFormatError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DataFormatError", "default_data_dir", "read_idx", "read_mnist", "mnist",
    "read_cifar10_batch", "read_cifar10", "cifar10", "MNIST_MEAN", "MNIST_STD",
    "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "image_folder",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# What the shipped ResNet weights (akamaster/pytorch_resnet_cifar10) were trained with.
CIFAR10_MEAN, CIFAR10_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataFormatError(ValueError):
    """A dataset file is missing pieces, corrupt, or not what its name says."""


def default_data_dir() -> Path:
    """``$AOFP_DATA_DIR``; else ``<repo>/../shared/data`` (the project's shipped data) for a
    source checkout, or ``../shared/data`` from the current folder for an installed package."""
    env = os.environ.get("AOFP_DATA_DIR")
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data",
                  Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name}(.gz) not found in {root}; point root (or $AOFP_DATA_DIR) "
                            "at the folder that holds it")


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8}
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """One idx file (``.gz`` or plain) as a tensor of its header's shape (uint8/int8 only)."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataFormatError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: not an idx file of bytes (magic {raw[:4].hex()})")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + prod(dims):
        raise DataFormatError(f"{path}: header says {dims} = {prod(dims)} bytes of data, the "
                              f"file holds {len(raw) - header}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=_IDX_DTYPES[raw[2]]).view(dims)


def read_mnist(root: str | Path | None = None,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train" or "test"): uint8 images (N, 28, 28) and int64 labels (N,)."""
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else default_data_dir() / "mnist"
    images_file, labels_file = (_find(root, n) for n in _MNIST_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DataFormatError(f"{root}: images {tuple(images.shape)} and labels "
                              f"{tuple(labels.shape)} do not pair up")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{labels_file}: labels outside 0..9")
    return images, labels


def mnist(root: str | Path | None = None, split: str = "train",
          normalize: bool = True) -> TensorDataset:
    """MNIST as float images (N, 1, 28, 28) in [0, 1], normalised with mean 0.1307, std 0.3081."""
    images, labels = read_mnist(root, split)
    x = images.float().div_(255).unsqueeze(1)
    if normalize:
        x = (x - MNIST_MEAN[0]) / MNIST_STD[0]
    return TensorDataset(x, labels)


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------

_NP_DTYPES = {"u1": torch.uint8, "i1": torch.int8, "i2": torch.int16, "i4": torch.int32,
              "i8": torch.int64}


class _NDArrayType:
    """Stands in for ``numpy.ndarray`` (only ever passed to ``_reconstruct``)."""


class _DType:
    """Stands in for ``numpy.dtype``: plain little-endian integer dtypes only."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        code = spec.lstrip("<|=") if isinstance(spec, str) else None
        if code not in _NP_DTYPES:
            raise pickle.UnpicklingError(f"array dtype {spec!r} is not a plain integer dtype")
        self.torch = _NP_DTYPES[code]

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("|", "<", "="):
            raise pickle.UnpicklingError(f"unsupported dtype state {state!r}")
        if state[3] is not None or state[4] is not None:
            raise pickle.UnpicklingError("structured dtypes are not allowed")


class _Array:
    """Stands in for a numpy array; ``__setstate__`` receives its shape, dtype and bytes."""

    tensor: torch.Tensor

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)
                and isinstance(state[4], bytes)):
            raise pickle.UnpicklingError("unsupported array state")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise pickle.UnpicklingError(f"bad array shape {shape!r}")
        t = torch.frombuffer(bytearray(data), dtype=dtype.torch) if data else torch.empty(
            0, dtype=dtype.torch)
        if t.numel() != prod(shape):
            raise pickle.UnpicklingError(f"array of shape {shape} holds {t.numel()} items")
        self.tensor = (t.view(shape[::-1]).permute(*reversed(range(len(shape)))).contiguous()
                       if fortran else t.view(shape))


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _Array:
    if subtype is not _NDArrayType:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return _Array()


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Stands in for ``_codecs.encode``, which Python 3 uses to pickle bytes at protocol <= 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 byte strings may be encoded")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDArrayType,
    ("numpy", "dtype"): _DType,
}


class _BatchUnpickler(pickle.Unpickler):
    """Builds plain containers only; numpy arrays become :class:`_Array` stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                "bytes, ints and uint8 arrays") from None


def _field(batch: dict, key: str) -> Any:
    return batch.get(key.encode(), batch.get(key))


def read_cifar10_batch(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise DataFormatError(f"{path}: not a valid CIFAR-10 python batch ({exc})") from exc
    data = _field(batch, "data") if isinstance(batch, dict) else None
    labels = _field(batch, "labels") if isinstance(batch, dict) else None
    if not isinstance(data, _Array) or data.tensor.dtype != torch.uint8 \
            or data.tensor.dim() != 2 or data.tensor.shape[1] != 3072:
        raise DataFormatError(f"{path}: no uint8 'data' array of shape (N, 3072)")
    if isinstance(labels, _Array):
        labels = labels.tensor.tolist()
    if not isinstance(labels, list) or len(labels) != len(data.tensor) or not all(
            isinstance(v, int) and 0 <= v <= 9 for v in labels):
        raise DataFormatError(f"{path}: 'labels' must be {len(data.tensor)} ints in 0..9")
    return data.tensor.view(-1, 3, 32, 32), torch.tensor(labels, dtype=torch.int64)


def read_cifar10(root: str | Path | None = None,
                 split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` from ``root`` (the ``cifar-10-batches-py`` folder or its parent):
    every ``data_batch_*`` for "train", ``test_batch`` for "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else default_data_dir() / "cifar10-subset"
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no CIFAR-10 {split} batches in {root}")
    parts = [read_cifar10_batch(f) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def cifar10(root: str | Path | None = None, split: str = "train", normalize: bool = True,
            mean: tuple[float, ...] = CIFAR10_MEAN,
            std: tuple[float, ...] = CIFAR10_STD) -> TensorDataset:
    """CIFAR-10 as float images (N, 3, 32, 32) in [0, 1], normalised per channel with ``mean``
    and ``std`` (by default those the shipped ResNet weights expect)."""
    images, labels = read_cifar10(root, split)
    x = images.float().div_(255)
    if normalize:
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return TensorDataset(x, labels)


def image_folder(root: str | Path, split: str, input_size: int = 224):
    """A torchvision ``ImageFolder`` over ``root/split`` (one subfolder per class; ``split`` is
    ``train`` or ``val``, and ``test`` is accepted for ``val``), with the standard ImageNet
    transforms: ``train`` random-resized crops of ``input_size`` and horizontal flips, ``val``
    resized to ``input_size / 0.875`` and centre-cropped; both normalised with ImageNet's mean and
    std. Needs torchvision (and Pillow)."""
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise DataFormatError(f"image folders need torchvision ({exc}); "
                              "pip install torchvision matching your torch") from exc
    root = Path(root)
    folder = root / split
    if split == "val" and not folder.is_dir() and (root / "test").is_dir():
        folder = root / "test"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (an image folder needs {root}/train and "
                                f"{root}/val, with one subfolder of images per class)")
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if split == "train":
        tf = [transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(round(input_size / 0.875)), transforms.CenterCrop(input_size)]
    try:
        return datasets.ImageFolder(str(folder), transforms.Compose(
            [*tf, transforms.ToTensor(), norm]))
    except (FileNotFoundError, RuntimeError) as exc:  # e.g. a class folder with no images
        raise DataFormatError(f"{folder}: {exc}") from exc
