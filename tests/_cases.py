"""Random follower cases and the damage comparison shared by the op tests (CPU, CUDA, emulated)."""

from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

#: Where the `cuda`-marked tests run: "cuda", or "cpu" to dry-run their logic on the CPU ops
#: (``AOFP_CUDA_TEST_DEVICE=cpu``, as bench/gpu_check.sh --dry-run does).
CUDA_TEST_DEVICE = os.environ.get("AOFP_CUDA_TEST_DEVICE", "cuda")


def cuda_skip_reason() -> str | None:
    """Why the `cuda`-marked tests cannot run here (None: they can, or it is a CPU dry run)."""
    if CUDA_TEST_DEVICE != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device"
    import aofp_ext

    try:
        info = aofp_ext.build_info()
    except Exception as exc:  # pragma: no cover - broken install
        return f"aofp_ext._C not loadable: {exc}"
    if not info["cuda"]:
        return "aofp_ext was built without its CUDA kernels"
    return None


def rand_case(gen, *, N, C, O, H=None, W=None, k=3, K=9, bias=True, norm="none", linear=False):
    """Random follower input (post-ReLU, so with a large mean), weights, masks (row 0 keeps all,
    row 1 drops all), BN parameters; on the CPU (move with `dev`)."""
    if linear:
        x = torch.randn(N, C, generator=gen).relu_()
        w = torch.randn(O, C, generator=gen) / C**0.5
    else:
        x = torch.randn(N, C, H, W if W is not None else H, generator=gen).relu_()
        w = torch.randn(O, C, k, k, generator=gen) / (C * k * k) ** 0.5
    masks = torch.rand(K, C, generator=gen) < torch.rand(K, 1, generator=gen)
    masks[0] = True
    if K > 1:
        masks[1] = False
    kw = {"bias": torch.randn(O, generator=gen) if bias else None}
    if norm != "none":
        kw["scale"] = torch.rand(O, generator=gen) + 0.5
        kw["shift"] = torch.randn(O, generator=gen) * 0.2
    return x, w, masks, kw


#: Absolute floor of the damage tolerance for the unit-scale data of :func:`rand_case`: float32
#: rounding of a damage that is exactly zero (batch statistics over a single output position,
#: where every mask gives the same normalised output) leaves ~1e-10; real errors are >= 1e-3.
ZERO_FLOOR = 1e-8


def assert_damage_close(got, ref, rtol=1e-4, atol_frac=1e-5, floor=ZERO_FLOOR):
    """``floor``: the absolute tolerance below which damages are not told apart (default
    :data:`ZERO_FLOOR`)."""
    assert got.dtype == torch.float32 and got.shape == ref.shape, (got.dtype, got.shape, ref.shape)
    ref = ref.detach().to("cpu", torch.float64)
    got = got.detach().to("cpu", torch.float64)
    atol = max(atol_frac * float(ref.abs().max()), floor) if ref.numel() else 0.0
    err = (got - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bool(bad.any()), (
        f"max abs err {float(err.max()):.3e}, max rel err "
        f"{float((err / ref.abs().clamp_min(1e-30)).max()):.3e} at masks "
        f"{bad.nonzero().flatten().tolist()[:8]}; got {got[bad][:4].tolist()} "
        f"want {ref[bad][:4].tolist()}")


def conv_sweep(C: int = 13, HW: int = 10, K: int = 20) -> dict:
    """Hypothesis strategies of a random conv follower case for the op sweeps: up to ``C`` input
    channels, maps of 5 .. ``HW``, 1 .. ``K`` masks; pass them as ``@given(**conv_sweep(), ...)``
    and drop the draws that :func:`conv_fits` rejects."""
    return dict(
        N=st.integers(1, 3), C=st.integers(1, C), O=st.integers(1, 11), H=st.integers(5, HW),
        W=st.integers(5, HW), k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
        padding=st.integers(0, 2), dilation=st.integers(1, 2), K=st.integers(1, K),
        bias=st.booleans(), seed=st.integers(0, 2**31 - 1))


def conv_fits(H: int, W: int, k: int, padding: int, dilation: int) -> bool:
    """The conv has an output at all (else it is undefined; its error path is tested apart)."""
    reach = dilation * (k - 1) + 1
    return H + 2 * padding >= reach and W + 2 * padding >= reach
