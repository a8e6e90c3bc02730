"""The allocation plan of a fused call on ``meta`` tensors: ``python -m benchmarks.memory_plan``.

A ``meta`` tensor has a shape and a dtype but no memory, and takes the non-CPU code path of the
engine (as CUDA does: no CPU-only branch, no compiler). Running one fused call forward + backward on
meta inputs under :class:`LiveBytes` (a ``TorchDispatchMode`` that adds up the bytes of every
storage created inside it and subtracts them when the storage dies) gives the peak of live bytes
the call allocates, at any shape, in seconds and on any machine. The inputs and weights are made
before the mode starts, so they are not counted; the gradients (``hidden.grad``, ``weight.grad``)
are, since the call creates them. The floor is those gradients alone: dX + dW in the input dtype.

The table (``--out``, default stdout) lists CE and distillation (CE + forward KL) at the GPU
benchmark's shape for each ``dw_accumulation`` mode.
"""

from __future__ import annotations

import argparse
import weakref
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 1 << 20


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created under it while they are alive; ``peak`` is the most at once.

    A storage is counted once however many views of it the ops return, and not at all when an op
    returns it from its inputs (a view of a tensor made before the mode); its bytes leave the count
    when the storage itself is freed (torch keeps one Python object per live storage, so a weak
    reference to it follows the storage, not the view).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: Dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view (or an in-place / out= result) of a tensor made before the mode shares its
        # storage: not an allocation of the call.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._seen and key not in inputs:
                    self._seen[key] = st.nbytes()
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._release, key)
        return out


def plan(
    task: str,
    n: int = 8192,
    h: int = 4096,
    v: int = 128256,
    teacher_h: int = 8192,
    dtype: torch.dtype = torch.bfloat16,
    dw_accumulation: Optional[str] = None,
) -> dict:
    """Peak live bytes of one fused call (``task`` ``"ce"`` or ``"distill"``), forward + backward on meta.

    Returns:
        ``{"peak": bytes, "floor": bytes (dX + dW in ``dtype``), "ratio": peak / floor}``.
    """
    from tune_losses.fused.functional import linear_cross_entropy, linear_distillation_loss
    from tune_losses.options import CEOptions, DistillationOptions, ExecutionOptions, KDOptions

    meta = torch.device("meta")
    x = torch.empty(n, h, dtype=dtype, device=meta, requires_grad=True)
    w = torch.empty(v, h, dtype=dtype, device=meta, requires_grad=True)
    labels = torch.empty(n, dtype=torch.long, device=meta)
    execution = ExecutionOptions(dw_accumulation="auto" if dw_accumulation is None else dw_accumulation)
    if task == "distill":
        tx = torch.empty(n, teacher_h, dtype=dtype, device=meta)
        tw = torch.empty(v, teacher_h, dtype=dtype, device=meta)
    mode = LiveBytes()
    with mode:
        if task == "ce":
            loss = linear_cross_entropy(x, w, labels, options=CEOptions(validate=False), execution=execution)
        elif task == "distill":
            options = DistillationOptions(kd=KDOptions(validate=False))
            loss = linear_distillation_loss(x, w, tx, tw, labels, options=options, execution=execution).loss
        else:
            raise ValueError(f"task: expected 'ce' or 'distill', got {task!r}")
        loss.backward()
    floor = (n * h + v * h) * dtype.itemsize
    return {"peak": mode.peak, "floor": floor, "ratio": mode.peak / floor}


def table(modes=(None, "fp32", "chunk", "blocked"), **shape) -> str:
    """A markdown table of :func:`plan` for CE and distillation at ``shape`` for each mode."""
    n, h, v = shape.get("n", 8192), shape.get("h", 4096), shape.get("v", 128256)
    th = shape.get("teacher_h", 8192)
    lines = [
        f"Allocation plan on meta tensors (the non-CPU path): N={n} H={h} V={v} bf16, teacher H={th}; "
        "peak live bytes of one call, forward + backward, against the gradients' floor (dX + dW in bf16).",
        "",
        "| loss | dw_accumulation | peak MiB | floor MiB | peak / floor |",
        "|---|---|---|---|---|",
    ]
    for task in ("ce", "distill"):
        for mode in modes:
            r = plan(task, dw_accumulation=mode, **shape)
            name = "default (auto)" if mode is None else mode
            label = "CE" if task == "ce" else "0.5 CE + 0.5 forward KL"
            lines.append(f"| {label} | {name} | {r['peak'] / MIB:.0f} | {r['floor'] / MIB:.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8192,4096,128256", help="N,H,V (default: the GPU benchmark's)")
    p.add_argument("--teacher-hidden", type=int, default=8192)
    p.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    args = p.parse_args(argv)
    n, h, v = (int(s) for s in args.size.split(","))
    text = table(n=n, h=h, v=v, teacher_h=args.teacher_hidden)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
