"""Cases shared by the fused-loss tests (test_fused, test_engine, test_dw_accumulation,
test_custom_divergence and the vocabulary-parallel worker), so that each checks the same matrix."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from reference import object_form
from torch.utils._python_dispatch import TorchDispatchMode

from tune_losses import linear_cross_entropy, linear_distillation_loss

# Every built-in divergence with the parameter values whose math differs: JSD's beta inside (0.5,
# and 0.2, asymmetric) and at both ends (0 and 1: one side of the mixture vanishes, no NaN allowed).
DIVERGENCE_CASES: List[Tuple[str, Dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"sym_kd_ratio": 0.3}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
]


def case_id(divergence: str, extra: dict) -> str:
    """``jsd-beta0.5``: the divergence, then each option and its value."""
    return divergence + "".join(f"-{k}{v}" for k, v in extra.items())


DIVERGENCE_IDS = [case_id(d, extra) for d, extra in DIVERGENCE_CASES]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward, in-place outputs too)."""

    def __init__(self):
        super().__init__()
        self.largest, self.largest_op, self.ops = 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.largest_op = t.numel(), func
        return out


def largest_during(fn: Callable, leaves: Sequence[torch.Tensor]) -> tuple:
    """(elements, op): the largest tensor any op makes while ``fn(*leaves)`` runs forward and backward
    (``ones`` as the gradient of a per-token output)."""
    mode = LargestTensor()
    with mode:
        loss = fn(*leaves)
        fwd_ops = mode.ops
        loss.backward(torch.ones_like(loss) if loss.dim() else None)
    assert mode.ops > fwd_ops, "the dispatch mode must also see the backward pass"
    return mode.largest, mode.largest_op


# The losses the memory probes run: cross-entropy plain, with every option, per token; distillation
# with a divergence (``distill-<name>``).
MEMORY_FAMILIES = ("ce", "ce-options", "ce-none", "distill-forward_kl", "distill-jsd", "distill-tvd")


def memory_probe_loss(family: str, labels, teacher_hidden, teacher_weight, chunk_size: int, **flat) -> Callable:
    """``fn(hidden, weight, bias)``: the fused loss of one of ``MEMORY_FAMILIES`` in chunks of
    ``chunk_size`` tokens; ``flat``: further options (placement, execution), as ``object_form`` takes them."""

    def fn(hh, ww, bb):
        if family.startswith("ce"):
            kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0) if family == "ce-options" else {}
            reduction = "none" if family == "ce-none" else "mean"
            return linear_cross_entropy(
                hh, ww, labels, bias=bb, chunk_size=chunk_size, reduction=reduction, **object_form("ce", **kw, **flat)
            )
        divergence = family.split("-", 1)[1]
        return linear_distillation_loss(
            hh, ww, teacher_hidden, teacher_weight, labels, student_bias=bb, chunk_size=chunk_size,
            **object_form("distillation", divergence=divergence, **flat),
        ).loss  # fmt: skip

    return fn


def tiny_llama2(vocab: int, seed: int = 0):
    """A torchtune llama2 of 2 layers (width 32, 4 heads over 2 KV heads) with a ``vocab``-row output,
    seeded: the FSDP2 and tensor-parallel tests' model."""
    from torchtune.models.llama2 import llama2

    torch.manual_seed(seed)
    return llama2(
        vocab_size=vocab, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=64
    )
