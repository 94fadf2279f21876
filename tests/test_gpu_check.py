"""bench/gpu_check.sh --dry-run: every stage of the GPU check runs its logic on the CPU ops with
tiny sizes (no nvcc, no sanitizer), so the script is tested here before a GPU minute is spent on
it. The result files must exist and be well formed, the summary must be printed, and a failing
stage must fail the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from _nets import data_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
FILES = ["gpu-check-dryrun.json", "gpu-check-dryrun.log", "kernels-dryrun.md",
         "logs-dryrun.tar.gz", "prune-dryrun.md", "sanitizer-dryrun.log", "search-step-dryrun.md"]
STAGES = ["0", "a", "b", "c1", "c2", "d", "e1", "e2"]


def dry_run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    full_env.setdefault("AOFP_DATA_DIR", str(data_dir()))
    full_env.pop("AOFP_CUDA_TEST_DEVICE", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    return dry_run(out), out


def test_every_stage_passes_and_the_summary_is_printed(full) -> None:
    proc, out = full
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout[proc.stdout.index("GPU check summary"):]
    assert "DRY RUN on the CPU" in summary and "result: ALL STAGES OK" in summary
    for sid in STAGES:
        assert f"\n{sid} " in summary, sid
    assert summary.count(" -> not measured (dry run") == 3, summary
    data = json.loads((out / "gpu-check-dryrun.json").read_text())
    assert data["dry_run"] is True and [s["id"] for s in data["stages"]] == STAGES
    status = {s["id"]: s["status"] for s in data["stages"]}
    expect_e1 = "ok" if (REPO / "bench" / "search_step.py").exists() else "skipped"
    assert status == {**{sid: "ok" for sid in STAGES}, "e1": expect_e1}, status
    import aofp_ext  # the dry run reports the installed build (CUDA kernels in CI's CUDA config)

    assert data["build_info"]["cuda"] is aofp_ext.build_info()["cuda"]
    assert [c["verdict"].startswith("not measured (dry run") for c in data["compass"]] == [True] * 3
    assert data["compass"][0]["value"] > 0 and data["compass"][1]["value"] > 0
    assert data["prune"]["steps"] == 1 and data["prune"]["search_seconds"] > 0
    # the console log is the same text
    assert "result: ALL STAGES OK" in (out / "gpu-check-dryrun.log").read_text()


def test_result_files_are_well_formed(full) -> None:
    proc, out = full
    assert proc.returncode == 0, proc.stdout[-6000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == FILES and len(names) <= 8  # the device tool brings back 8 files at most
    for name in ("kernels-dryrun.md", "prune-dryrun.md", "search-step-dryrun.md"):
        head = (out / name).read_text().splitlines()[:8]
        assert head[0].startswith("# "), name
        for field in ("- date: ", "- machine: ", "- command: "):
            assert any(line.startswith(field) for line in head), (name, field)

    kernels = (out / "kernels-dryrun.md").read_text()
    rows = [line for line in kernels.splitlines() if line.startswith("| R5")]
    assert len(rows) == 2 * 3  # 3 tiny shapes, K = 16: the masks/s table and the TFLOP/s table
    assert "batched loop" in kernels and "TFLOP/s" in kernels
    k = json.loads((out / "gpu-check-dryrun.json").read_text())["kernels"]
    assert k["meta"]["baseline"] == "batched" and k["peaks"]["fp32"] > 0
    for r in k["rows"]:
        assert r["K"] == 16 and r["flops_per_mask"] > 0
        for mode in ("affine+relu", "batch+none", "batch+relu"):
            assert r[f"fused {mode}"] > 0 and r[f"loop {mode}"] > 0 and r[f"tflops {mode}"] > 0
            assert r[f"loop {mode} variant"] in ("grouped", "folded")

    prune = (out / "prune-dryrun.md").read_text()
    assert "| steps | 1 |" in prune and "| layer | before | after |" in prune
    sanitizer = (out / "sanitizer-dryrun.log").read_text()
    assert "would run: compute-sanitizer --tool memcheck" in sanitizer
    assert "would run: compute-sanitizer --tool racecheck" in sanitizer
    assert "checks passed on cpu" in sanitizer
    with tarfile.open(out / "logs-dryrun.tar.gz") as tar:
        members = {Path(m).name for m in tar.getnames()}
    assert {"stages.tsv", "pytest.xml", "b.log", "d.log", "e2.log", "report.json"} <= members
    assert not any(m.endswith(".pt") for m in members)


@pytest.mark.parametrize("case", ["failing-stage", "out-of-time"])
def test_a_stage_that_fails_or_cannot_run_fails_the_check(case: str, tmp_path) -> None:
    if case == "failing-stage":  # pytest selects nothing: exit 5, the stage fails
        proc = dry_run(tmp_path, "--only", "0,b", GPU_CHECK_DRY_TESTS="no_such_test_anywhere")
        bad, note = "b", "exit"
    else:  # a budget too small to start any stage
        proc = dry_run(tmp_path, "--only", "0", GPU_CHECK_BUDGET_S="30")
        bad, note = "0", "out of time"
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert f"result: FAILED STAGES: {bad}" in proc.stdout
    stages = json.loads((tmp_path / "gpu-check-dryrun.json").read_text())["stages"]
    st = {s["id"]: s for s in stages}
    assert st[bad]["status"] in ("FAILED", "NO-TIME") and note in st[bad]["note"]
    assert all(st[s]["status"] == "skipped" for s in ("c1", "c2", "d", "e1", "e2"))
    assert (tmp_path / "kernels-dryrun.md").read_text().count("Not measured: stage d skipped") == 1
