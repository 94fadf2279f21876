"""The CUDA kernels' own source, run on the CPU under a small CUDA emulation (tests/cuda_emu).

No GPU needed: the kernels of csrc/kernels/*.cu are compiled as C++ (only their <<<...>>> launch
syntax rewritten) against tests/cuda_emu/cuda_runtime.h, where every block runs as 256
cooperative fibers with real barriers, shared memory and warp shuffles, under AddressSanitizer
and UBSan. The results are compared with the float64 references of aofp_ext.ops. This checks
the kernels' logic -- indexing, tiling, chunking, the float64 reductions, the BatchNorm algebra,
compact's overlap scheme, out-of-bounds accesses, divergent barriers -- but not nvcc's code
generation, races between blocks, or speed; tests/test_cuda.py does that on a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from aofp_ext import ops

from _cases import assert_damage_close, rand_case

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = ROOT / "tests" / "cuda_emu"
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
KERNEL_SOURCES = sorted((CSRC / "kernels").glob("*.cu"))

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on PATH")

NORMS = {"none": 0, "affine": 1, "batch": 2}
POSTS = {"none": 0, "relu": 1}
NORM_POST = [(n, p) for n in NORMS for p in POSTS]

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)


def rewrite_cuda(src: str) -> str:
    """`k<<<g, b, s, st>>>(args);` -> `::aofp_emu::launch([=]() { k(args); }, g, b, s, st);`"""
    out = _LAUNCH.sub(lambda m: f"::aofp_emu::launch([=]() {{ {m[1]}({m[3]}); }}, {m[2]});", src)
    out = re.sub(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;",
                 r"\1* \2 = ::aofp_emu::dynamic_smem<\1>();", out)
    assert "<<<" not in out and "extern __shared__" not in out
    return out


@pytest.fixture(scope="session")
def driver(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cuda_emu")
    sources = []
    for cu in KERNEL_SOURCES:
        dst = build / (cu.stem + ".cpp")
        dst.write_text(rewrite_cuda(cu.read_text()))
        sources.append(str(dst))
    exe = build / "driver"
    base = [CXX, "-std=c++17", "-O1", "-g", "-ffp-contract=off", "-fno-omit-frame-pointer",
            f"-I{EMU}", f"-I{CSRC}", *sources, str(EMU / "driver.cpp"), "-o", str(exe)]
    sanitize = os.environ.get("AOFP_EMU_SANITIZE", "address,undefined")
    attempts = ([base[:1] + [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all"] + base[1:]]
                if sanitize else []) + [base]
    for cmd in attempts:  # without the sanitizers if this compiler has no runtime for them
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, f"building the emulated kernels failed:\n{' '.join(cmd)}\n{proc.stderr}"
    return exe


# ---- the driver's file format ----------------------------------------------------------------


def _bytes(v) -> bytes:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(v).tobytes()


def _write(path: Path, blobs: dict) -> None:
    with open(path, "wb") as f:
        for name, v in blobs.items():
            b = _bytes(v)
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<q", len(b)) + b)


def _read(path: Path) -> dict[str, bytes]:
    out, data, i = {}, path.read_bytes(), 0
    while i < len(data):
        (n,) = struct.unpack_from("<i", data, i)
        name = data[i + 4: i + 4 + n].decode()
        (nb,) = struct.unpack_from("<q", data, i + 4 + n)
        out[name] = data[i + 12 + n: i + 12 + n + nb]
        i += 12 + n + nb
    return out


_COUNTER = [0]


def run_driver(driver: Path, op: str, blobs: dict, tmp: Path) -> dict[str, bytes]:
    _COUNTER[0] += 1
    fin, fout = tmp / f"in{_COUNTER[0]}.bin", tmp / f"out{_COUNTER[0]}.bin"
    _write(fin, blobs)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([str(driver), op, str(fin), str(fout)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, f"emulated {op} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    return _read(fout)


def i64(*v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _geometry(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> np.ndarray:
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    if x.dim() == 2:
        N, C = x.shape
        return i64(N, C, 1, 1, w.shape[0], 1, 1, 1, 1, 0, 0, 1, 1, 1, 1,
                   x.stride(0), x.stride(1), 0, 0)
    N, C, H, W = x.shape
    O, _, KH, KW = w.shape
    HO = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    WO = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    return i64(N, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw, HO, WO, *x.stride())


def _x_storage(x: torch.Tensor, offset: int) -> tuple[torch.Tensor, int]:
    """The exact span of x's elements (so any read outside it is out of bounds), after `offset`
    NaN elements, and x's strides unchanged."""
    x = x.float()
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride())) if x.numel() else 0
    base = torch.full((offset + span,), float("nan"))
    base.as_strided(x.shape, x.stride(), offset).copy_(x)
    return base, offset


def emu_masked_damage(driver, tmp, x, w, masks, *, bias=None, stride=1, padding=0, dilation=1,
                      norm="none", scale=None, shift=None, eps=1e-5, post="none", budget=None,
                      seed=0, sms=3, x_offset=0):
    base, off = _x_storage(x, x_offset)
    blobs = {
        "geom": _geometry(x, w, stride, padding, dilation),
        "K": i64(masks.shape[0]), "norm": i64(NORMS[norm]), "post": i64(POSTS[post]),
        "eps": np.array([eps], dtype=np.float64),
        "x": base, "x_offset": i64(off),
        "weight": w.float().contiguous(),
        "masks": masks.to(torch.uint8).contiguous(),
        "emu": i64(seed, sms),
    }
    if bias is not None:
        blobs["bias"] = bias.float()
    if norm != "none":
        blobs["scale"], blobs["shift"] = scale.float(), shift.float()
    if budget is not None:
        blobs["budget"] = i64(*budget)
    out = run_driver(driver, "masked_damage", blobs, tmp)
    return torch.from_numpy(np.frombuffer(out["damage"], dtype=np.float32).copy())


# Budgets: the default (one chunk), small Z (chunks of 128 positions), tiny masks (chunks of 128
# masks), and "tiny" (chunks of 32 positions and 128 masks, no room for the C x C Gram matrix,
# so the linear modes take the fused kernel; a smaller problem keeps the emulation quick).
BUDGETS = {"default": None, "z_chunks": (64 << 10, 64 << 20), "mask_chunks": (128 << 20, 1),
           "tiny": (10240, 1)}


# ---- masked_damage -----------------------------------------------------------------------------


@pytest.mark.parametrize("norm,post", NORM_POST)
@pytest.mark.parametrize("budget", list(BUDGETS))
def test_masked_damage_conv(driver, tmp_path, norm, post, budget):
    gen = torch.Generator().manual_seed(hash((norm, post, budget)) % 2**31)
    if budget == "tiny":
        # 90 positions in chunks of 32, C = 40 (C^2 doubles > the Z budget), K = 133
        x, w, masks, kw = rand_case(gen, N=2, C=40, O=2, H=9, W=9, k=3, K=133, norm=norm)
    else:
        # 243 positions (2 position tiles), C = 21 (2 channel steps, the second partial),
        # K = 133 (2 mask tiles), O = 5
        x, w, masks, kw = rand_case(gen, N=3, C=21, O=5, H=11, W=13, k=3, K=133, norm=norm)
    args = dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), norm=norm, post=post, **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    got = emu_masked_damage(driver, tmp_path, x, w, masks, budget=BUDGETS[budget], **args)
    assert got[0].item() == 0.0
    assert_damage_close(got, ref)


@pytest.mark.parametrize("norm,post", NORM_POST)
def test_masked_damage_linear_follower(driver, tmp_path, norm, post):
    gen = torch.Generator().manual_seed(7 + NORMS[norm] * 2 + POSTS[post])
    x, w, masks, kw = rand_case(gen, N=37, C=19, O=6, K=20, norm=norm, linear=True)
    args = dict(norm=norm, post=post, **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    for budget in (None, (4096, 1)):  # one chunk; chunks of 8 positions and 128 masks
        got = emu_masked_damage(driver, tmp_path, x, w, masks, budget=budget, **args)
        assert got[0].item() == 0.0
        assert_damage_close(got, ref)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("sms", [1, 1000])
def test_masked_damage_thread_order_and_grid(driver, tmp_path, seed, sms):
    """Shuffled thread order within every barrier phase (a missing __syncthreads shows up as a
    wrong result) and very different grids (few blocks that loop over many tiles, and one tile
    per block)."""
    gen = torch.Generator().manual_seed(seed)
    for norm, post in (("batch", "relu"), ("affine", "relu"), ("batch", "none")):
        x, w, masks, kw = rand_case(gen, N=2, C=9, O=3, H=12, k=3, K=40, norm=norm)
        args = dict(padding=1, norm=norm, post=post, **kw)
        got = emu_masked_damage(driver, tmp_path, x, w, masks, seed=seed, sms=sms,
                                budget=(32 << 10, 64 << 20), **args)
        assert_damage_close(got, ops.masked_damage_reference(x, w, masks, **args))


def test_masked_damage_strided_x_with_offset(driver, tmp_path):
    gen = torch.Generator().manual_seed(5)
    x, w, masks, kw = rand_case(gen, N=2, C=6, O=4, H=7, K=10, norm="batch")
    args = dict(padding=1, norm="batch", post="relu", **kw)
    ref = ops.masked_damage_reference(x, w, masks, **args)
    for v in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert_damage_close(emu_masked_damage(driver, tmp_path, v, w, masks, x_offset=17, **args), ref)


def test_masked_damage_badly_scaled_batchnorm(driver, tmp_path):
    gen = torch.Generator().manual_seed(13)
    x, w, masks, kw = rand_case(gen, N=4, C=9, O=5, H=8, K=25, norm="batch")
    x = x * 50.0 + 1000.0
    kw["bias"] = torch.full((5,), 3.0e3)
    for post in ("none", "relu"):
        args = dict(padding=1, norm="batch", post=post, **kw)
        assert_damage_close(emu_masked_damage(driver, tmp_path, x, w, masks, **args),
                            ops.masked_damage_reference(x, w, masks, **args), rtol=2e-3)


def test_masked_damage_nan_propagates(driver, tmp_path):
    gen = torch.Generator().manual_seed(19)
    for norm, post in NORM_POST:
        x, w, masks, kw = rand_case(gen, N=2, C=6, O=4, H=5, K=4, norm=norm)
        x[0, 2, 1, 1] = float("nan")
        masks[:, 2] = False
        out = emu_masked_damage(driver, tmp_path, x, w, masks, padding=1, norm=norm, post=post, **kw)
        assert bool(torch.isnan(out).all()), (norm, post, out)


# ---- channel_gram / quadratic_damage -----------------------------------------------------------


@pytest.mark.parametrize("C,O,budget", [(7, 5, None), (45, 3, None), (70, 2, (4096, 1))])
def test_channel_gram(driver, tmp_path, C, O, budget):
    gen = torch.Generator().manual_seed(C)
    x, w, _, kw = rand_case(gen, N=2, C=C, O=O, H=9, k=3, K=2, norm="affine")
    for scale in (None, kw["scale"]):
        base, off = _x_storage(x, 3)
        blobs = {"geom": _geometry(x, w, 2, 1, 1), "x": base, "x_offset": i64(off),
                 "weight": w.contiguous(), "emu": i64(0, 3)}
        if scale is not None:
            blobs["scale"] = scale
        if budget is not None:
            blobs["budget"] = i64(*budget)
        out = run_driver(driver, "channel_gram", blobs, tmp_path)
        G = torch.from_numpy(np.frombuffer(out["gram"], dtype=np.float32).copy()).view(C, C)
        Gr = ops.channel_gram_reference(x, w, stride=2, padding=1, scale=scale)
        torch.testing.assert_close(G.double(), Gr, rtol=1e-5, atol=1e-5 * float(Gr.abs().max()))
        assert torch.equal(G, G.T)


@pytest.mark.parametrize("C,K", [(1, 3), (13, 17), (300, 9)])
def test_quadratic_damage(driver, tmp_path, C, K):
    gen = torch.Generator().manual_seed(C * K)
    A = torch.randn(C, C + 3, generator=gen)
    G = A @ A.T + 0.1 * torch.randn(C, C, generator=gen)   # not symmetric: the full form counts
    masks = torch.rand(K, C, generator=gen) < 0.5
    masks[0] = True
    out = run_driver(driver, "quadratic_damage",
                     {"C": i64(C), "K": i64(K), "gram": G.contiguous(),
                      "masks": masks.to(torch.uint8), "emu": i64(0, 3)}, tmp_path)
    got = torch.from_numpy(np.frombuffer(out["damage"], dtype=np.float32).copy())
    assert got[0].item() == 0.0
    assert_damage_close(got, ops.quadratic_damage_reference(G, masks), rtol=1e-5)


# ---- compact -----------------------------------------------------------------------------------


@pytest.mark.parametrize("outer,size,inner,elem", [(1, 9, 5, 4), (7, 6, 3, 1), (5, 8, 1, 2),
                                                    (3, 10, 4, 8), (4, 5, 12, 4), (1, 1, 3, 2)])
@pytest.mark.parametrize("temp_budget", [1, 7, 1 << 20])
def test_compact(driver, tmp_path, outer, size, inner, elem, temp_budget):
    gen = torch.Generator().manual_seed(outer * 100 + size * 10 + inner + elem + temp_budget)
    data = torch.randint(0, 256, (outer * size * inner * elem,), generator=gen, dtype=torch.uint8)
    keeps = [torch.arange(1, size), torch.arange(size // 2), torch.tensor([size - 1]),
             torch.sort(torch.randperm(size, generator=gen)[: max(1, size // 2)]).values]
    for keep in keeps:
        keep = keep.to(torch.int64)
        n_keep = keep.numel()
        if n_keep == 0 or n_keep == size and bool((keep == torch.arange(size)).all()):
            continue
        first = 0
        while first < n_keep and int(keep[first]) == first:
            first += 1
        out = run_driver(driver, "compact",
                         {"shape": i64(outer, size, inner, elem), "keep": keep, "data": data,
                          "first_moved": i64(first), "temp_budget": i64(temp_budget),
                          "emu": i64(0, 3)}, tmp_path)
        want = data.view(outer, size, inner * elem)[:, keep].reshape(-1)
        got = torch.frombuffer(bytearray(out["data"]), dtype=torch.uint8)
        assert torch.equal(got, want), (keep.tolist(), first)
        (tb,) = struct.unpack("<q", out["temp_bytes"])
        assert tb <= max(temp_budget, 16)
