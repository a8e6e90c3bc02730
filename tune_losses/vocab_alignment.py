"""Distillation between a student and a teacher whose vocabularies differ in size.

Families pad their embedding tables differently (Qwen2.5 0.5B-3B have 151936 rows, 7B and larger
152064): the first ``V_s`` rows are the shared tokens, the teacher's extra rows are padding that no
real token uses. A teacher vocabulary of another size is an error unless ``teacher_vocab`` says
how to compare the two distributions (default None: a mismatch is more often a teacher with another
tokenizer, whose rows mean other tokens, than a padded table of the same one):

* ``"drop"``: the teacher's extra rows are left out; its softmax is taken over the shared
  ``V_s`` entries only (renormalized). The fused losses never compute those rows' logits.
* ``"pad_student"``: the teacher keeps its full softmax over ``V_t`` entries and the student's
  logits are padded with zeros to ``V_t`` (Liger-Kernel's convention): the student gives each padding
  entry the logit 0, a constant with no gradient, so the divergence also pulls the student's mass
  towards or away from those entries as the teacher's.

A teacher vocabulary smaller than the student's is an error: there is no row to compare the
student's extra entries with.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

TEACHER_VOCAB_MODES = ("drop", "pad_student")


def check_teacher_vocab(
    student_vocab: int, teacher_vocab: int, name: str = "teacher_weight", mode: Optional[str] = None
) -> None:
    """Raise if the teacher's vocabulary is smaller than the student's, or of another size while
    ``mode`` (the ``teacher_vocab`` option) is None."""
    if teacher_vocab < student_vocab:
        raise ValueError(
            f"{name}: expected a vocabulary of at least the student's {student_vocab} entries (extra teacher "
            f"rows are padding), got {teacher_vocab}. A smaller teacher vocabulary cannot be aligned: pad the "
            f"teacher's output projection to {student_vocab} rows, or distil into a student whose output "
            f"projection has the teacher's {teacher_vocab} rows."
        )
    if teacher_vocab != student_vocab and mode is None:
        raise ValueError(
            f"{name}: the teacher's vocabulary has {teacher_vocab} entries, the student's {student_vocab}. "
            f"If the teacher's extra rows are padding of the same tokenizer, set teacher_vocab='drop' (leave "
            f"them out) or 'pad_student' (pad the student's logits with zeros); a teacher with another "
            f"tokenizer cannot be distilled token by token."
        )


def align_logits(zs: torch.Tensor, zt: torch.Tensor, mode: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``[n, V_s]``, ``[n, V_t]`` made the same width ``[n, V']``.

    ``"drop"`` narrows the teacher to ``V_s`` columns (a view); ``"pad_student"`` appends
    ``V_t - V_s`` zero columns to the student (a new buffer). Equal widths are returned as they are;
    other widths with ``mode`` None are an error (:func:`check_teacher_vocab`).
    """
    vs, vt = zs.shape[-1], zt.shape[-1]
    if vs == vt:
        return zs, zt
    check_teacher_vocab(vs, vt, "teacher_logits", mode)
    if mode == "drop":
        return zs, zt[..., :vs]
    return torch.nn.functional.pad(zs, (0, vt - vs)), zt


def student_columns(g: Optional[torch.Tensor], student_vocab: int) -> Optional[torch.Tensor]:
    """A gradient with respect to aligned student logits, cut back to the student's ``V_s`` columns."""
    return g if g is None or g.shape[-1] == student_vocab else g[..., :student_vocab]
