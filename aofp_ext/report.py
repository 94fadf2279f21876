"""Writes a :func:`aofp_ext.prune` report: JSON, a Markdown summary and a PNG of the widths."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_report", "markdown"]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """A Markdown summary: settings, MACs, params, accuracy, time, widths per layer."""
    s = report["settings"]
    lines = [
        f"# AOFP pruning of {report['model']}",
        "",
        f"- device: {report['device']}"
        + (f" x {s['world_size']} processes" if s.get("world_size") else "")
        + f"; masks per step {s['masks_per_step']}, iters per half "
        f"{s['iters_per_half']}, warm-up {s['warmup_iters']}, thresh {s['thresh']}, "
        f"BN mode {s['bn_mode']}, seed {s['seed']}",
        f"- stop: {report['stop_reason']} after {report['steps']} steps "
        f"(target {report['target_flops']:.3f} of the MACs; "
        f"{'reached' if report['reached_target'] else 'NOT reached'})",
        f"- search {report['search_seconds']:.1f} s, finetune {report['finetune_seconds']:.1f} s "
        f"({s['finetune_epochs']} epochs)",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| MACs | {report['macs_before']:,} | {report['macs_after']:,} | "
        f"{report['macs_after'] / max(report['macs_before'], 1):.3f} |",
        f"| params | {report['params_before']:,} | {report['params_after']:,} | "
        f"{report['params_after'] / max(report['params_before'], 1):.3f} |",
        f"| accuracy (eval_fn) | {_pct(report['accuracy_before'])} | "
        f"{_pct(report['accuracy_after_search'])} after the search, "
        f"{_pct(report['accuracy_after_finetune'])} after finetuning | |",
        "",
        "| layer | width before | width after | moves (prune / halve / reset) |",
        "|---|---:|---:|---|",
    ]
    for name in report["targets"]:
        moves = [m for m in report["history"] if m["layer"] == name]
        counts = " / ".join(str(sum(m["action"] == a for m in moves))
                            for a in ("prune", "halve", "reset"))
        lines.append(f"| {name} | {report['widths_before'][name]} | "
                     f"{report['widths_after'][name]} | {counts} |")
    lat = report.get("latency")
    if lat:
        where = lat["device"] + (f", {lat['threads']} CPU threads" if lat["device"] == "cpu"
                                 else f", {lat.get('gpu', '')}")
        lines += ["", f"Inference latency ({where}; {lat['timer']}; eval mode, median of "
                  f"{next(iter(lat['original'].values()))['repeats']} interleaved forwards; "
                  f"torch {lat['torch']}); the MACs ratio is "
                  f"{report['macs_after'] / max(report['macs_before'], 1):.3f}, i.e. "
                  f"{report['macs_before'] / max(report['macs_after'], 1):.2f}x fewer MACs:", "",
                  "| batch | original | pruned | speed-up |", "|---:|---:|---:|---:|"]
        for b, orig in lat["original"].items():
            lines.append(f"| {b} | {orig['median_s'] * 1e3:.2f} ms | "
                         f"{lat['pruned'][b]['median_s'] * 1e3:.2f} ms | "
                         f"{lat['speedup'][b]:.2f}x |")
    if report.get("resumed_from"):
        lines += ["", f"Resumed from a checkpoint ({report['resumed_from']})."]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = report["targets"]
    before = [report["widths_before"][n] for n in names]
    after = [report["widths_after"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    x = range(len(names))
    ax.bar(x, before, color="#c8c8c8", label="before")
    ax.bar(x, after, color="#2a6fb0", label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("filters")
    ax.set_title(f"{report['model']}: width per searched layer "
                 f"(MACs {report['macs_after'] / max(report['macs_before'], 1):.1%} of before)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``report.json``, ``report.md`` and, if matplotlib is installed, ``widths.png`` into
    ``out_dir``. Returns the paths written (a note is added to the Markdown when the plot is
    skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "report.md"]
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    if _plot(report, out / "widths.png"):
        written.append(out / "widths.png")
        md += "\n![width per layer](widths.png)\n"
    else:
        md += "\n(widths.png skipped: matplotlib is not installed; `pip install matplotlib`)\n"
    (out / "report.md").write_text(md)
    return written
