"""The Triton chunk kernels compile for a CUDA target (sm_90) without a GPU: Triton's compiler and
ptxas run in a subprocess with ``TRITON_INTERPRET`` unset (this process's Triton may be the
interpreter). Catches compiled-mode errors that the interpreted tests cannot see, and a register spill
at the launches' warp counts (the cubins' resource usage)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


def _cuda_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this Triton build
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _cuda_backend(), reason="Triton without its NVIDIA backend")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, do not reuse a cached binary
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, str(HERE / "triton_compile_check.py"), "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
