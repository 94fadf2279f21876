"""``prune()`` under ``torch.distributed``: the few collective steps the search needs.

Everything here is a no-op (or the plain single-process computation) unless a process group is
initialised with more than one process, so :func:`aofp_ext.prune` runs unchanged without one.
With one (``torchrun``, any backend), :mod:`aofp_ext.pruner` uses these helpers to

- check that every rank was called with the same settings (:func:`check_same`);
- train through :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`), rebuilt after
  the cut because its gradient buckets refer to the old shapes;
- sum the per-filter damage numerators and denominators of every rank before each search decision
  (:func:`sum_damages`), so that every rank records the same global damages and, drawing its
  attempts from the same seeded generator, takes the same decisions at the same step;
- agree on rank 0's time-based checkpoint decisions (:func:`agree`), gather every rank's data
  position and RNG state into rank 0's checkpoint (:func:`all_gather`) and hand rank 0's
  checkpoint to every rank on resume (:func:`broadcast_call`);
- make the BatchNorm buffers equal on every rank (rank 0's, as DDP's ``broadcast_buffers``
  does at every forward) before the cut and at the end (:func:`sync_buffers`);
- turn a failed collective (another rank crashed, or stopped answering until the process
  group's timeout) into a :class:`DistributedError` that says so (:func:`clear_errors`).

The command line starts the process group from ``torchrun``'s environment
(:func:`init_from_env`) or launches ``torchrun`` itself (:func:`launch`). See docs/prune.md,
"Distributed".
"""

from __future__ import annotations

import datetime
import functools
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn as nn

__all__ = ["DistributedError", "is_distributed", "rank", "world_size", "is_main", "all_finite",
           "sum_damages", "agree", "check_same", "all_gather", "broadcast", "broadcast_call",
           "wrap", "sync_buffers", "barrier", "note", "clear_errors", "init_from_env", "launch"]

F = TypeVar("F", bound=Callable[..., Any])


class DistributedError(RuntimeError):
    """A collective operation failed: another rank crashed or stopped responding."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """A process group is initialised and has more than one process."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or no process group: the process that writes checkpoints, reports and plots."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where the backend wants its tensors: the current CUDA device for NCCL, else the CPU."""
    if "nccl" in str(_dist().get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    buf = values.detach().to(_comm_device(), torch.float64).clone()
    _dist().all_reduce(buf)
    return buf.cpu()


# --------------------------------------------------------------------------------------------
# The search's collectives
# --------------------------------------------------------------------------------------------


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` is finite on every rank (one rank's NaN loss stops every rank at the same
    step)."""
    ok = bool(torch.isfinite(t.detach()).all())
    if not is_distributed():
        return ok
    return bool(_all_reduce_sum(torch.tensor([0.0 if ok else 1.0]))[0] == 0)


def sum_damages(parts: Sequence[tuple[torch.Tensor, float]]) -> list[tuple[torch.Tensor, float]]:
    """``(damage, base)`` pairs (``damage``: float64 ``(K,)`` summed over this rank's batch,
    ``base``: this rank's ``sum ||Y_base||^2``), one per target, summed over all ranks in one
    all-reduce. Without a process group: unchanged."""
    parts = list(parts)
    if not is_distributed() or not parts:
        return parts
    flat = torch.cat([torch.cat([d.to("cpu", torch.float64).reshape(-1),
                                 torch.tensor([float(b)], dtype=torch.float64)])
                      for d, b in parts])
    flat = _all_reduce_sum(flat)
    out, i = [], 0
    for d, _ in parts:
        k = d.numel()
        out.append((flat[i:i + k].clone(), float(flat[i + k])))
        i += k + 1
    return out


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "60 seconds since the last checkpoint")."""
    if not is_distributed():
        return flag
    buf = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=_comm_device())
    _dist().broadcast(buf, src=0)
    return bool(buf.item() != 0)


def all_gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def broadcast_call(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only, its result (or its exception, raised on every rank) handed
    to every rank; e.g. reading a checkpoint that only rank 0's file system holds."""
    if not is_distributed():
        return fn()
    outcome: tuple[str, Any] | None = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            outcome = ("error", exc)
    outcome = broadcast(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def check_same(values: dict[str, Any], what: str) -> None:
    """Raise the same ``ValueError`` on every rank if ``values`` differ between ranks (a rank
    started with other arguments would otherwise take other decisions, or block)."""
    if not is_distributed():
        return
    every = all_gather(values)
    diff = sorted({k for v in every[1:] for k in set(v) | set(every[0])
                   if v.get(k) != every[0].get(k)})
    if diff:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {v.get(k)!r}"
                                               for r, v in enumerate(every)) for k in diff)
        raise ValueError(f"{what} differ between the {len(every)} processes ({detail}); start "
                         "every rank with the same arguments")


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed (it broadcasts rank 0's parameters and
    buffers, averages the gradients in backward and broadcasts rank 0's buffers at every
    forward), else ``model``. Build a new one after changing any parameter's shape."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device], output_device=device)
    return DistributedDataParallel(model)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. Each rank's last forward
    updates its own running statistics with its own shard; afterwards the model is identical on
    every rank."""
    if not is_distributed():
        return
    dev = _comm_device()
    for b in model.buffers():
        buf = b.detach().to(dev)
        _dist().broadcast(buf, src=0)
        if buf is not b:
            with torch.no_grad():
                b.copy_(buf)


def barrier() -> None:
    """Wait for every rank (within the process group's timeout)."""
    if not is_distributed():
        return
    dev = _comm_device()
    _dist().barrier(device_ids=[dev.index] if dev.type == "cuda" else None)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_WHERE = ["setup"]
_COMM_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
               "processgroup", "broken pipe", "socket")


def note(where: str) -> None:
    """Where the run is (for the message of a failed collective)."""
    _WHERE[0] = where


def _is_comm_error(exc: BaseException) -> bool:
    dist = _dist()
    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    if kinds and isinstance(exc, kinds):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in _COMM_WORDS)


def clear_errors(fn: F) -> F:
    """Decorator: in a distributed run, a failed collective becomes a :class:`DistributedError`
    naming this rank, where the run was, and the likely cause."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        note("setup")
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if (isinstance(exc, DistributedError) or not is_distributed()
                    or not _is_comm_error(exc)):
                raise
            raise DistributedError(
                f"rank {rank()} of {world_size()}: a collective operation failed ({_WHERE[0]}). "
                "Another rank most likely failed (its own error is in its output) or stopped "
                "responding (detected after the process group's timeout); this rank stops too. "
                f"The backend said: {exc}") from exc

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Command line: the process group from torchrun's environment, or torchrun itself
# --------------------------------------------------------------------------------------------


def env_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str | None, timeout_s: float) -> tuple[bool, str | None]:
    """Start the default process group from ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) if it sets more than one
    process and no group exists yet: NCCL for a CUDA ``device`` (each process on
    ``cuda:LOCAL_RANK``), gloo otherwise, with ``timeout_s`` for every collective. Returns
    (whether a group was started here, the device this rank uses)."""
    dist = _dist()
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False, device
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True, device


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m aofp_ext.cli ARGV`` in ``nproc`` processes on this machine under
    ``torchrun --standalone`` and return its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "aofp_ext.cli", *argv]
    return subprocess.call(cmd)
