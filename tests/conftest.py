"""Shared fixtures: the tiny offline assets, built once per test session (seconds)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tests run the eager per-chunk math (the same code, no compiler warm-up per process);
# tests/test_compiled_math.py turns the compiled path on for its own small cases.
os.environ.setdefault("TUNE_LOSSES_COMPILE", "0")
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (tests/test_kernels_triton.py);
# Triton reads this when it is first imported, so it is set before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_assets():
    """Build (or reuse) assets/tiny in the repository; configs refer to it by relative path."""
    from tune_losses.tiny import build

    build(ROOT / "assets" / "tiny")
    os.chdir(ROOT)
    return ROOT / "assets" / "tiny"


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: intra-op threads only add barrier waits, which cost seconds per test when the
    CPU cores are shared with other jobs. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
