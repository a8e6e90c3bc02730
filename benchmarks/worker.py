"""One measurement, run in a fresh process: ``python -m benchmarks.worker '<json job>'``.

Two kinds of job (the JSON's ``"kind"``):

* ``memory``: one (task, method, size). Peak memory of one forward + backward above the memory held
  once inputs and weights exist. CPU: resident memory. After a warm-up (which compiles
  ``torch.compile`` and lets libraries allocate their one-time state), the gradients are dropped,
  freed heap pages are handed back to the OS (``malloc_trim``), the baseline VmRSS is read, the
  high-water mark VmHWM is reset (``/proc/self/clear_refs``) and one step runs; peak = VmHWM - baseline.
  Repeated ``reps`` times in the process; the median is reported. CUDA: ``max_memory_allocated``
  minus ``memory_allocated`` at the same point.
* ``time``: one (task, size), all its methods in one process, interleaved: after a warm-up of each,
  ``repeats`` rounds time one step of every method (the order rotating each round), so background
  load on a shared machine hits all methods alike; a method whose steps take over ``slow_s``
  seconds stops after 3 rounds. Median per method; CUDA events on CUDA.

The result is the last stdout line, ``RESULT <json>``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import sys
import time
import traceback
import warnings

import torch

from benchmarks.cases import Size, build, clear_grads, make_inputs, step

_LIBC = None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS, so a later step's pages count again (glibc only)."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:160]


def measure_memory(task: str, method: str, size: Size, reps: int, warmup: int) -> dict:
    inputs = make_inputs(task, size)
    loss_fn = build(task, method)
    for _ in range(warmup):
        step(loss_fn, inputs)
        clear_grads(inputs)
    _sync(size.device)
    peaks, note = [], None
    for _ in range(reps):
        clear_grads(inputs)
        gc.collect()
        if size.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(loss_fn, inputs)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            _trim_heap()
            base = _status_kib("VmRSS")
            if not _reset_hwm():
                note = "VmHWM not resettable: peak includes the warm-up"
            step(loss_fn, inputs)
            peaks.append((_status_kib("VmHWM") - base) * 1024)
    out = {"peak_bytes": statistics.median(peaks), "peak_bytes_all": peaks}
    if note:
        out["note"] = note
    return out


def measure_time(task: str, methods: list, size: Size, repeats: int, warmup: int, slow_s: float = 10.0) -> dict:
    inputs = make_inputs(task, size)
    fns, errors, warm_s = {}, {}, {}
    for m in methods:
        try:
            fn = build(task, m)
            t0 = time.perf_counter()
            for _ in range(warmup):
                step(fn, inputs)
                clear_grads(inputs)
            _sync(size.device)
            warm_s[m] = time.perf_counter() - t0
            fns[m] = fn
        except Exception as exc:  # a peer that fails here is reported, not fatal
            errors[m] = _short(exc)
            clear_grads(inputs)
    times = {m: [] for m in fns}
    order = list(fns)
    for r in range(repeats):
        k = r % max(len(order), 1)
        for m in order[k:] + order[:k]:
            if len(times[m]) >= 3 and statistics.median(times[m]) > slow_s:
                continue  # a step over slow_s (torch's chunked CE at V = 128k: ~50 s): 3 rounds are enough
            clear_grads(inputs)
            if size.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                step(fns[m], inputs)
                end.record()
                torch.cuda.synchronize()
                times[m].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step(fns[m], inputs)
                times[m].append(time.perf_counter() - t0)
    return {
        "time_s": {m: statistics.median(t) for m, t in times.items()},
        "time_s_all": times,
        "warmup_s": warm_s,
        "errors": errors,
    }


def main(argv=None) -> int:
    job = json.loads((argv or sys.argv[1:])[0])
    torch.set_num_threads(job["threads"])
    warnings.simplefilter("ignore")
    size = Size(**job["size"])
    try:
        if job["kind"] == "memory":
            result = measure_memory(job["task"], job["method"], size, job["reps"], job["warmup"])
        else:
            result = measure_time(
                job["task"], job["methods"], size, job["repeats"], job["warmup"], job.get("slow_s", 10.0)
            )
    except Exception as exc:
        traceback.print_exc()
        result = {"error": _short(exc)}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
