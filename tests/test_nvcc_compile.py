"""Compile-only check of every CUDA source under csrc with nvcc, for sm_90 (+ compute_90 PTX).

Runs wherever nvcc is on PATH, GPU or not, torch with CUDA or not, so a broken kernel or a broken
piece of CUDA glue is caught on a CPU-only CI machine. The torch-free kernels (csrc/kernels) are
compiled with only csrc on the include path and with warnings as errors; the ATen glue
(csrc/ops/cuda) against the installed torch's headers, as CMake would. Files compile in
parallel; nvcc's output is printed on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = CSRC / "kernels"
NVCC = shutil.which("nvcc")
CU_FILES = sorted(CSRC.rglob("*.cu"))

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

# The flags CMake uses for CUDA sources (CMakeLists.txt), for sm_90 SASS and compute_90 PTX.
COMMON = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-O3",
    f"-I{CSRC}",
]


def _cxx_standard() -> int:
    """The C++ standard CMake chose for the installed torch (C++20 from torch 2.14 on)."""
    try:
        import aofp_ext

        return int(aofp_ext.build_info()["cxx_standard"])
    except Exception:  # extension not built: the rule of CMakeLists.txt
        import torch

        major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        return 20 if (major, minor) >= (2, 14) else 17


def _torch_flags() -> list[str]:
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    # A CPU-only torch ships c10/cuda headers but not the generated cuda_cmake_macros.h (which
    # only matters for Windows DLL exports); skip it.
    flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    import torch

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
    return flags


def _command(path: Path, out_dir: Path, torch_flags: list[str]) -> list[str]:
    cmd = [NVCC, f"-std=c++{_cxx_standard()}", *COMMON]
    if KERNELS in path.parents:
        # torch-free: nothing but csrc on the include path, and no warning tolerated
        cmd += ["-Werror", "all-warnings", "-Xcompiler", "-Wall"]
    else:
        cmd += torch_flags
    obj = out_dir / (str(path.relative_to(CSRC)).replace(os.sep, "__") + ".o")
    return [*cmd, "-c", str(path), "-o", str(obj)]


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory) -> dict[str, tuple[int, str, float]]:
    out_dir = tmp_path_factory.mktemp("nvcc")
    torch_flags = _torch_flags()

    def compile_one(path: Path) -> tuple[str, tuple[int, str, float]]:
        cmd = _command(path, out_dir, torch_flags)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, log = -1, f"timed out after {exc.timeout} s"
        return str(path.relative_to(ROOT)), (rc, " ".join(cmd) + "\n" + log,
                                             time.monotonic() - t0)

    # The glue files (ATen headers) are the slow ones: start them first.
    order = sorted(CU_FILES, key=lambda p: KERNELS in p.parents)
    workers = max(1, min(len(order), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(pool.map(compile_one, order))
    for name, (rc, _, sec) in sorted(results.items()):
        print(f"nvcc {name}: rc={rc} in {sec:.1f} s", file=sys.stderr)
    return results


def test_cuda_sources_exist():
    kernels = [p for p in CU_FILES if KERNELS in p.parents]
    glue = [p for p in CU_FILES if KERNELS not in p.parents]
    assert kernels, "no CUDA kernels (*.cu) under csrc/kernels"
    assert glue, "no CUDA glue (*.cu) under csrc/ops/cuda"


@pytest.mark.parametrize("rel", [str(p.relative_to(ROOT)) for p in CU_FILES])
def test_nvcc_compiles(nvcc_results, rel):
    rc, log, _ = nvcc_results[rel]
    assert rc == 0, f"nvcc failed on {rel} (rc={rc}):\n{log}"
