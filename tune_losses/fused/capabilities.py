"""What this torch and device can do, decided once per process by a probe (or the torch version),
never by catching the error of a real call: that error could be an out-of-memory error, which must
propagate, and a process-wide switch taken on it would be wrong for the rest of the run."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

_MIXED_ADDMM: Dict[Tuple[str, torch.dtype], bool] = {}


def mixed_addmm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm`` writes an fp32 result of ``dtype`` inputs on this device type
    (``out_dtype``; CUDA in recent torch). Decided once per (device type, dtype) by a probe on 1 x 1
    tensors, never by catching the error of a real call (which could be an out-of-memory error).

    On ``meta`` tensors (the allocation plan, which stands for the CUDA path) the probe has no value to
    read: that the operation runs is the answer.
    """
    key = (device.type, dtype)
    if key not in _MIXED_ADDMM:
        a = torch.ones(1, 1, dtype=dtype, device=device)
        acc = torch.zeros(1, 1, dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            # one host read, once per process
            _MIXED_ADDMM[key] = device.type == "meta" or bool(acc.item() == 1.0)
        except (TypeError, RuntimeError, NotImplementedError):  # the probe's own error: no such kernel here
            _MIXED_ADDMM[key] = False
    return _MIXED_ADDMM[key]


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for low-precision ``a``, ``b`` and an fp32 ``acc`` on CUDA: where the matmul can
    write fp32 straight into ``acc`` (cuBLAS, beta = 1), the chunk's product is neither rounded to the
    input dtype nor held as a ``[V, H]`` temporary; elsewhere a low-precision product is added."""
    if mixed_addmm_supported(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)
