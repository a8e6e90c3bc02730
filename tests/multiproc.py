"""The one harness for tests that need several processes (named so as not to shadow the
``multiprocess`` package that Hugging Face ``datasets`` imports).

* :func:`run_ranks`: call a module-level function on N gloo ranks (CPU), each in its own process
  (``torch.multiprocessing`` spawn, process group initialized for it); returns every rank's value.
* :func:`run_command`: run a command line (``tune run ...``, ``torchrun ...``) in a subprocess with the
  test environment (offline, the repository importable).

Both have a timeout; a failure raises ``AssertionError`` carrying the failing rank's traceback (or the
command's output tail), so pytest shows why, not just that, a rank failed.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int = 1, **extra: str) -> Dict[str, str]:
    """The environment of a child process: offline, the repository first on the import path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(
        os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra
    )


def _rank_main(
    rank: int, world: int, port: int, fn: Callable, args: tuple, pg_timeout_s: Optional[float], results
) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        if pg_timeout_s is not None:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=pg_timeout_s)
            )
        value = fn(rank, world, *args)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: B036 - every failure goes back to the parent, with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world: int = 2,
    *args: Any,
    timeout: float = 180,
    pg_timeout_s: float = 120,
    init_process_group: bool = True,
) -> List[Any]:
    """``[fn(rank, world, *args) for rank in range(world)]``, each on its own gloo rank.

    The process group is initialized for ``fn`` (gloo, ``pg_timeout_s``) unless
    ``init_process_group=False``: then ``fn`` joins it itself (``env://``: MASTER_ADDR / MASTER_PORT /
    RANK / WORLD_SIZE are set).
    ``fn`` must be importable by name (module level in a test module). Its return value must pickle.
    Raises AssertionError with the first failing rank's traceback, or on timeout naming the ranks
    that had not finished.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world, port, fn, args, pg_timeout_s if init_process_group else None, results),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    done: Dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(done) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world)) - set(done))
                raise AssertionError(
                    f"{fn.__name__}: ranks {missing} did not finish within {timeout:.0f} s" + _failures(done)
                )
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
                done[rank] = (status, value)
                if status == "error":
                    break  # the others may be waiting on it in a collective
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(
                        f"{fn.__name__}: rank {dead[0]} died (exit code {procs[dead[0]].exitcode})" + _failures(done)
                    ) from None
        failed = _failures(done)
        if failed:
            raise AssertionError(f"{fn.__name__} failed:" + failed)
        return [done[r][1] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


def _failures(done: Dict[int, tuple]) -> str:
    return "".join(f"\n--- rank {r} ---\n{value}" for r, (status, value) in sorted(done.items()) if status == "error")


def run_command(
    cmd: Sequence[str],
    *,
    timeout: float = 600,
    env: Optional[Dict[str, str]] = None,
    cwd: Path = ROOT,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (with :func:`child_env` unless ``env`` is given); with ``check``, a non-zero exit is an
    AssertionError showing the command and the tail of its output."""
    proc = subprocess.run(
        list(cmd), cwd=cwd, env=env if env is not None else child_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit code {proc.returncode}: {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
        )
    return proc


def torchrun(script: Path, nproc: int, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc script args`` on a free local port."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        str(script),
        *args,
    ]
    return run_command(cmd, timeout=timeout, **kw)
