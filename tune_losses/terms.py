"""Loss terms: one per-token quantity of a chunk of logits each.

The fused chunk loop (:mod:`tune_losses.fused.engine`) makes a chunk's student logits once (and the
teacher's once), hands them to every term of the loss, sums the terms' weighted logit gradients and
turns that sum into dX, dW, db. The chunked-output classes (:mod:`tune_losses.chunked_output`) run
the same terms on logit chunks they are given. A term knows its name, its weight in the loss, whether
it needs the teacher, the names of its per-token outputs (the first is the one the loss sums), and
how to compute them with their gradient (:mod:`tune_losses.divergences`).

Adding a loss is one class here: a frozen dataclass with ``name``, ``outputs``, ``needs_teacher``
and :meth:`Term.compute`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from tune_losses.divergences import ChunkRun, VocabReducer, ce_chunk, kd_chunk, log_prob_chunk
from tune_losses.options import CEOptions, KDOptions
from tune_losses.vocab_alignment import align_logits, student_columns

Weights = Optional[Sequence[Optional[torch.Tensor]]]


@dataclass
class Chunk:
    """What every term of one token chunk reads.

    Attributes:
        student: ``[n, V_r]`` student logits in the compute dtype (fp32, or fp64 for fp64 inputs).
        teacher: ``[n, V_r]`` teacher logits (no gradient), or None when no term needs them.
        labels: ``[n]`` class ids; valid: ``[n]`` bool mask of counted tokens.
        reducer: reductions over the vocabulary (identity on one process).
        inputs: per-token side inputs of this chunk's rows by name (``[n, ...]`` each, no gradient),
            e.g. a cached teacher's ids and log-probabilities or a policy loss's advantages; empty
            when the call has none. Rows of padding (compiled chunks) hold zeros.
        student_rows: per-token statistics of the raw student logits shared between terms:
            ``(max [n], sum exp(z - max) [n])`` over the whole vocabulary, set by the first term
            that computes them (cross-entropy) and read by later ones (a divergence at T = 1), so
            that a distillation loss normalizes the student's logits once.
    """

    student: torch.Tensor
    teacher: Optional[torch.Tensor]
    labels: torch.Tensor
    valid: torch.Tensor
    reducer: VocabReducer
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    student_rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def student_run(self, weights: Optional[Sequence[Optional[torch.Tensor]]], consume: bool) -> ChunkRun:
        """How a term's per-chunk function runs over the student logits: this chunk's reducer and
        shared row statistics, the term's first gradient weight ``[n]`` (None: the value only) and
        whether the logits may be overwritten."""
        return ChunkRun(self.reducer, None if weights is None else weights[0], consume, self.student_rows)


class Term:
    """Base of every loss term (see the module docstring).

    Attributes:
        name: the term's part name in results (``"ce"``, ``"kd"``, ...).
        weight: the term's factor in the summed loss.
        needs_teacher: whether :meth:`compute` reads ``chunk.teacher``.
        compilable: whether :meth:`compute` may run inside the compiled chunk math.
    """

    name: str = "term"
    weight: float = 1.0
    needs_teacher: bool = False
    # False for a term whose chunk math cannot run inside the compiled chunk function (e.g. one that
    # differentiates a formula with autograd over per-sequence values): the chunk then runs eagerly.
    compilable = True

    @property
    def outputs(self) -> Tuple[str, ...]:
        """Names of the per-token outputs; the first is the term's loss."""
        return (self.name,)

    def compute(
        self, chunk: Chunk, weights: Weights, consume_student: bool, consume_teacher: bool
    ) -> Tuple[Sequence[torch.Tensor], Optional[torch.Tensor]]:
        """Per-token outputs ``[n]`` (0 at ignored tokens) and the gradient ``[n, V_r]`` of
        ``sum_o weights[o] * output_o`` with respect to the student logits.

        Args:
            weights: one ``[n]`` tensor (0 at ignored tokens) or None per output; None altogether
                for values only (then no gradient is built).
            consume_student, consume_teacher: whether the logits buffers may be overwritten.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class CrossEntropyTerm(Term):
    """Token cross-entropy against the labels (label smoothing, z-loss, softcap: :class:`CEOptions`)."""

    opts: CEOptions = CEOptions()
    weight: float = 1.0
    name: str = "ce"

    def compute(self, chunk, weights, consume_student, consume_teacher):
        loss, g = ce_chunk(
            chunk.student, chunk.labels, chunk.valid, self.opts, chunk.student_run(weights, consume_student)
        )
        return (loss,), g


@dataclass(frozen=True)
class DivergenceTerm(Term):
    """A distillation divergence between teacher and student (:class:`KDOptions`)."""

    opts: KDOptions = KDOptions()
    weight: float = 1.0
    name: str = "kd"
    needs_teacher: bool = True

    def compute(self, chunk, weights, consume_student, consume_teacher):
        # A wider teacher (padding rows) is aligned to the student here, once for every path.
        zs, zt = align_logits(chunk.student, chunk.teacher, self.opts.teacher_vocab)
        weight = None if weights is None else weights[0]
        own = zs is chunk.student  # a padded student is a buffer of its own, with other row statistics
        run = ChunkRun(chunk.reducer, weight, consume_student or not own, chunk.student_rows if own else None)
        value, g = kd_chunk(zs, zt, self.opts, run, ChunkRun(chunk.reducer, consume=consume_teacher))
        return (torch.where(chunk.valid, value, 0.0),), student_columns(g, chunk.student.shape[-1])

    def teacher_gradients(self, chunk: Chunk, weight: torch.Tensor, teacher_weight: torch.Tensor):
        """``(grad w.r.t. the student logits, grad w.r.t. the teacher's)`` for a teacher that
        requires grad (chunked-output losses); buffers are not overwritten."""
        teacher = chunk.teacher
        assert teacher is not None  # needs_teacher: every chunk of this term has the teacher's logits
        zs, zt = align_logits(chunk.student, teacher, self.opts.teacher_vocab)
        _, g, gt = kd_chunk(zs, zt, self.opts, ChunkRun(chunk.reducer, weight), ChunkRun(chunk.reducer, teacher_weight))
        if gt.shape[-1] != teacher.shape[-1]:  # dropped teacher columns get no gradient
            gt = torch.nn.functional.pad(gt, (0, teacher.shape[-1] - gt.shape[-1]))
        return student_columns(g, chunk.student.shape[-1]), gt


@dataclass(frozen=True)
class LogProbTerm(Term):
    """The label's log-probability ``log softmax(z / T)[y]``, with the entropy as a second output.

    Both outputs are differentiable (on the recompute path, each with its own ``grad_output``).
    As a loss term its value is the log-probability itself (a reward, not a loss: give it a
    negative weight to minimize ``-log q[y]``).
    """

    temperature: float = 1.0
    entropy: bool = False
    weight: float = 1.0
    name: str = "log_probs"

    @property
    def outputs(self) -> Tuple[str, ...]:
        return (self.name, "entropy") if self.entropy else (self.name,)

    def compute(self, chunk, weights, consume_student, consume_teacher):
        w = None if weights is None else (weights[0], weights[1] if self.entropy else None)
        return log_prob_chunk(
            chunk.student, chunk.labels, chunk.valid, self.temperature, chunk.reducer, self.entropy, w, consume_student
        )


@dataclass(frozen=True)
class TokenStatsTerm(Term):
    """Values only, for training logs (TRL's ``entropy`` and ``mean_token_accuracy``): the entropy of
    ``softmax(z)`` (``z`` softcapped first when ``softcap``) and whether ``argmax z`` is the label.

    Outputs ``("entropy", "correct")`` per token (``correct`` 1.0 / 0.0), 0 at ignored tokens; no
    gradient. The entropy is :func:`~tune_losses.divergences.log_prob_chunk`'s; the argmax needs the
    whole vocabulary on this process.
    """

    softcap: Optional[float] = None
    weight: float = 0.0
    name: str = "entropy"
    compilable = False  # logging only: not worth a compilation per shape

    @property
    def outputs(self) -> Tuple[str, ...]:
        return ("entropy", "correct")

    def compute(self, chunk, weights, consume_student, consume_teacher):
        if weights is not None and any(w is not None for w in weights):
            raise NotImplementedError("TokenStatsTerm: values only, no gradient")
        if chunk.reducer.distributed:
            raise NotImplementedError("TokenStatsTerm: the argmax needs the whole vocabulary on this process")
        z = chunk.student
        if self.softcap is not None:
            s = self.softcap
            z = (z if consume_student else z.clone()).div_(s).tanh_().mul_(s)
            consume_student = True
        correct = (z.argmax(-1) == chunk.labels) & chunk.valid
        (_, entropy), _ = log_prob_chunk(
            z, chunk.labels, chunk.valid, 1.0, chunk.reducer, entropy=True, consume=consume_student
        )
        return (entropy, correct.to(entropy.dtype)), None
