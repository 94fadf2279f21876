"""aofp_ext.latency: the shape of its results (no timing assertions: speed is benchmarked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from aofp_ext import latency


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def test_measure_reports_each_batch_and_restores_state():
    model = _net(8).train()
    threads = torch.get_num_threads()
    out = latency.measure(model, torch.randn(3, 3, 8, 8), batch=5, repeats=3, warmup=1,
                          threads=1)
    assert model.training and torch.get_num_threads() == threads
    assert out["device"] == "cpu" and out["threads"] == 1 and "timer" in out
    assert sorted(out["batches"]) == [1, 5]
    for b, r in out["batches"].items():
        assert r["repeats"] == 3
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["per_sample_s"] == pytest.approx(r["median_s"] / b)
        assert r["samples_per_s"] == pytest.approx(b / r["median_s"])


def test_compare_side_by_side():
    a, b = _net(16), _net(4)
    out = latency.compare(a, b, torch.randn(2, 3, 8, 8), batch=4, repeats=2, warmup=0)
    assert sorted(out["original"]) == sorted(out["pruned"]) == sorted(out["speedup"]) == [1, 4]
    for k, s in out["speedup"].items():
        assert s == pytest.approx(out["original"][k]["median_s"] / out["pruned"][k]["median_s"])


def test_batch_one_only_and_errors():
    out = latency.measure(_net(4), torch.randn(1, 3, 8, 8), batch=1, repeats=1, warmup=0)
    assert list(out["batches"]) == [1]
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        latency.measure(_net(4), torch.randn(1, 3, 8, 8), batch=0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        latency.measure(_net(4), torch.randn(1, 3, 8, 8), repeats=0)
    with pytest.raises(ValueError, match=r"example must be a batch \(N, ...\)"):
        latency.measure(_net(4), torch.randn(0, 3, 8, 8))
