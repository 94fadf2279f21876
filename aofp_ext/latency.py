"""Inference latency of a model: what a user gets from pruning, next to the MACs ratio.

:func:`measure` times repeated forwards (eval mode, ``torch.inference_mode``) at batch 1 and at
a given batch, and reports the median (and the spread) per batch size, with the device and the
CPU thread count; on a GPU each forward is timed with CUDA events. :func:`compare` times two
models (e.g. the original and the pruned one) side by side in one run, interleaved forward by
forward so that both see the same machine load, and gives the speed-up per batch size.

MACs alone are not speed: a pruned model's latency depends on the kernels its shapes hit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["measure", "compare"]


def _batch_of(example: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` samples from ``example`` (``(N, ...)``): its first samples, repeated cyclically
    when it has fewer than ``batch``."""
    if example.dim() == 0 or example.shape[0] == 0:
        raise ValueError(f"example must be a batch (N, ...) with N >= 1, got shape "
                         f"{tuple(example.shape)}")
    idx = torch.arange(batch, device=example.device) % example.shape[0]
    return example.index_select(0, idx).contiguous()


class _Timer:
    """Seconds of one call: wall clock on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _summary(times: list[float], batch: int) -> dict[str, float]:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times), "repeats": len(times),
            "per_sample_s": med / batch, "samples_per_s": batch / med if med > 0 else float("inf")}


def _check(batches: Sequence[int], repeats: int, warmup: int) -> list[int]:
    sizes = list(dict.fromkeys(int(b) for b in batches))
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, "
                         f"warmup={warmup}")
    return sizes


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(),
                            "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["timer"] = "cuda events"
    else:
        info["timer"] = "wall clock (time.perf_counter)"
    return info


def _run(models: Sequence[nn.Module], example: torch.Tensor, batches: Sequence[int],
         repeats: int, warmup: int, threads: int | None) -> list[dict[int, dict[str, float]]]:
    sizes = _check(batches, repeats, warmup)
    device = example.device
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    modes = [m.training for m in models]
    timer = _Timer(device)
    out: list[dict[int, dict[str, float]]] = [{} for _ in models]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            for b in sizes:
                xb = _batch_of(example, b)
                for m in models:
                    for _ in range(warmup):
                        m(xb)
                times: list[list[float]] = [[] for _ in models]
                for _ in range(repeats):     # interleaved: every model sees the same load
                    for i, m in enumerate(models):
                        times[i].append(timer(lambda: m(xb)))
                for i in range(len(models)):
                    out[i][b] = _summary(times[i], b)
    finally:
        for m, training in zip(models, modes):
            m.train(training)
        torch.set_num_threads(old_threads)
    return out


def measure(model: nn.Module, example: torch.Tensor, *, batch: int = 32, repeats: int = 20,
            warmup: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Median latency of ``model`` at batch 1 and at ``batch``.

    Args:
        model: the model (left in its training mode afterwards; timed in eval mode).
        example: a batch ``(N, ...)`` on the device to time on; batches are built from its
            samples (repeated when ``N`` is smaller).
        batch: the second batch size (e.g. the training batch).
        repeats, warmup: timed and untimed forwards per batch size.
        threads: CPU threads for the measurement (default: torch's current setting).

    Returns:
        ``{"device", "threads", "torch", "timer", "batches": {b: {"median_s", "min_s",
        "max_s", "repeats", "per_sample_s", "samples_per_s"}}}``.
    """
    info = _device_info(example.device)
    if threads is not None:
        info["threads"] = int(threads)
    info["batches"] = _run([model], example, (1, batch), repeats, warmup, threads)[0]
    return info


def compare(original: nn.Module, pruned: nn.Module, example: torch.Tensor, *, batch: int = 32,
            repeats: int = 20, warmup: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Both models' latency side by side in one run (interleaved forwards), and the speed-up
    ``original median / pruned median`` per batch size."""
    info = _device_info(example.device)
    if threads is not None:
        info["threads"] = int(threads)
    a, b = _run([original, pruned], example, (1, batch), repeats, warmup, threads)
    info["original"], info["pruned"] = a, b
    info["speedup"] = {k: a[k]["median_s"] / b[k]["median_s"] if b[k]["median_s"] > 0
                       else float("inf") for k in a}
    return info
