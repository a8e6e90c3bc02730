"""Peak memory of a loss region (forward + backward), measured inside a training run.

On CUDA: the caching allocator's peak. Elsewhere: a dispatch mode that follows every tensor storage
created inside the region and records the peak of the bytes alive at once; frees are noticed at the
next operator, which is when they happen in eager PyTorch. Tensors made before the region (inputs,
weights) do not count; outputs that alias an input (in-place ops, views) are not new memory.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: Dict[int, tuple] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _purge(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def peak_memory_of(fn: Callable[[], object], device: torch.device) -> int:
    """Run ``fn()`` (forward and backward of a loss) and return the peak bytes it added."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracker = _StorageTracker()
    with tracker:
        fn()
    return tracker.peak_bytes
