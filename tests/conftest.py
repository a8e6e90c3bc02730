"""Shared fixtures: the tiny offline assets, built once per test session (seconds)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Most tests run the eager per-chunk math (the same code, no compiler warm-up per shape); the core
# value and gradient cases run both ways through the `chunk_math` fixture below (the compiled math
# is what users get by default), reusing a few shapes so that each term set compiles once.
os.environ.setdefault("TUNE_LOSSES_COMPILE", "0")
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (tests/test_kernels_triton.py);
# Triton reads this when it is first imported, so it is set before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def set_chunk_math(monkeypatch):
    """A function ``set_chunk_math("eager" | "compiled")``: the per-chunk math eager
    (``TUNE_LOSSES_COMPILE=0``) or compiled (``=1``, even cross-entropy alone on CPU). A compiled run
    must really compile: a fallback to eager fails the test at teardown."""
    from tune_losses.fused import compiled

    monkeypatch.setattr(compiled, "_BROKEN", [])

    def set_mode(mode: str) -> None:
        monkeypatch.setenv("TUNE_LOSSES_COMPILE", {"eager": "0", "compiled": "1"}[mode])

    yield set_mode
    assert not compiled._BROKEN, f"compiled chunk math fell back to eager: {compiled._BROKEN}"


@pytest.fixture(params=["eager", "compiled"])
def chunk_math(request, set_chunk_math):
    """Run a test with the per-chunk math eager and compiled (see ``set_chunk_math``)."""
    set_chunk_math(request.param)
    return request.param


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


@pytest.fixture
def option_checks(monkeypatch):
    """A Counter of the scalar checks (``tune_losses.options``' ``check_*`` helpers) that the options
    objects and the fused functions make, by argument name; ``clear()`` it just before the call to
    count. (The chunk loop's utilities check the internal sizes they are given, outside this count.)"""
    import collections
    import importlib

    seen: collections.Counter = collections.Counter()
    options = importlib.import_module("tune_losses.options")
    layers = (
        "tune_losses.options",
        "tune_losses.fused.functional",
        "tune_losses.fused.sparse",
        "tune_losses.sparse_teacher",
    )
    for name in ("check_int_option", "check_float_option", "check_bool_option", "check_choice"):
        real = getattr(options, name)

        def spy(arg, *args, _real=real, **kwargs):
            seen.update([arg])
            return _real(arg, *args, **kwargs)

        for module in map(importlib.import_module, layers):
            if getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, spy)
    return seen
