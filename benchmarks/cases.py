"""What is measured: sizes, inputs and one loss function per (task, method).

Tasks: ``ce`` (linear + cross-entropy), ``kd`` (linear + forward KL to a teacher's projection),
``distill`` (``0.5 CE + 0.5 forward KL``, one call) and ``distill_jsd`` (``0.5 CE + 0.5 JSD(beta=0.5)``):
``sparse_kd`` (forward KL to a teacher cached as its top-``SPARSE_K`` ids and log-probabilities,
renormalized: no teacher model, set against the dense fused KD that needs the teacher's hidden states
and projection); the two distillation tasks are the settings of Liger-Kernel's ``LigerFusedLinearJSDLoss``
(``weight_hard_loss = weight_soft_loss = 0.5``, temperature 1, both terms over the valid tokens; its
``beta=0`` is forward KL(teacher || student), as ours). ``floor`` is the matmuls alone at the same
shapes (3 for CE, 4 with a teacher: logits, teacher logits, dX, dW), the time no fused loss can beat.
Every method gets the same inputs, hidden ``[1, N, H]`` (batch 1, N tokens, so torchtune's
``[B, S]`` API applies), weight ``[V, H]``, labels ``[1, N]``; the timed step is forward plus the
backward that fills the student's ``hidden.grad`` and ``weight.grad``. The teacher (KD) has no
gradient.

Kept free of measuring code so that :mod:`benchmarks.worker` (one process per case) and the tests
can import it cheaply; peers' packages are imported only when their method is built.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

PROMPT_SHARE = 0.6  # ce_prompt: instruction tuning, where the prompt is often more than half of the tokens
TASKS = ("ce", "kd", "distill", "distill_jsd", "ce_prompt", "sparse_kd")
SPARSE_K = 64  # sparse_kd: cached teacher entries per token
TASK_TITLES = {
    "ce": "linear + cross-entropy",
    "kd": "linear + forward KL (distillation)",
    "distill": "0.5 CE + 0.5 forward KL",
    "distill_jsd": "0.5 CE + 0.5 JSD(beta=0.5)",
    "ce_prompt": f"linear + cross-entropy, first {PROMPT_SHARE:.0%} of the tokens ignored (prompt)",
    "sparse_kd": f"linear + forward KL to a cached top-{SPARSE_K} teacher (no teacher model)",
}
METHODS = {
    # ours_compiled: the chunk math compiled even where "auto" keeps it eager (CE alone on CPU);
    # ours_fp32: dw_accumulation="fp32" (the fp32 [V, H] accumulator; the default is "blocked" for bf16 on CUDA)
    "ce": (
        "floor",
        "plain",
        "compile",
        "torchtune",
        "torch_chunked",
        "liger",
        "cce",
        "ours",
        "ours_eager",
        "ours_compiled",
        "ours_recompute",
        "ours_fp32",
    ),
    "kd": ("floor", "plain", "compile", "torchtune", "liger", "ours", "ours_eager", "ours_recompute"),
    "distill": ("floor", "plain", "compile", "liger", "ours", "ours_eager", "ours_fp32"),
    "distill_jsd": ("floor", "plain", "compile", "liger", "ours", "ours_eager", "ours_fp32"),
    # ours_drop: drop_ignored_tokens=True, the ignored rows left out before the chunk loop
    "ce_prompt": ("floor", "plain", "compile", "ours", "ours_drop"),
    # dense_kd: our fused dense forward KL (linear_kd_loss) from the teacher's hidden states and
    # projection, what the cache replaces; ours_bucket: the sparse loss with tail="bucket"; ours:
    # "auto", which keeps the sparse math eager (tune_losses.sparse_teacher.SparseKDTerm)
    "sparse_kd": ("floor", "plain", "compile", "dense_kd", "ours", "ours_compiled", "ours_bucket"),
}
TEACHER_TASKS = ("kd", "distill", "distill_jsd", "sparse_kd")
JSD_BETA = {"distill": 0.0, "distill_jsd": 0.5}  # Liger's beta: 0 is forward KL
TORCHTUNE_CHUNKS = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Size:
    """One problem size: tokens ``n``, hidden ``h``, vocabulary ``v``, dtype name, device type."""

    n: int
    h: int
    v: int
    dtype: str = "fp32"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} {self.dtype} {self.device}"

    def floor_bytes(self) -> Dict[str, int]:
        """The unavoidable bytes of a fused fwd+bwd: the gradients dX ``[N, H]`` and dW ``[V, H]`` in
        the input dtype, and one fp32 log-sum-exp per token."""
        es = torch.finfo(self.torch_dtype).bits // 8
        parts = {"dX": self.n * self.h * es, "dW": self.v * self.h * es, "lse": self.n * 4}
        parts["total"] = sum(parts.values())
        return parts

    def to_dict(self) -> dict:
        return asdict(self)


# The target size of the checks (CPU fp32) and the default sets.
TARGET = Size(2048, 256, 32768)
CPU_SIZES = [
    Size(1024, 256, 32768),
    TARGET,
    Size(4096, 256, 32768),
    Size(1024, 512, 128256),  # Llama 3 vocabulary
    Size(512, 256, 32768, "bf16"),  # CPU has no native bf16: small only
]
CPU_QUICK_SIZES = [Size(512, 64, 16384)]
CUDA_SIZES = [
    Size(4096, 4096, 128256, "bf16", "cuda"),
    Size(8192, 4096, 128256, "bf16", "cuda"),
    Size(16384, 4096, 128256, "bf16", "cuda"),
    Size(8192, 4096, 128256, "fp32", "cuda"),
]
CUDA_QUICK_SIZES = [Size(2048, 1024, 32768, "bf16", "cuda"), Size(4096, 1024, 32768, "bf16", "cuda")]


def make_inputs(task: str, size: Size, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs with logits of unit scale (``x ~ N(0, 1)``, ``w ~ N(0, 1/H)``); all labels valid, except
    the prompt share of ``ce_prompt``."""
    g = torch.Generator().manual_seed(seed)
    dt, dev = size.torch_dtype, size.device

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dt)

    out = {
        "hidden": rand(1, size.n, size.h).requires_grad_(True),
        "weight": rand(size.v, size.h, scale=size.h**-0.5).requires_grad_(True),
        "labels": torch.randint(0, size.v, (1, size.n), generator=g).to(dev),
    }
    if task == "ce_prompt":
        out["labels"][:, : int(size.n * PROMPT_SHARE)] = -100
    if task in TEACHER_TASKS:
        out["t_hidden"] = rand(1, size.n, size.h)
        out["t_weight"] = rand(size.v, size.h, scale=size.h**-0.5)
    if task == "sparse_kd":
        out["teacher_ids"], out["teacher_logprobs"] = _teacher_top_k(out["t_hidden"], out["t_weight"], SPARSE_K)
    return out


def _teacher_top_k(t_hidden: torch.Tensor, t_weight: torch.Tensor, k: int, rows: int = 256):
    """The teacher's top-k ids ``[1, N, k]`` and fp32 log-probabilities, a few rows of logits at a
    time (no ``[N, V]`` tensor before the memory baseline is read)."""
    ids, lps = [], []
    for x in t_hidden.flatten(0, 1).split(rows):
        lp, i = F.log_softmax(F.linear(x, t_weight).float(), dim=-1).topk(k, dim=-1)
        ids.append(i)
        lps.append(lp)
    return torch.cat(ids).unsqueeze(0), torch.cat(lps).unsqueeze(0)


def unavailable(task: str, method: str, size: Size) -> Optional[str]:
    """Why ``method`` cannot run here (shown as ``n/a (reason)``), or None."""
    if method not in METHODS[task]:
        return "not implemented for this loss"
    if method == "ours_fp32" and (size.device == "cpu" or size.dtype == "fp32"):
        return "the same as ours here (dw_accumulation 'auto' is 'fp32' on CPU and for fp32 inputs)"
    if method == "liger" and task in JSD_BETA:  # Liger's chunked losses: pure PyTorch, any device
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel not installed (pip install liger-kernel)"
    elif method in ("liger", "cce"):
        module = "liger_kernel" if method == "liger" else "cut_cross_entropy"
        if size.device != "cuda" or importlib.util.find_spec("triton") is None:
            return "needs CUDA + Triton"
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    if size.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


# ---- the loss functions: (inputs) -> scalar loss ---------------------------------------------


def _plain_ce(hidden, weight, labels):
    logits = F.linear(hidden, weight)  # [1, N, V] in the input dtype, as eager PyTorch
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _plain_kd(hidden, weight, t_hidden, t_weight, labels):
    log_q = F.log_softmax(F.linear(hidden, weight), dim=-1)
    log_p = F.log_softmax(F.linear(t_hidden, t_weight), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    mask = labels != -100
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _plain_sparse_kd(hidden, weight, labels, teacher_ids, teacher_logprobs):
    """Full logits: the student's log_softmax over V gathered at the cached ids (renormalize)."""
    log_q = F.log_softmax(F.linear(hidden, weight).float(), dim=-1).gather(-1, teacher_ids)
    p = teacher_logprobs.softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1)
    mask = labels != -100
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _plain_distill(hidden, weight, t_hidden, t_weight, labels, beta: float = 0.0):
    z = F.linear(hidden, weight).flatten(0, 1)
    with torch.no_grad():
        zt = F.linear(t_hidden, t_weight).flatten(0, 1)
    y = labels.flatten()
    ce = F.cross_entropy(z, y)
    log_q, log_p = F.log_softmax(z, dim=-1), F.log_softmax(zt, dim=-1)
    if beta == 0.0:
        kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
        kd = (
            beta * F.kl_div(log_m, log_p, log_target=True, reduction="none")
            + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none")
        ).sum(-1)
    mask = y != -100
    return 0.5 * ce + 0.5 * (kd * mask).sum() / mask.sum().clamp(min=1)


class _MatmulFloor(torch.autograd.Function):
    """The matmuls of a fused loss alone: logits (and the teacher's) forward, dX and dW backward."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight):
        x = hidden.flatten(0, 1)
        z = x @ weight.t()
        if t_hidden is not None:
            t_hidden.flatten(0, 1) @ t_weight.t()
        ctx.save_for_backward(x, weight, z)
        return z.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        x, weight, z = ctx.saved_tensors
        return (z @ weight).view(1, *x.shape), z.t() @ x, None, None


def _floor(hidden, weight, labels, t_hidden=None, t_weight=None):
    return _MatmulFloor.apply(hidden, weight, t_hidden, t_weight)


def build(task: str, method: str) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """The loss of ``method`` as a function of :func:`make_inputs`' dict."""
    plain = {
        "ce": _plain_ce,
        "ce_prompt": _plain_ce,
        "kd": _plain_kd,
        "distill": _plain_distill,
        "distill_jsd": lambda *a, **k: _plain_distill(*a, **k, beta=JSD_BETA["distill_jsd"]),
        "sparse_kd": _plain_sparse_kd,
    }
    if method == "floor":
        fn = _floor
    elif method == "plain":
        fn = plain[task]
    elif method == "compile":
        fn = torch.compile(plain[task])
    elif method == "torchtune":
        from torchtune.modules import loss as tt

        if task == "ce":
            loss_fn = tt.CEWithChunkedOutputLoss(num_output_chunks=TORCHTUNE_CHUNKS)

            def fn(hidden, weight, labels):
                return loss_fn([F.linear(c, weight) for c in hidden.chunk(TORCHTUNE_CHUNKS, dim=1)], labels)
        else:
            loss_fn = tt.ForwardKLWithChunkedOutputLoss(num_output_chunks=TORCHTUNE_CHUNKS)

            def fn(hidden, weight, t_hidden, t_weight, labels):
                with torch.no_grad():
                    teacher = [F.linear(c, t_weight) for c in t_hidden.chunk(TORCHTUNE_CHUNKS, dim=1)]
                student = [F.linear(c, weight) for c in hidden.chunk(TORCHTUNE_CHUNKS, dim=1)]
                return loss_fn(student, teacher, labels)
    elif method == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def fn(hidden, weight, labels):
            return F.linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), options=options)
    elif method == "liger" and task in JSD_BETA:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.5, weight_soft_loss=0.5, beta=JSD_BETA[task], temperature=1.0
        )

        def fn(hidden, weight, t_hidden, t_weight, labels):
            return loss_fn(hidden.flatten(0, 1), weight, t_hidden.flatten(0, 1), t_weight, labels.flatten())
    elif method == "liger":
        if task == "ce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss_fn = LigerFusedLinearCrossEntropyLoss()

            def fn(hidden, weight, labels):
                return loss_fn(weight, hidden.flatten(0, 1), labels.flatten())
        else:
            from liger_kernel.transformers import LigerFusedLinearJSD

            loss_fn = LigerFusedLinearJSD(jsd_beta=0.0)  # beta = 0: forward KL(teacher || student)

            def fn(hidden, weight, t_hidden, t_weight, labels):
                return loss_fn(hidden.flatten(0, 1), weight, t_hidden.flatten(0, 1), t_weight, labels.flatten())
    elif method == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        def fn(hidden, weight, labels):
            return cce(hidden.flatten(0, 1), weight, labels.flatten())
    elif method == "dense_kd":
        import tune_losses

        def fn(hidden, weight, t_hidden, t_weight, labels):
            return tune_losses.linear_kd_loss(hidden, weight, t_hidden, t_weight, labels)
    elif method.partition("@")[0].startswith("ours"):
        import os

        import tune_losses

        # "ours@128": an explicit chunk size (tokens), for benchmarks.sweep_chunks. "ours_eager": the
        # per-chunk math without torch.compile (the environment switch is read at every call).
        name, _, chunk = method.partition("@")
        execution = tune_losses.ExecutionOptions(
            algorithm="recompute" if name == "ours_recompute" else "auto",
            drop_ignored_tokens=name == "ours_drop",
            dw_accumulation="fp32" if name == "ours_fp32" else "auto",
        )
        kw = {"execution": execution, "chunk_size": int(chunk) if chunk else None}
        kd = tune_losses.KDOptions({"distill_jsd": "jsd"}.get(task, "forward_kl"), beta=0.5)

        def call(hidden, weight, labels, t_hidden=None, t_weight=None, teacher_ids=None, teacher_logprobs=None):
            if task == "sparse_kd":
                sparse = tune_losses.SparseKDOptions(tail="bucket" if name == "ours_bucket" else "renormalize")
                return tune_losses.linear_sparse_kd_loss(
                    hidden, weight, labels, teacher_ids, teacher_logprobs, options=sparse, **kw
                )
            if task in ("ce", "ce_prompt"):
                return tune_losses.linear_cross_entropy(hidden, weight, labels, **kw)
            if task == "kd":
                return tune_losses.linear_kd_loss(hidden, weight, t_hidden, t_weight, labels, options=kd, **kw)
            options = tune_losses.DistillationOptions(kd_ratio=0.5, kd=kd)
            return tune_losses.linear_distillation_loss(
                hidden, weight, t_hidden, t_weight, labels, options=options, **kw
            ).loss

        def fn(**inputs):
            before = os.environ.get("TUNE_LOSSES_COMPILE")
            os.environ["TUNE_LOSSES_COMPILE"] = {"ours_eager": "0", "ours_compiled": "1"}.get(name, before or "auto")
            try:
                return call(**inputs)
            finally:
                if before is None:
                    del os.environ["TUNE_LOSSES_COMPILE"]
                else:
                    os.environ["TUNE_LOSSES_COMPILE"] = before
    else:
        raise ValueError(f"unknown method {method!r} (known: {sorted(set(METHODS['ce']) | set(METHODS['kd']))})")
    if task == "sparse_kd":
        # Each method takes its own teacher: the cache (ours, plain) or the model's side (dense_kd).
        cached = method not in ("floor", "dense_kd")
        drop = ("t_hidden", "t_weight") if cached else ("teacher_ids", "teacher_logprobs")
        if method == "floor":
            drop = drop + ("t_hidden", "t_weight")  # the sparse loss's matmuls: no teacher's
        return lambda inputs: fn(**{k: v for k, v in inputs.items() if k not in drop})
    return lambda inputs: fn(**inputs)


def step(loss_fn, inputs: Dict[str, torch.Tensor]) -> None:
    """One measured step: forward, then backward into ``hidden.grad`` and ``weight.grad``."""
    loss_fn(inputs).backward()


def clear_grads(inputs: Dict[str, torch.Tensor]) -> None:
    for t in inputs.values():
        t.grad = None


def method_list(task: str) -> List[str]:
    return list(METHODS[task])
