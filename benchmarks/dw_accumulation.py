"""dW's precision per ``dw_accumulation`` mode: ``python -m benchmarks.dw_accumulation``.

Fused cross-entropy, bf16 inputs, on CPU: dW's relative error (Frobenius norm) against an fp64
full-logits reference, divided by eager bf16 PyTorch's own error (``F.cross_entropy(F.linear(x, w))``
in bf16, the same inputs), for each mode at several chunk counts. Writes a markdown table
(``--out``, default ``benchmarks/results/dw_accumulation.md``).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from tune_losses.fused.functional import linear_cross_entropy
from tune_losses.options import CEOptions, ExecutionOptions

MODES = ("fp32", "chunk", "blocked")


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def measure(n: int, h: int, v: int, chunks, seed: int = 0) -> dict:
    """``{"eager": error, (mode, chunks): error}`` for bf16 inputs of shape N, H, V."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).bfloat16()
    w = (torch.randn(v, h, generator=g) / h**0.5).bfloat16()
    labels = torch.randint(0, v, (n,), generator=g)
    w64 = w.double().requires_grad_()
    F.cross_entropy(F.linear(x.double(), w64), labels).backward()
    ref = w64.grad
    del w64
    wl = w.clone().requires_grad_()
    F.cross_entropy(F.linear(x, wl), labels).backward()
    out = {"eager": rel_error(wl.grad, ref)}
    for mode in MODES:
        for c in chunks:
            wl = w.clone().requires_grad_()
            linear_cross_entropy(
                x,
                wl,
                labels,
                chunk_size=n // c,
                options=CEOptions(validate=False),
                execution=ExecutionOptions(dw_accumulation=mode),
            ).backward()
            out[(mode, c)] = rel_error(wl.grad, ref)
    return out


def table(n: int, h: int, v: int, chunks, result: dict) -> str:
    eager = result["eager"]
    lines = [
        f"dW's relative error against fp64 over eager bf16 PyTorch's ({eager:.3e}): fused cross-entropy, "
        f"bf16 inputs, CPU, N={n} H={h} V={v} (`python -m benchmarks.dw_accumulation`, "
        f"{platform.machine()}, torch {torch.__version__}).",
        "",
        "| dw_accumulation | " + " | ".join(f"{c} chunks" for c in chunks) + " |",
        "|---|" + "---|" * len(chunks),
    ]
    for mode in MODES:
        cells = " | ".join(f"{result[(mode, c)] / eager:.2f}x" for c in chunks)
        lines.append(f"| {mode} | {cells} |")
    lines += [
        "",
        "`auto` (the default) is `fp32` on CPU and for fp32 inputs, `blocked` for bf16 / fp16 inputs",
        "on other devices (CUDA) when every term has a column-local gradient.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8192,256,8192", help="N,H,V")
    p.add_argument("--chunks", default="8,16,64,256", help="comma-separated chunk counts")
    p.add_argument("--out", default="benchmarks/results/dw_accumulation.md")
    args = p.parse_args(argv)
    n, h, v = (int(s) for s in args.size.split(","))
    chunks = [int(c) for c in args.chunks.split(",")]
    t0 = time.time()
    text = table(n, h, v, chunks, measure(n, h, v, chunks))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
