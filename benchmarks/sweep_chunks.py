"""Sweep the fused losses' chunk size: ``python -m benchmarks.sweep_chunks [--task ce|kd] [--size N,H,V]``.

The evidence behind ``chunk_policy`` in ``tune_losses/chunking.py`` (results: ``benchmarks/results/chunk_policy.md``): for each chunk size
(tokens per chunk; by default those that ``2**20 .. 2**24`` logit elements per chunk give at this V),
the peak memory (fresh process each) and the median time (all chunk sizes and ``plain`` interleaved
in one process), measured as :mod:`benchmarks.run` does.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.report import MIB
from benchmarks.run import parse_size, run_job


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("ce", "kd"), default="ce")
    p.add_argument("--size", default="2048,256,32768", metavar="N,H,V[,dtype]")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--chunks", default=None, help="comma-separated chunk sizes in tokens")
    p.add_argument("--algorithm", choices=("ours", "ours_recompute"), default="ours")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument(
        "--peers", default=None, help="comma-separated reference methods (default: plain; kd adds torchtune)"
    )
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    size = parse_size(args.size, args.device)
    sets = 2 if args.task == "kd" else 1
    if args.chunks:
        chunks = [int(c) for c in args.chunks.split(",")]
    else:
        chunks = sorted({max(1, min((1 << e) // (size.v * sets), size.n)) for e in range(20, 25)})
    peers = (args.peers or ("plain,torchtune" if args.task == "kd" else "plain")).split(",")
    methods = peers + [args.algorithm] + [f"{args.algorithm}@{c}" for c in chunks]
    base = {"threads": args.threads, "malloc_arena_max": 2, "size": size.to_dict(), "task": args.task}

    rows = {m: {} for m in methods}
    if not args.no_memory:
        for m in methods:
            res = run_job(dict(base, kind="memory", method=m, reps=args.mem_reps, warmup=1), 3600)
            rows[m]["peak_mib"] = None if "error" in res else res["peak_bytes"] / MIB
            print(f"memory {m}: {rows[m]['peak_mib']}", file=sys.stderr, flush=True)
    res = run_job(dict(base, kind="time", methods=methods, repeats=args.repeats, warmup=1), 3600)
    if "error" in res:
        print(res["error"], file=sys.stderr)
        return 1
    print(
        f"{args.task.upper()} chunk sweep, {size.key}, threads {args.threads}, "
        f"median of {args.repeats} interleaved rounds"
    )
    print(
        "| method | chunk tokens | fp32 logit MiB per chunk (x sets) | peak MiB | time ms | "
        + " | ".join(f"time vs {p}" for p in peers)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(peers))
    for m in methods:
        t = res["time_s"].get(m)
        rows[m]["time_ms"] = None if t is None else t * 1e3
        c = m.partition("@")[2]
        per_chunk = "" if not c else f"{int(c) * size.v * 4 * sets / MIB:.0f}"
        peak = rows[m].get("peak_mib")
        vs = [res["time_s"].get(p) for p in peers]
        print(
            f"| {m} | {c or ('default' if m.startswith('ours') else '')} | {per_chunk} | "
            f"{'-' if peak is None else f'{peak:.1f}'} | {'-' if t is None else f'{t * 1e3:.0f}'} | "
            + " | ".join("-" if t is None or not v else f"{t / v:.2f}x" for v in vs)
            + " |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"size": size.to_dict(), "task": args.task, "rows": rows, "time_s_all": res["time_s_all"]}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
