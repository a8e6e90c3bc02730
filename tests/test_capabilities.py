"""Capabilities are decided by a probe or the torch version, never by catching a real call's error:
an out-of-memory error always propagates (compiled chunk math, dW accumulation), a compiler failure
turns compilation off (said once)."""

from __future__ import annotations

import pytest
import torch

import tune_losses as tl
from tune_losses.fused import capabilities, compiled, engine


def _kd_call():
    g = torch.Generator().manual_seed(0)
    h, th = torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)
    w, tw = torch.randn(20, 8, generator=g).requires_grad_(), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (9,), generator=g)
    return lambda: tl.linear_kd_loss(h, w, th, tw, labels, chunk_size=4)


def _raising(exc):
    def fn(*args, **kwargs):
        raise exc

    return fn


def test_out_of_memory_in_compiled_chunk_math_propagates(monkeypatch):
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
    monkeypatch.setattr(compiled, "_BROKEN", [])
    monkeypatch.setattr(engine, "compiled_math", lambda *a: _raising(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        _kd_call()()
    assert compiled._BROKEN == []  # compilation stays on: the next call may fit


def test_compiler_error_wrapping_out_of_memory_propagates(monkeypatch):
    monkeypatch.setattr(compiled, "_BROKEN", [])
    err = torch._dynamo.exc.TorchRuntimeError("compiled graph failed")
    err.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError):
        compiled.run_compiled(_raising(err), torch.zeros(2, 3), None, None, None, [])
    assert compiled._BROKEN == []


def test_other_errors_propagate_and_keep_compilation_on(monkeypatch):
    monkeypatch.setattr(compiled, "_BROKEN", [])
    with pytest.raises(ValueError, match="not a compiler error"):
        compiled.run_compiled(_raising(ValueError("not a compiler error")), torch.zeros(2, 3), None, None, None, [])
    assert compiled._BROKEN == []


def test_compiler_failure_falls_back_to_eager_once(monkeypatch):
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
    monkeypatch.setattr(compiled, "_BROKEN", [])
    eager = _kd_call()()
    monkeypatch.setattr(
        engine, "compiled_math", lambda *a: _raising(torch._dynamo.exc.TorchRuntimeError("no compiler"))
    )
    with pytest.warns(UserWarning, match="runs eagerly"):
        got = _kd_call()()
    torch.testing.assert_close(got, eager)
    assert compiled._BROKEN and "TorchRuntimeError" in compiled._BROKEN[0]


def test_mixed_dtype_addmm_is_probed_once_and_oom_propagates(monkeypatch):
    monkeypatch.setattr(capabilities, "_MIXED_ADDMM", {})
    supported = capabilities.mixed_addmm_supported(torch.device("cpu"), torch.bfloat16)
    assert isinstance(supported, bool) and capabilities._MIXED_ADDMM == {("cpu", torch.bfloat16): supported}
    # A real call's error is never taken as "unsupported": an OOM there propagates.
    monkeypatch.setitem(capabilities._MIXED_ADDMM, ("cpu", torch.bfloat16), True)
    monkeypatch.setattr(capabilities.torch, "addmm", _raising(torch.OutOfMemoryError("CUDA out of memory")))
    acc, a = torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):
        engine._addmm_fp32(acc, a, a)
    assert capabilities._MIXED_ADDMM[("cpu", torch.bfloat16)] is True


def test_mixed_dtype_addmm_probe_on_meta_tensors(monkeypatch):
    """The meta allocation plan follows the CUDA path: the probe's operation runs on meta tensors,
    and with no value to read, that it runs is the answer (no, where torch has no ``out_dtype``: 2.7)."""
    monkeypatch.setattr(capabilities, "_MIXED_ADDMM", {})
    has_out_dtype = "dtype_out" in torch.ops.aten.addmm.overloads()
    assert capabilities.mixed_addmm_supported(torch.device("meta"), torch.bfloat16) is has_out_dtype


# A user's torch.compile of model + loss (no graph break, the label check on device):
# tests/test_fused.py::test_torch_compile*.
