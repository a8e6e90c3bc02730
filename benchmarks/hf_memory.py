"""Peak memory of one training step of a Transformers causal LM: stock loss, ``patch()``, TRL's fused head.

``python -m benchmarks.hf_memory [--mode stock|patched|trl] [--vocab 128256] [--hidden 256] [--tokens 1024]
[--batch 2] [--reps 3]``. Each mode runs in a fresh process (the parent starts one per mode); the result is
the last stdout line, ``RESULT <json>``.

Method (CPU, as :mod:`benchmarks.worker`): a tiny Llama (2 layers, untied head, fp32) is built from its
config; after a warm-up step, gradients are dropped, freed heap pages returned to the OS, the baseline
VmRSS read and the high-water mark VmHWM reset; one forward + backward runs; peak = VmHWM - baseline
(so it counts the step's activations, logits or chunks, and the new gradients). Median of ``reps``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]

MODES = ("stock", "patched", "trl")


def _model(vocab: int, hidden: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float().train()


def measure(mode: str, vocab: int, hidden: int, tokens: int, batch: int, reps: int) -> dict:
    import torch

    from benchmarks.worker import _reset_hwm, _status_kib, _trim_heap

    model = _model(vocab, hidden)
    if mode == "patched":
        from tune_losses.integrations.transformers import patch

        patch(model)
        extra = {}
    elif mode == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer installs
        extra = {"fused_lm_head": True}
    else:
        extra = {}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)

    def step():
        out = model(input_ids=ids, labels=ids, **extra)
        out.loss.backward()
        return out.loss.item()

    step()  # warm-up: one-time allocations of libraries and threads
    peaks, loss = [], None
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        _trim_heap()
        base = _status_kib("VmRSS") * 1024
        if not _reset_hwm():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs)")
        loss = step()
        peaks.append(_status_kib("VmHWM") * 1024 - base)
    return {
        "mode": mode,
        "peak_bytes": statistics.median(peaks),
        "peaks": peaks,
        "loss": loss,
        "vocab": vocab,
        "hidden": hidden,
        "tokens": batch * tokens,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
    }


def run_fresh(mode: str, timeout: float = 900, **size) -> dict:
    """:func:`measure` in a fresh Python process."""
    args = [sys.executable, "-m", "benchmarks.hf_memory", "--child", "--mode", mode]
    for k, v in size.items():
        args += [f"--{k}", str(v)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"hf_memory {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, action="append")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    size = dict(vocab=a.vocab, hidden=a.hidden, tokens=a.tokens, batch=a.batch, reps=a.reps)
    if a.child:
        print("RESULT " + json.dumps(measure(a.mode[0], **size)), flush=True)
        return 0
    results = {m: run_fresh(m, **size) for m in (a.mode or MODES)}
    stock = results.get("stock", {}).get("peak_bytes")
    print(
        f"one training step, tiny Llama (2 layers, H={a.hidden}), V={a.vocab}, {a.batch} x {a.tokens} tokens, "
        f"fp32, CPU; peak above weights and inputs (median of {a.reps})"
    )
    for m, r in results.items():
        ratio = f"  ({r['peak_bytes'] / stock:.3f}x stock)" if stock else ""
        print(f"  {m:8s} {r['peak_bytes'] / 2**30:7.3f} GiB{ratio}  loss {r['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
