"""The reporting steps of bench/gpu_check.sh: the machine line, the pytest and sanitizer verdicts,
prune-<tag>.md from the prune's report.json, and the final summary with the issue's compass
figures (raw JSON and one screen of text).

    python bench/gpu_report.py machine
    python bench/gpu_report.py junit WORK/pytest.xml [--gpu]
    python bench/gpu_report.py sanitizer --tag h200 --out OUT/sanitizer-h200.log WORK/memcheck.log ...
    python bench/gpu_report.py prune-md --report DIR/report.json --wall S --command CMD --out FILE
    python bench/gpu_report.py summary --work WORK --out OUT --tag h200 [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from _common import cpu_name  # bench/, first on sys.path

# The compass: fused vs the batched loop at the largest K on the ResNet-50 shapes, the
# fused ops' mask product against the measured fp32 peak there, the ResNet-56 search time.
RATIO_GOAL, PEAK_GOAL_PCT, SEARCH_GOAL_S = 50.0, 50.0, 60.0
FUSED_MODES = ("affine+relu", "batch+none", "batch+relu")


def machine() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    info["cpu"] = cpu_name()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            name, driver, mem = (v.strip() for v in smi.stdout.splitlines()[0].split(",", 2))
            info.update(gpu=name, driver=driver, gpu_memory=mem)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    try:  # without importing torch (seconds)
        from importlib.metadata import version

        info["torch"] = version("torch")
    except Exception:  # pragma: no cover
        info["torch"] = None
    return info


def machine_line(m: dict) -> str:
    gpu = (f"{m['gpu']} (driver {m['driver']}, {m['gpu_memory']})" if m.get("gpu")
           else "no GPU")
    return (f"{gpu}; {m['cpu']}, {m['cpu_count']} CPUs; torch {m.get('torch')}; "
            f"Python {m['python']}; host {m['host']}")


# ---- pytest ---------------------------------------------------------------------------------

GPU_SKIPS = ("no CUDA device", "built without its CUDA kernels", "not loadable")


def junit(path: Path, gpu: bool) -> tuple[bool, str]:
    """Counts from pytest's JUnit XML; on a GPU, a run whose tests skipped for want of a GPU or
    of a CUDA build is a failure, not a pass."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                              "skipped")}
    reasons = [el.get("message", "") for el in root.iter("skipped")]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    text = (f"{passed} passed, {n['failures']} failed, {n['errors']} errors, "
            f"{n['skipped']} skipped")
    if n["tests"] == 0 or passed == 0:
        return False, text + " (nothing ran)"
    if gpu and any(g in r for r in reasons for g in GPU_SKIPS):
        return False, text + " (skipped for want of a GPU or a CUDA build)"
    return n["failures"] == 0 and n["errors"] == 0, text


# ---- compute-sanitizer ------------------------------------------------------------------------

SUMMARY_RE = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY|gpu_ops_smoke|Hazard|Invalid|"
                        r"error|would run)", re.IGNORECASE)


def sanitizer(logs: list[Path], out: Path, tag: str, command: str) -> None:
    m = machine()
    lines = [f"# compute-sanitizer on bench/gpu_ops_smoke.py ({tag})",
             f"# date: {m['date']}", f"# machine: {machine_line(m)}", f"# command: {command}", ""]
    for log in logs:
        lines.append(f"## {log.name}")
        if not log.is_file():
            lines += ["(no log: the stage did not run)", ""]
            continue
        text = log.read_text(errors="replace").splitlines()
        lines.append("### summary lines")
        lines += [t for t in text if SUMMARY_RE.search(t)][:200]
        lines.append("### last 40 lines")
        lines += text[-40:] + [""]
    out.write_text("\n".join(lines) + "\n")


# ---- prune ------------------------------------------------------------------------------------


def prune_md(report: Path, wall: float, command: str, out: Path, note: str = "",
             stopped: bool = False) -> dict:
    m = machine()
    r = json.loads(report.read_text()) if report.is_file() else None
    lines = ["# ResNet-56 pruned to 50 % of its MACs with AOFP", "",
             f"- date: {m['date']}", f"- machine: {machine_line(m)}", f"- command: `{command}`",
             f"- wall time of the whole command: {wall:.1f} s (start-up, data, evaluations, "
             "search, cut, files)"]
    if note:
        lines.append(f"- note: {note}")
    if r is None:
        lines += ["", "No report.json: the run did not finish (see the stage log)."]
    else:
        keys = ("device", "steps", "stop_reason", "reached_target", "search_seconds",
                "macs_before", "macs_after", "macs_fraction", "params_before", "params_after",
                "channels_pruned", "accuracy_before", "accuracy_after_search")
        lines += ["", "| quantity | value |", "|---|---|"]
        for k in keys:
            v = r.get(k)
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines += ["", f"settings: `{json.dumps(r.get('settings'))}`", "",
                  "| layer | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {r['widths_after'].get(k)} |"
                  for k, v in r.get("widths_before", {}).items()]
    out.write_text("\n".join(lines) + "\n")
    return {"wall_seconds": wall, "command": command, "stopped_by_limit": stopped,
            **({k: r.get(k) for k in ("steps", "stop_reason", "reached_target", "search_seconds",
                                      "macs_fraction", "accuracy_before",
                                      "accuracy_after_search", "device")} if r else {})}


# ---- summary ----------------------------------------------------------------------------------


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def compass(kernels: dict | None, prune: dict | None, dry: bool) -> list[dict]:
    """The three figures of the issue, each MET / NOT MET / not measured."""
    out = []

    def verdict(ok: bool | None) -> str:
        if ok is None:
            return "not measured"
        if dry:
            return "not measured (dry run on the CPU: not a GPU figure)"
        return "MET" if ok else "NOT MET"

    rows = (kernels or {}).get("rows") or []
    complete = ((kernels or {}).get("meta") or {}).get("complete", True)

    def partial_verdict(ok: bool) -> str:  # a partial table cannot show "every shape"
        return verdict(ok) if complete or not ok else "not measured (the benchmark stopped early)"

    r50 = [r for r in rows if r["shape"].startswith("R50")]
    kmax = max((r["K"] for r in r50), default=None)
    at = [r for r in r50 if r["K"] == kmax]
    ratios = [(r[f"fused {m}"] / r[f"loop {m}"], r["shape"], m) for r in at for m in FUSED_MODES]
    if ratios:
        lo = min(ratios)
        fig = ("" if complete else "PARTIAL: ") + (f"min {lo[0]:.1f}x ({lo[1]}, {lo[2]}), median "
               f"{statistics.median(v for v, *_ in ratios):.1f}x, max {max(ratios)[0]:.1f}x")
        out.append(dict(name=f"fused vs batched loop, K = {kmax}, ResNet-50 shapes (every shape "
                        f"and fused mode >= {RATIO_GOAL:g}x)", figure=fig,
                        value=lo[0], verdict=partial_verdict(lo[0] >= RATIO_GOAL)))
    else:
        out.append(dict(name="fused vs batched loop, K = 1024, ResNet-50 shapes", figure="-",
                        value=None, verdict=verdict(None)))
    peak = ((kernels or {}).get("peaks") or {}).get("fp32")
    pcts = [(100 * r[f"tflops {m}"] / peak, r["shape"], m) for r in at for m in FUSED_MODES
            if peak and f"tflops {m}" in r]
    if pcts:
        lo = min(pcts)
        fig = ("" if complete else "PARTIAL: ") + (f"min {lo[0]:.1f} % ({lo[1]}, {lo[2]}), median "
               f"{statistics.median(v for v, *_ in pcts):.1f} %, max {max(pcts)[0]:.1f} % of "
               f"{peak:.3g} TFLOP/s")
        out.append(dict(name=f"mask product (GEMM-like stage) vs measured fp32 matmul peak, "
                        f"K = {kmax}, ResNet-50 shapes (every one >= {PEAK_GOAL_PCT:g} %)",
                        figure=fig, value=lo[0], verdict=partial_verdict(lo[0] >= PEAK_GOAL_PCT)))
    else:
        out.append(dict(name="mask product vs fp32 peak, ResNet-50 shapes", figure="-",
                        value=None, verdict=verdict(None)))
    if prune and prune.get("search_seconds") is not None:
        s, reached = prune["search_seconds"], prune.get("reached_target")
        fig = (f"{s:.1f} s search, {prune.get('steps')} steps, MACs {prune.get('macs_fraction'):.3f}"
               f" ({'target reached' if reached else 'target NOT reached: ' + str(prune.get('stop_reason'))}"
               f"), {prune['wall_seconds']:.1f} s wall")
        out.append(dict(name=f"ResNet-56 search to 50 % MACs on the device (<= {SEARCH_GOAL_S:g} s)",
                        figure=fig, value=s,
                        verdict=verdict(bool(reached) and s <= SEARCH_GOAL_S)))
    elif prune and prune.get("stopped_by_limit"):  # longer than its limit, so than the goal
        out.append(dict(name=f"ResNet-56 search to 50 % MACs on the device (<= {SEARCH_GOAL_S:g} s)",
                        figure=f"stopped by its limit after {prune['wall_seconds']:.0f} s wall",
                        value=None, verdict=verdict(False)))
    else:
        fig = "the prune failed (see its stage log)" if prune else "-"
        out.append(dict(name=f"ResNet-56 search to 50 % MACs on the device (<= {SEARCH_GOAL_S:g} s)",
                        figure=fig, value=None, verdict=verdict(None)))
    return out


STAGE_ORDER = ["0", "a", "b", "c1", "c2", "d", "e1", "e2"]


def read_stages(path: Path) -> list[dict]:
    """The stages recorded by gpu_check.sh, in their order (b and c run side by side)."""
    stages = []
    if path.is_file():
        for line in path.read_text().splitlines():
            sid, name, status, secs, note = (line.split("\t") + [""] * 5)[:5]
            stages.append(dict(id=sid, name=name, status=status, seconds=float(secs or 0),
                               note=note))
    rank = {sid: i for i, sid in enumerate(STAGE_ORDER)}
    return sorted(stages, key=lambda st: rank.get(st["id"], len(rank)))


def summary(work: Path, out: Path, tag: str, dry: bool) -> int:
    m = machine()
    stages = read_stages(work / "stages.tsv")
    kernels = read_json(work / "kernels.json")
    prune = read_json(work / "prune-summary.json")
    comp = compass(kernels, prune, dry)
    data = {"tag": tag, "dry_run": dry, "machine": m, "stages": stages,
            "build_info": read_json(work / "build_info.json"), "kernels": kernels,
            "search_step": read_json(work / "search-step.json"), "prune": prune,
            "compass": comp}
    (out / f"gpu-check-{tag}.json").write_text(json.dumps(data, indent=1))
    bar = "=" * 100
    print(bar)
    print(f"GPU check summary ({tag}{', DRY RUN on the CPU: no figure here is a GPU figure' if dry else ''})")
    print(f"machine: {machine_line(m)}")
    print(f"date: {m['date']}")
    print(f"{'stage':<44} {'status':<10} {'seconds':>8}  note")
    for s in stages:
        print(f"{s['id'] + ' ' + s['name']:<44.44} {s['status']:<10} {s['seconds']:>8.1f}  "
              f"{s['note'][:120]}")
    print("compass:")
    for c in comp:
        print(f"  - {c['name']}:\n      {c['figure']} -> {c['verdict']}")
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"files in {out}: {', '.join(files)}")
    bad = [s["id"] for s in stages if s["status"] not in ("ok", "skipped")]
    print(f"result: {'ALL STAGES OK' if not bad else 'FAILED STAGES: ' + ', '.join(bad)}")
    print(bar)
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("machine")
    j = sub.add_parser("junit")
    j.add_argument("xml", type=Path)
    j.add_argument("--gpu", action="store_true")
    s = sub.add_parser("sanitizer")
    s.add_argument("logs", type=Path, nargs="+")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--tag", required=True)
    s.add_argument("--command", default="")
    pm = sub.add_parser("prune-md")
    pm.add_argument("--report", type=Path, required=True)
    pm.add_argument("--wall", type=float, required=True)
    pm.add_argument("--command", required=True)
    pm.add_argument("--out", type=Path, required=True)
    pm.add_argument("--json", type=Path, required=True, help="write the figures here")
    pm.add_argument("--note", default="")
    pm.add_argument("--stopped", action="store_true", help="the prune was stopped by its limit")
    sm = sub.add_parser("summary")
    sm.add_argument("--work", type=Path, required=True)
    sm.add_argument("--out", type=Path, required=True)
    sm.add_argument("--tag", required=True)
    sm.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "machine":
        print(machine_line(machine()))
        return 0
    if a.cmd == "junit":
        if not a.xml.is_file():
            print(f"pytest: no JUnit XML at {a.xml}")
            return 1
        ok, text = junit(a.xml, a.gpu)
        print(f"pytest: {text}")
        return 0 if ok else 1
    if a.cmd == "sanitizer":
        sanitizer(a.logs, a.out, a.tag, a.command)
        return 0
    if a.cmd == "prune-md":
        fig = prune_md(a.report, a.wall, a.command, a.out, a.note, a.stopped)
        a.json.write_text(json.dumps(fig, indent=1))
        if fig.get("search_seconds") is None:
            print(f"no report.json; {fig['wall_seconds']:.1f} s wall")
        else:
            print(f"search {fig['search_seconds']:.1f} s, {fig['steps']} steps, MACs "
                  f"{fig['macs_fraction']:.3f}, target {'reached' if fig['reached_target'] else 'NOT reached'}"
                  f" ({fig['stop_reason']}), {fig['wall_seconds']:.1f} s wall")
        return 0
    return summary(a.work, a.out, a.tag, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
