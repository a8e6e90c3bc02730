"""Peak memory of a loss region (forward + backward), measured inside a training run.

On CUDA: the caching allocator's peak. Elsewhere: a dispatch mode that follows every tensor storage
created inside the region and records the peak of the bytes alive at once; frees are noticed at the
next operator, which is when they happen in eager PyTorch. Tensors made before the region (inputs,
weights) do not count; outputs that alias an input (in-place ops, views) are not new memory.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tune_losses.chunking import split_tokens
from tune_losses.heads import configure_model_for_loss, output_projection, set_output_mode


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
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
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


def loss_peak_memory(
    model: torch.nn.Module,
    loss,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    *,
    teacher: Optional[torch.nn.Module] = None,
    kd_loss=None,
) -> int:
    """Peak bytes of the loss alone (output projection + loss, forward and backward) on one batch.

    ``loss`` / ``kd_loss`` are :class:`tune_losses.training.protocol.TrainingLoss`; the model (and
    teacher) are in the output modes the losses asked for, and are left so. tokens ``[B, S]``,
    labels ``[B, S]`` (shifted).
    """
    n = getattr(model, "num_output_chunks", 0)
    with torch.no_grad():
        set_output_mode(model, "hidden")
        hidden = model(tokens)
        t_hidden = None
        if teacher is not None:
            set_output_mode(teacher, "hidden")
            t_hidden = teacher(tokens)
    mode = configure_model_for_loss(model, loss.loss)
    if teacher is not None:
        if kd_loss is None:
            loss.loss.set_teacher_output(teacher)
        else:
            configure_model_for_loss(teacher, loss.loss)
    proj = output_projection(model)
    t_proj = output_projection(teacher) if teacher is not None else None

    def project(p, h):
        if mode == "hidden":
            return h
        if mode == "chunks":
            return [p(c) for c in split_tokens(h, n)]
        return p(h).float()

    def region():
        h = hidden.detach().requires_grad_(True)
        args = [project(proj, h)]
        if t_hidden is not None:
            with torch.no_grad():
                args.append(project(t_proj, t_hidden))
        if kd_loss is None:
            total = loss(*args, labels=labels).total
        else:
            total = loss(args[0], labels=labels).total + kd_loss(*args, labels=labels).total
        total.backward()

    peak = peak_memory_of(region, device)
    for p in model.parameters():
        p.grad = None
    return peak
