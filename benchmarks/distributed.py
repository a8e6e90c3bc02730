"""Vocabulary-parallel fused losses: peak memory per rank, vocabulary sharded over 2 ranks vs 1 rank.

    python -m benchmarks.distributed                    # N=2048 H=256 V=32768 fp32, CE and forward KL
    python -m benchmarks.distributed --quick            # a small smoke run
    python -m benchmarks.distributed --size 4096,256,65536 --ranks 1,2

The same global problem (hidden ``[N, H]`` on every rank, a ``[V, H]`` output weight, labels ``[N]``;
KD adds a teacher of the same shape) is run as one forward + backward (gradients of the hidden
states and of the student's weight rows) by:

* ``ours``: the fused loss; 1 rank: the whole weight (``linear_cross_entropy`` / ``linear_kd_loss``);
  R ranks: each holds ``V / R`` rows and runs the vocabulary-parallel path (``process_group=``);
* ``plain`` (1 rank): eager full logits, ``F.cross_entropy(F.linear(h, W))`` / log-softmax forward KL;
* ``loss_parallel`` (CE, R > 1 ranks): PyTorch's own tensor-parallel cross-entropy
  (``torch.distributed.tensor.parallel.loss_parallel``) on each rank's ``[N, V / R]`` logits, as
  torchtune main uses it: it materializes the shard's logits.

Each (task, method, ranks) runs in fresh processes (``torchrun``, gloo, CPU). Per rank, after a
warm-up step the gradients are dropped, freed heap pages are returned to the OS (``malloc_trim``),
VmRSS is read and the high-water mark VmHWM reset; one step runs; peak = VmHWM - VmRSS before it
(what the loss needs above its inputs). Median of ``--reps`` steps; the table shows the largest rank.
Every process runs with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``, see
:data:`MMAP_THRESHOLD`) so that freed tensors leave the resident set at once.
CUDA (``--device cuda``, one GPU per rank): ``max_memory_allocated`` above the allocated baseline.
Torch threads per rank: ``--threads`` / ranks (the ranks share the CPU), so times are indicative only.

Results: a markdown table on stdout and ``distributed.json`` / ``distributed.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Dict, List, Optional

from benchmarks.run import run_result_process
from benchmarks.worker import _reset_hwm, _status_kib, _trim_heap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
# glibc serves allocations above this from mmap and unmaps them on free. Fixed (glibc otherwise raises
# it up to 32 MiB as large blocks are freed), so resident memory follows the live tensors: with the
# dynamic threshold, chunk-sized buffers were recycled through the heap and the peak RSS of the very
# same 2-rank KD step read 107-134 MiB instead of 54 MiB (fragmentation, not tensors).
MMAP_THRESHOLD = 128 * 1024


# ---------------------------------------------------------------------------------- rank worker


def _worker(job: dict) -> None:
    """One (task, method) on this rank; rank 0 prints ``RESULT <json>`` with every rank's peaks."""
    import gc

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from tune_losses import VocabParallelOptions, linear_cross_entropy, linear_kd_loss
    from tune_losses.fused.vocab_parallel import even_shard_sizes

    device = job["device"]
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(max(1, job["threads"] // world))
    n, h, v = job["n"], job["h"], job["v"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    dev = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    task, method = job["task"], job["method"]

    sizes = even_shard_sizes(v, world)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dev, dtype)
    weight = (torch.randn(v, h, generator=g) * h**-0.5)[rows].clone().to(dev, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    t_hidden = t_weight = None
    if task == "kd":
        t_hidden = torch.randn(n, h, generator=g).to(dev, dtype)
        t_weight = (torch.randn(v, h, generator=g) * h**-0.5)[rows].clone().to(dev, dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    group = dist.group.WORLD if world > 1 else None
    par = dict(parallel=VocabParallelOptions(process_group=group, vocab_start=start, vocab_size=v)) if world > 1 else {}
    mesh = None
    if method == "loss_parallel":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (world,), mesh_dim_names=("tp",))

    def step():
        if method == "ours":
            if task == "ce":
                loss = linear_cross_entropy(hidden, weight, labels, **par)
            else:
                loss = linear_kd_loss(hidden, weight, t_hidden, t_weight, labels, **par)
        elif method == "plain":
            logits = F.linear(hidden, weight).float()
            if task == "ce":
                loss = F.cross_entropy(logits, labels)
            else:
                with torch.no_grad():
                    log_p = torch.log_softmax(F.linear(t_hidden, t_weight).float(), -1)
                loss = (log_p.exp() * (log_p - torch.log_softmax(logits, -1))).sum(-1).mean()
        elif method == "loss_parallel":
            from torch.distributed.tensor import DTensor, Shard
            from torch.distributed.tensor.parallel import loss_parallel

            logits = DTensor.from_local(F.linear(hidden, weight).float(), mesh, [Shard(1)], run_check=False)
            with loss_parallel():
                loss = F.cross_entropy(logits, labels)
                loss.backward()
            return
        else:
            raise ValueError(f"method: {method!r}")
        loss.backward()

    def clear():
        hidden.grad = None
        weight.grad = None

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(job["warmup"]):
        step()
        clear()
    sync()
    peaks, times = [], []
    for _ in range(job["reps"]):
        clear()
        gc.collect()
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _trim_heap()
            base = _status_kib("VmRSS") * 1024
            _reset_hwm()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if device == "cuda":
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            peaks.append(_status_kib("VmHWM") * 1024 - base)
    mine = torch.tensor([statistics.median(peaks), statistics.median(times)], dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if rank == 0:
        print(
            "RESULT "
            + json.dumps({"peak_bytes": [float(t[0]) for t in everyone], "time_s": [float(t[1]) for t in everyone]}),
            flush=True,
        )
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(job: dict, ranks: int, timeout: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "benchmarks.distributed",
        "--worker",
        json.dumps(job),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS=str(max(1, job["threads"] // ranks)),
        MALLOC_ARENA_MAX="2",
        MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    return run_result_process(cmd, env, timeout)


def cases(tasks: List[str], ranks: List[int]) -> List[tuple]:
    out = []
    for task in tasks:
        out.append((task, "plain", 1))
        for r in ranks:
            out.append((task, "ours", r))
            if task == "ce" and r > 1:
                out.append((task, "loss_parallel", r))
    return out


def markdown(results: dict) -> str:
    s = results["size"]
    lines = [
        f"Peak memory per rank (largest rank), fwd + bwd, N={s['n']} H={s['h']} V={s['v']} {s['dtype']} "
        f"{results['meta']['device']}; ratio against `ours` on 1 rank. Floor: dX [N, H] + dW [V/R, H].",
        "",
        "| task | method | ranks | peak / rank MiB | vs ours 1 rank | floor MiB | time s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task in results["tasks"]:
        rows = [c for c in results["cases"] if c["task"] == task]
        base = next((c for c in rows if c["method"] == "ours" and c["ranks"] == 1 and "peak_mib" in c), None)
        for c in rows:
            if "error" in c:
                lines.append(f"| {task} | {c['method']} | {c['ranks']} | error: {c['error']} | | | |")
                continue
            ratio = f"{c['peak_mib'] / base['peak_mib']:.2f}x" if base else "-"
            lines.append(
                f"| {task} | {c['method']} | {c['ranks']} | {c['peak_mib']:.1f} | {ratio} | "
                f"{c['floor_mib']:.1f} | {c['time_s']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, metavar="N,H,V[,dtype]", help="default 2048,256,32768,fp32")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts for the fused loss")
    p.add_argument("--tasks", default="ce,kd", help="comma-separated: ce,kd")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--reps", type=int, default=3, help="measured steps per case (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in all, split over ranks")
    p.add_argument("--quick", action="store_true", help="N=512 H=64 V=8192, 1 rep")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker(json.loads(args.worker))
        return 0

    text = args.size or ("512,64,8192" if args.quick else "2048,256,32768")
    parts = text.split(",")
    if len(parts) not in (3, 4):
        p.error(f"--size: expected N,H,V[,dtype], got {text!r}")
    n, h, v = (int(x) for x in parts[:3])
    dtype = parts[3] if len(parts) == 4 else "fp32"
    reps = 1 if args.quick else args.reps
    ranks = [int(r) for r in args.ranks.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    t0 = time.perf_counter()
    es = 4 if dtype == "fp32" else 2
    out: List[Dict] = []
    size = {"n": n, "h": h, "v": v, "dtype": dtype}
    settings = dict(size, device=args.device, reps=reps, warmup=args.warmup, threads=args.threads)
    for task, method, r in cases(tasks, ranks):
        job = dict(settings, task=task, method=method)
        print(f"[{time.perf_counter() - t0:6.0f} s] {task} {method} ranks={r} ...", file=sys.stderr, flush=True)
        res = run_case(job, r, args.timeout)
        case = {"task": task, "method": method, "ranks": r}
        if "error" in res:
            case["error"] = res["error"]
        else:
            case.update(
                peak_mib=max(res["peak_bytes"]) / MIB,
                peak_mib_per_rank=[b / MIB for b in res["peak_bytes"]],
                time_s=max(res["time_s"]),
                floor_mib=(n * h + -(-v // r) * h) * es / MIB,
            )
        out.append(case)
    results = {
        "size": size,
        "tasks": tasks,
        "cases": out,
        "meta": {
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "reps": reps,
            "threads_total": args.threads,
            "wall_s": round(time.perf_counter() - t0, 1),
        },
    }
    md = markdown(results)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write(md)
    print(f"Wrote {args.out}/distributed.json and distributed.md ({results['meta']['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if all("error" not in c for c in out) else 1


if __name__ == "__main__":
    sys.exit(main())
