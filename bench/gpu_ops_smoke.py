"""Every op of aofp_ext once or a few times on small shapes, checked against the float64
references: the program bench/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck).

Small on purpose (the sanitizers slow every launch down by orders of magnitude), but it reaches
every kernel: masked_damage in each norm/post mode on conv and Linear followers with K up to 256
(more than one tile of 128 masks, a partial tile), strided and channels-last inputs, float16,
small workspace budgets (chunks of positions and of masks), channel_gram (32- and 64-wide tiles)
+ quadratic_damage, compact_ with a tiny temporary. Inputs are drawn on the CPU and copied, so
the device runs almost nothing but the extension's kernels.

    python bench/gpu_ops_smoke.py --device cuda       # under compute-sanitizer: see gpu_check.sh
    python bench/gpu_ops_smoke.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

from aofp_ext import ops

NORM_POST = list(itertools.product(["none", "affine", "batch"], ["none", "relu"]))


def case(gen, *, N, C, O, H=None, k=3, K, linear=False):
    if linear:
        x = torch.randn(N, C, generator=gen).relu_()
        w = torch.randn(O, C, generator=gen) / C**0.5
    else:
        x = torch.randn(N, C, H, H, generator=gen).relu_()
        w = torch.randn(O, C, k, k, generator=gen) / (C * k * k) ** 0.5
    masks = torch.rand(K, C, generator=gen) < torch.rand(K, 1, generator=gen)
    masks[0] = True
    if K > 1:
        masks[1] = False
    extra = dict(bias=torch.randn(O, generator=gen), scale=torch.rand(O, generator=gen) + 0.5,
                 shift=torch.randn(O, generator=gen) * 0.2)
    return x, w, masks, extra


def close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, want {tuple(ref.shape)}")
    atol = 1e-5 * float(ref.abs().max()) if ref.numel() else 0.0
    bad = (got - ref).abs() > atol + rtol * ref.abs()
    if bool(bad.any()) or bool(torch.isnan(got).any()):
        raise AssertionError(f"{name}: {int(bad.sum())} of {got.numel()} values off; got "
                             f"{got[bad][:4].tolist()} want {ref[bad][:4].tolist()}")


def to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


def masked_damage_cases(dev: str, quick: bool, gen, tiny: bool = False) -> int:
    shapes = [dict(N=2, C=16, O=8, H=8, k=3, K=130 if quick else 256, geo=dict(padding=1)),
              dict(N=1, C=33, O=5, H=7, k=1, K=130, geo=dict(stride=2))]
    if tiny:  # the dry run of the logic on the CPU
        for sh in shapes:
            sh["K"] = 9
    if not quick:
        shapes.append(dict(N=10, C=40, O=6, K=64, linear=True, geo={}))
    n = 0
    for sh in shapes:
        sh = dict(sh)
        geo = sh.pop("geo")
        x, w, masks, extra = case(gen, **sh)
        for norm, post in NORM_POST if not quick else [("affine", "relu"), ("batch", "relu"),
                                                        ("none", "none")]:
            kw = dict(extra) if norm != "none" else {"bias": extra["bias"]}
            ref = ops.masked_damage_reference(x, w, masks, norm=norm, post=post, **geo, **kw)
            xd, wd, md = to(dev, x, w, masks)
            kd = {k: v.to(dev) for k, v in kw.items()}
            close(f"masked_damage {sh} {norm}+{post}",
                  ops.masked_damage(xd, wd, md, norm=norm, post=post, **geo, **kd), ref)
            n += 1
    # strided / channels-last input and float16 on a ResNet-like follower
    x, w, masks, extra = case(gen, N=3, C=12, O=7, H=6, K=40)
    ref = ops.masked_damage_reference(x, w, masks, padding=1, norm="batch", post="relu", **extra)
    xd, wd, md = to(dev, x, w, masks)
    kd = {k: v.to(dev) for k, v in extra.items()}
    for v in (xd.contiguous(memory_format=torch.channels_last),
              torch.stack([xd, torch.zeros_like(xd)], dim=2)[:, :, 0]):
        close("masked_damage non-contiguous", ops.masked_damage(
            v, wd, md, padding=1, norm="batch", post="relu", **kd), ref)
        n += 1
    xh, wh = x.half(), w.half()
    close("masked_damage float16", ops.masked_damage(
        *to(dev, xh, wh, masks), padding=1, norm="affine", post="relu", **kd),
        ops.masked_damage_reference(xh, wh, masks, padding=1, norm="affine", post="relu", **extra))
    return n + 1


def chunked_cases(dev: str, gen) -> int:
    """Small workspace budgets: several position chunks and mask chunks per call."""
    x, w, masks, extra = case(gen, N=4, C=24, O=5, H=10, K=200)
    n = 0
    saved = {k: os.environ.get(k) for k in ("AOFP_CUDA_Z_BYTES", "AOFP_CUDA_MASK_BYTES")}
    try:
        for zb, mb in ((64 << 10, 1), (2048, 1 << 20)):
            os.environ["AOFP_CUDA_Z_BYTES"], os.environ["AOFP_CUDA_MASK_BYTES"] = str(zb), str(mb)
            for norm, post in (("batch", "relu"), ("none", "none")):
                kw = dict(extra) if norm != "none" else {"bias": extra["bias"]}
                ref = ops.masked_damage_reference(x, w, masks, padding=1, norm=norm, post=post, **kw)
                got = ops.masked_damage(*to(dev, x, w, masks), padding=1, norm=norm, post=post,
                                        **{k: v.to(dev) for k, v in kw.items()})
                close(f"masked_damage budgets z={zb} mask={mb} {norm}+{post}", got, ref)
                n += 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return n


def gram_cases(dev: str, gen) -> int:
    n = 0
    for C, O, H in ((20, 6, 7), (70, 3, 5)):  # 32- and 64-wide SYRK tiles
        x, w, masks, extra = case(gen, N=2, C=C, O=O, H=H, K=100)
        G = ops.channel_gram(*to(dev, x, w), padding=1, scale=extra["scale"].to(dev))
        Gr = ops.channel_gram_reference(x, w, padding=1, scale=extra["scale"])
        close(f"channel_gram C={C}", G, Gr, rtol=1e-5)
        close(f"quadratic_damage C={C}", ops.quadratic_damage(G, masks.to(dev)),
              ops.quadratic_damage_reference(Gr, masks), rtol=1e-4)
        n += 2
    return n


def compact_cases(dev: str, gen) -> int:
    saved = os.environ.get("AOFP_CUDA_COMPACT_TEMP_BYTES")
    n = 0
    try:
        for temp in ("48", str(32 << 20)):
            os.environ["AOFP_CUDA_COMPACT_TEMP_BYTES"] = temp
            for shape, dim in (((6, 50, 7), 1), ((40, 3), 0), ((3, 9, 2, 5), 2)):
                a = torch.randn(*shape, generator=gen)
                size = shape[dim]
                keep = torch.tensor(sorted(torch.randperm(size, generator=gen)[: size // 2 + 1]
                                           .tolist()))
                t = a.clone().to(dev)
                ops.compact_([t], [dim], keep)
                if not torch.equal(t.cpu(), a.index_select(dim, keep)):
                    raise AssertionError(f"compact_ {shape} dim {dim} temp {temp}: wrong values")
                n += 1
    finally:
        if saved is None:
            os.environ.pop("AOFP_CUDA_COMPACT_TEMP_BYTES", None)
        else:
            os.environ["AOFP_CUDA_COMPACT_TEMP_BYTES"] = saved
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true",
                   help="fewer cases (for racecheck, the slowest sanitizer tool)")
    p.add_argument("--tiny", action="store_true",
                   help="with --quick: K = 9 instead of up to 256 (a dry run of the logic on the CPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    gen = torch.Generator().manual_seed(2026)
    n = masked_damage_cases(args.device, args.quick, gen, args.tiny)
    n += chunked_cases(args.device, gen)
    n += gram_cases(args.device, gen)
    n += compact_cases(args.device, gen)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_ops_smoke: {n} checks passed on {args.device}"
          + (" (quick)" if args.quick else "") + (" (tiny)" if args.tiny else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
