"""Distributed AOFP search: steps per second with 1 and N processes (torch.distributed).

Runs the search of aofp_ext.prune (no finetune) for a fixed number of steps and reports rank 0's
steady-state steps per second (the steps after --skip), at the SAME global batch for every
process count (each of N processes trains and prices on 1/N of it: strong scaling, the number
that shortens a prune, whose step count does not depend on N). Models: ResNet-20 (shipped
weights) on the shipped CIFAR-10 subset, 64 attempts per layer per step; LeNet-5-BN on the
shipped MNIST (a small net: mostly fixed costs and communication).

- CPU (default): gloo, one intra-op thread per process; 1 process, N processes (N = --nproc,
  default 2), and 1 process with N threads (what the same cores give without distribution).
- GPU (--device cuda): NCCL, one GPU per process, 1, 2, 4, ... up to the GPUs present.

Scaling = steps/s with N processes / (N x steps/s with 1 process). It can reach 1 only where
every process has a core (GPU) of its own: the load average (other work on the machine) is
printed next to every row. Next to it, the CPU seconds per step summed over the processes: equal
to one process's when splitting the batch adds no work, whatever the cores were doing otherwise
(their ratio is the best scaling the work split allows on free cores).

    python bench/distributed.py --out bench/results/distributed.md      # CPU, 1 and 2 processes
    python bench/distributed.py --model lenet --steps 30                # one model, shorter
    python bench/distributed.py --device cuda --out bench/results/distributed-gpu.md

OMP_WAIT_POLICY is set to PASSIVE (unless set), as in bench/prune.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _common import cpu_name  # noqa: E402  (bench/, first on sys.path)

MODELS = {
    # global batch, attempts per step, thresh, steps per half
    "resnet20": {"batch": 64, "masks": 64, "thresh": 0.05, "iters_per_half": 16},
    "lenet": {"batch": 256, "masks": 64, "thresh": 0.05, "iters_per_half": 7},
}


def machine() -> str:
    cpu = cpu_name()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {gpus} CUDA GPU(s), torch "
            f"{torch.__version__}, Python {platform.python_version()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# --------------------------------------------------------------------------------------------
# One process of a run
# --------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    import aofp_ext
    from aofp_ext.data import cifar10, default_data_dir, mnist
    from aofp_ext.models import lenet5_bn, load_pretrained, resnet20

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=600))
    cfg = MODELS[args.model]
    data = default_data_dir()
    if args.model == "resnet20":
        train = cifar10(data / "cifar10-subset" / "cifar-10-batches-py", "train")
        model = load_pretrained(resnet20(), data / "weights" / "resnet20-12fca82f.th")
        example = torch.zeros(1, 3, 32, 32)
    else:
        train = mnist(data / "mnist", "train")
        torch.manual_seed(0)
        model = lenet5_bn()
        example = torch.zeros(1, 1, 28, 28)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=cfg["batch"] // world, sampler=sampler)
    stamps: list[tuple[float, float]] = []  # (wall, CPU seconds of this process) per step
    warnings.simplefilter("ignore")  # the max_steps warning: the run stops there on purpose
    t0 = time.perf_counter()
    aofp_ext.prune(model.to(device), loader, example_inputs=example, target_flops=0.05 if
                   args.model == "lenet" else 0.3, masks_per_step=cfg["masks"],
                   thresh=cfg["thresh"], iters_per_half=cfg["iters_per_half"], warmup_iters=0,
                   max_steps=args.skip + args.steps, device=device, progress=False,
                   callback=lambda step, info: stamps.append((time.perf_counter(),
                                                              time.process_time())))
    total = time.perf_counter() - t0
    n = len(stamps) - args.skip
    (wall0, cpu0), (wall1, cpu1) = stamps[args.skip - 1], stamps[-1]
    Path(f"{args.result}.rank{rank}").write_text(json.dumps({
        "steps_per_s": n / (wall1 - wall0), "cpu_s_per_step": (cpu1 - cpu0) / n,
        "measured_steps": n, "total_s": total, "threads": torch.get_num_threads(),
        "world": world}))
    if world > 1:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, nproc: int, threads: int, work: Path) -> dict:
    result = work / f"{args.model}-{args.device}-{nproc}p-{threads}t.json"
    port = free_port()
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--device", args.device,
           "--steps", str(args.steps), "--skip", str(args.skip), "--result", str(result)]
    procs = []
    l0, t0 = load(), time.perf_counter()
    for r in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise SystemExit(f"bench/distributed.py: a {nproc}-process run failed ({codes})")
    ranks = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(nproc)]
    row = dict(ranks[0], cpu_s_per_step=sum(r["cpu_s_per_step"] for r in ranks))
    row.update(model=args.model, device=args.device, nproc=nproc,
               wall_s=time.perf_counter() - t0, load_start=l0, load_end=load())
    print(f"  {args.model} {args.device} {nproc} process(es) x {threads} thread(s): "
          f"{row['steps_per_s']:.3f} steps/s, {row['cpu_s_per_step']:.2f} CPU s/step (load "
          f"{l0:.2f} -> {row['load_end']:.2f})",
          flush=True)
    return row


def markdown(results: dict) -> str:
    lines = [
        "# Distributed AOFP search (bench/distributed.py)",
        "",
        f"- date: {results['date']}",
        f"- machine: {results['machine']}",
        f"- command: `{results['command']}`",
        f"- {results['steps']} search steps measured per run after {results['skip']} "
        "(start-up, first-call costs); steps/s of rank 0; the same global batch for every "
        "process count; `load` is the 1-minute load average at the start and end of the run.",
        f"- GPUs: {results['gpu_note']}",
        "",
        "| model | backend | processes x threads | global batch | K | steps/s | scaling | "
        "CPU s/step (all processes) | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for model in results["models"]:
        rows = [r for r in results["rows"] if r["model"] == model]
        base = next((r for r in rows if r["nproc"] == 1 and r["threads"] == 1), None)
        for r in rows:
            scale = "-"
            if base is not None and (r["nproc"] > 1 or r["threads"] > 1):
                workers = r["nproc"] * r["threads"]
                scale = f"{r['steps_per_s'] / (workers * base['steps_per_s']):.2f}"
            backend = ("nccl" if r["device"] == "cuda" else "gloo") if r["nproc"] > 1 else "-"
            lines.append(
                f"| {model} | {backend} | {r['nproc']} x {r['threads']} | "
                f"{MODELS[model]['batch']} | {MODELS[model]['masks']} | "
                f"{r['steps_per_s']:.3f} | {scale} | {r['cpu_s_per_step']:.3f} | "
                f"{r['load_start']:.2f} -> {r['load_end']:.2f} |")
    lines += ["", "Scaling: steps/s / (processes x threads x the steps/s of 1 process with 1 "
              "thread); 1.00 is linear. CPU s/step: CPU seconds per measured step, summed over "
              "the processes (includes the time a process spins or polls in a collective).",
              ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=[*MODELS, "all"], default="all")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=2,
                   help="CPU: the process count to compare with one process (default 2)")
    p.add_argument("--steps", type=int, default=30, help="steps measured per run (default 30)")
    p.add_argument("--skip", type=int, default=5, help="steps not measured (default 5)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", help="write the Markdown report here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.skip < 1 or args.steps < 1:
        p.error("--steps and --skip must be >= 1")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda":
        if gpus == 0:
            p.error("--device cuda: no CUDA GPU here")
        counts = [(n, 1) for n in (1, 2, 4, 8, 16) if n <= gpus]
        gpu_note = f"{gpus} CUDA GPU(s), one per process (NCCL)"
    else:
        counts = [(1, 1), (args.nproc, 1), (1, args.nproc)]
        gpu_note = (f"{gpus} CUDA GPU(s) present; this run used the CPU only" if gpus else
                    "none on this machine: no NCCL run (bench/distributed.py --device cuda on "
                    "a machine with GPUs)")
    models = list(MODELS) if args.model == "all" else [args.model]
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine(), "command": "python bench/distributed.py " + " ".join(argv),
               "steps": args.steps, "skip": args.skip, "gpu_note": gpu_note, "models": models,
               "rows": []}
    work = Path(tempfile.mkdtemp(prefix="aofp-bench-dist-"))
    for model in models:
        args.model = model
        for nproc, threads in counts:
            results["rows"].append({**run(args, nproc, threads, work), "threads": threads})
    (work / "distributed-results.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    print("\n" + md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        print(f"wrote {args.out} (raw results: {work / 'distributed-results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
