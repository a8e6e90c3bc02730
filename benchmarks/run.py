"""Peak memory and time of fused linear losses against their peers: ``python -m benchmarks.run``.

For linear + cross-entropy and linear + forward KL, forward + backward (gradients of hidden and
weight), each method's peak memory (one fresh process per case, see :mod:`benchmarks.worker`) and
median time (one process per size, methods interleaved) are printed as a markdown table with the
sizes and the ratios against the peers of the same run; ``results.json``, ``results.md`` and
``memory_vs_tokens.png`` go to ``--out`` (default ``outputs/benchmarks``; ``--results`` writes the
committed ``benchmarks/results`` instead). The targets of the project are checked at the end.

Usage::

    python -m benchmarks.run                 # CPU default sizes (about an hour on 2 cores)
    python -m benchmarks.run --quick         # a tiny smoke run (4 to 8 minutes on 2 loaded cores,
                                             # mostly torch.compile warm-ups; printed at the end)
    python -m benchmarks.run --tasks distill --size 2048,256,32768 --methods floor,compile,liger,ours
    python -m benchmarks.run --device cuda   # larger bf16 sizes on a GPU (with the meta plan)
    python -m benchmarks.run --plan --size 8192,4096,128256,bf16 --methods floor   # the plan beside

``--plan`` (default with ``--device cuda``) also prints the allocation plan of our default and fp32
paths on ``meta`` tensors at each low-precision size (:mod:`benchmarks.memory_plan`) and writes it
to ``memory_plan.md`` beside the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

from benchmarks import report
from benchmarks.cases import (
    CPU_QUICK_SIZES,
    CPU_SIZES,
    CUDA_QUICK_SIZES,
    CUDA_SIZES,
    METHODS,
    TASKS,
    Size,
    unavailable,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_size(text: str, device: str) -> Size:
    """``N,H,V[,dtype]``, e.g. ``2048,256,32768,fp32``."""
    parts = text.split(",")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"--size: expected N,H,V[,dtype], got {text!r}")
    return Size(int(parts[0]), int(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else "fp32", device)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_job(job: dict, timeout: float) -> dict:
    """Run one worker job in a fresh Python process; its ``RESULT`` line, or an error."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    # The same allocator and thread settings for every method.
    env["MALLOC_ARENA_MAX"] = str(job["malloc_arena_max"])
    env["OMP_NUM_THREADS"] = str(job["threads"])
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if job["kind"] == "memory":
        # A fixed mmap threshold (it also stops glibc's dynamic one): every block of 64 KiB or more is
        # its own mapping, returned to the OS when freed, so resident memory follows the live tensors.
        # With glibc's defaults, freed 16 MiB chunk buffers stay resident in the heap and readings
        # of the same case scatter by +-50 MiB between runs. Time is measured with the defaults.
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    return run_result_process([sys.executable, "-m", "benchmarks.worker", json.dumps(job)], env, timeout)


def run_result_process(cmd: List[str], env: dict, timeout: float) -> dict:
    """Run a measuring process from the repository root; the JSON of its last ``RESULT`` line, or an error."""
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"worker exited {proc.returncode}: {tail[0][:160]}"}


def benchmark(sizes: List[Size], tasks: List[str], methods: Optional[List[str]], args) -> List[dict]:
    base = {"threads": args.threads, "malloc_arena_max": args.malloc_arena_max}
    cases = []
    for size in sizes:
        for task in tasks:
            entries = {}
            for m in METHODS[task]:
                if methods is not None and m not in methods:
                    continue
                why = unavailable(task, m, size)
                entries[m] = {"status": "n/a", "reason": why} if why else {"status": "ok"}
            cases.append({"task": task, "size": size.to_dict(), "floor": size.floor_bytes(), "methods": entries})

    # Memory: one fresh process per (case, method); parallel jobs do not disturb resident memory.
    # The matmul floor is a time reference only (it keeps [N, V] logits; its memory means nothing).
    mem_jobs = [(c, m) for c in cases for m, e in c["methods"].items() if e["status"] == "ok" and m != "floor"]

    def mem(item):
        case, m = item
        job = dict(base, kind="memory", task=case["task"], method=m, size=case["size"], reps=args.mem_reps, warmup=1)
        t0 = time.perf_counter()
        res = run_job(job, args.timeout)
        got = res["error"] if "error" in res else f"{res['peak_bytes'] / report.MIB:.1f} MiB"
        _log(f"  memory {case['task']} {Size(**case['size']).key} {m}: {got} ({time.perf_counter() - t0:.0f} s)")
        return case, m, res

    _log(f"measuring peak memory: {len(mem_jobs)} processes")
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for case, m, res in pool.map(mem, mem_jobs):
            entry = case["methods"][m]
            if "error" in res:
                entry.update(status="n/a", reason=res["error"])
            else:
                entry.update(peak_bytes=res["peak_bytes"], peak_bytes_all=res["peak_bytes_all"])
                if "note" in res:
                    entry["note"] = res["note"]

    # Time: one process per case, methods interleaved (sequential: timing needs the cores).
    _log(f"measuring time: {len(cases)} processes")
    for case in cases:
        ms = [m for m, e in case["methods"].items() if e["status"] == "ok"]
        if not ms:
            continue
        job = dict(
            base,
            kind="time",
            task=case["task"],
            methods=ms,
            size=case["size"],
            repeats=args.repeats,
            warmup=1,
            slow_s=args.slow_s,
        )
        t0 = time.perf_counter()
        res = run_job(job, args.timeout)
        _log(f"  time {case['task']} {Size(**case['size']).key}: {time.perf_counter() - t0:.0f} s")
        for m in ms:
            entry = case["methods"][m]
            if "error" in res:
                entry.update(status="n/a", reason=res["error"])
            elif m in res["errors"]:
                entry.update(status="n/a", reason=res["errors"][m])
            else:
                entry.update(time_s=res["time_s"][m], time_s_all=res["time_s_all"][m], warmup_s=res["warmup_s"][m])
    return cases


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, fewer repeats: a smoke run (minutes; its wall time is printed)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=os.path.join("outputs", "benchmarks"), help="folder for json / md / png")
    p.add_argument(
        "--results", action="store_true", help="write to benchmarks/results (the committed figures) instead of --out"
    )
    p.add_argument(
        "--size", action="append", default=None, metavar="N,H,V[,dtype]", help="replace the default sizes (repeatable)"
    )
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)} (quick: ce,kd)")
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per size (default 5; quick 3)")
    p.add_argument("--mem-reps", type=int, default=None, help="memory readings per case (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, all methods")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="memory processes run at once (resident memory is per process, so CPU contention "
        "does not change it; time is always measured one process at a time)",
    )
    p.add_argument(
        "--slow-s", type=float, default=10.0, help="a method whose step takes longer is timed over 3 rounds only"
    )
    p.add_argument("--malloc-arena-max", type=int, default=2, help="MALLOC_ARENA_MAX for every worker")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument(
        "--plan",
        action="store_true",
        help="also print the meta allocation plan at each bf16 / fp16 size (default with --device cuda)",
    )
    p.add_argument(
        "--alignment",
        action="store_true",
        help="also run the alignment benchmark (fused DPO / GRPO vs full logits and Liger), same command",
    )
    args = p.parse_args(argv)
    if args.results:
        args.out = os.path.join(REPO_ROOT, "benchmarks", "results")
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.mem_reps = args.mem_reps or (1 if args.quick else 3)

    if args.size:
        sizes = [parse_size(s, args.device) for s in args.size]
    elif args.device == "cuda":
        sizes = CUDA_QUICK_SIZES if args.quick else CUDA_SIZES
    else:
        sizes = CPU_QUICK_SIZES if args.quick else CPU_SIZES
    tasks = [t for t in (args.tasks or ("ce,kd" if args.quick else ",".join(TASKS))).split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        p.error(f"--tasks: unknown {bad}; known {list(TASKS)}")
    methods = None if args.methods is None else [m for m in args.methods.split(",") if m]
    if args.quick and methods is None:
        # A smoke run: the compiled peers' warm-ups (about a minute each per process on 2 loaded
        # cores) would be most of its time.
        methods = ["floor", "plain", "torch_chunked", "ours", "ours_eager", "ours_recompute"]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")

    t0 = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cases = benchmark(sizes, tasks, methods, args)
    results = {
        "meta": {
            "command": "python -m benchmarks.run "
            + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "device": args.device,
            "device_name": device_name(args.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "malloc_arena_max": args.malloc_arena_max,
            "repeats": args.repeats,
            "mem_reps": args.mem_reps,
            "memory_method": (
                "max_memory_allocated - memory_allocated after inputs, fresh process per case"
                if args.device == "cuda"
                else "VmHWM - VmRSS after inputs (post warm-up, heap trimmed, HWM reset), fresh process "
                f"per case, median of {args.mem_reps}"
            ),
            "time_method": (
                f"median of {args.repeats} interleaved rounds after a warm-up"
                + (", CUDA events" if args.device == "cuda" else ", wall clock")
            ),
            "wall_s": None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": load_start,
        },
        "cases": cases,
    }
    results["targets"] = report.check_targets(cases)
    results["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        results["meta"]["load_average_end"] = list(os.getloadavg())

    os.makedirs(args.out, exist_ok=True)
    md = report.markdown(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    png = report.plot(results, os.path.join(args.out, "memory_vs_tokens.png"))
    print(md)
    print(f"Wrote {args.out}/results.json, results.md, {os.path.basename(png)} ({results['meta']['wall_s']:.0f} s)")
    if args.plan or args.device == "cuda":
        from benchmarks import memory_plan

        plans = [
            memory_plan.table(modes=(None, "fp32"), n=s.n, h=s.h, v=s.v, teacher_h=s.h)
            for s in sizes
            if s.dtype != "fp32"
        ]
        if plans:
            text = "\n".join(plans)
            with open(os.path.join(args.out, "memory_plan.md"), "w") as f:
                f.write(text)
            print(text)
    if args.alignment:
        from benchmarks import alignment

        return alignment.main(
            (["--quick"] if args.quick else []) + ["--json", os.path.join(args.out, "alignment.json")]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
