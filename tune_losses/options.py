"""Non-tensor options of every loss, in one place, checked when they are made.

Functional entry points, modules and recipes all build one of these frozen dataclasses and hand it
down, so the math never takes a long positional argument list and an option means the same thing
everywhere. The ``check_*`` helpers below are the one set of scalar checks every public entry
point uses: each error names the argument, what was expected and what came.

Conventions: a float option must be a finite real number (``nan`` / ``inf`` are rejected, ``True``
is not a number here); an int option must be a Python ``int`` that is not a ``bool``; a flag must be
a ``bool``. A wrong type raises :class:`ArgumentTypeError` (a ``TypeError`` that is also a
``ValueError``, so callers catching either see it); a value out of range raises ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence, Tuple, Type, Union

import torch

from tune_losses.vocab_alignment import TEACHER_VOCAB_MODES

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

REDUCTIONS = ("mean", "sum", "none")

IGNORE_INDEX = -100
"""The label that marks a token to skip unless a caller passes its own (torch's and Transformers' default)."""


def divergence_choices() -> Tuple[str, ...]:
    """The registered divergences (:mod:`tune_losses.divergences`: one class per file registers itself)."""
    from tune_losses.divergences import divergence_names  # the registry sits above options in the layers

    return divergence_names()


def __getattr__(name: str):
    # DIVERGENCES is read from the registry when asked, so a divergence added by its own file is in it.
    if name == "DIVERGENCES":
        return divergence_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (or a tensor of the wrong dtype).

    A ``TypeError`` by Python's convention, and a ``ValueError`` too, because every bad argument
    of this package raised ``ValueError`` before the two were told apart and callers may catch that.
    """


def _type_name(value) -> str:
    return type(value).__name__


def check_int_option(name: str, value, minimum: Optional[int] = None, *, allow_none: bool = False) -> None:
    """``value`` must be an ``int`` (not a ``bool``), ``>= minimum`` when given, or None if allowed.

    A ``torch.SymInt`` (a size under ``torch.compile`` with dynamic shapes) counts as an int.
    """
    if value is None and allow_none:
        return
    expected = "an int" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if allow_none else "")
    if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {value!r} ({_type_name(value)})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_float_option(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    allow_none: bool = False,
) -> None:
    """``value`` must be a finite real number (int or float, not a ``bool``) in the given range.

    Args:
        low, high: inclusive bounds (``low`` exclusive when ``low_open``); None for no bound.
        allow_none: accept None (an option that is off).
    """
    if value is None and allow_none:
        return
    if low is not None and high is not None:
        rng = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        rng = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rng = f" <= {high:g}"
    else:
        rng = ""
    expected = f"a finite float{rng}" + (" or None" if allow_none else "")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {value!r} ({_type_name(value)})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and v > high
    if too_low or too_high:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_bool_option(name: str, value) -> None:
    """``value`` must be ``True`` or ``False`` (not 0 / 1, not a string)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name}: expected True or False, got {value!r} ({_type_name(value)})")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    """``value`` must be one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


@dataclass(frozen=True)
class CEOptions:
    """Options of token-level cross-entropy.

    Attributes:
        ignore_index: label value that marks a token to skip (torch's default -100).
        label_smoothing: eps in ``(1 - eps) * CE + eps * (lse - mean(z))``, in [0, 1].
        z_loss: c in the auxiliary ``c * lse^2`` (PaLM's z-loss), >= 0.
        softcap: s in ``z = s * tanh(z / s)`` applied to logits first (Gemma 2), > 0, or None.
        validate: check label range on the host once per call (one device sync); turn off for speed.
    """

    ignore_index: int = IGNORE_INDEX
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    validate: bool = True

    def __post_init__(self):
        check_int_option("ignore_index", self.ignore_index)
        check_float_option("label_smoothing", self.label_smoothing, 0.0, 1.0)
        check_float_option("z_loss", self.z_loss, 0.0)
        check_float_option("softcap", self.softcap, 0.0, low_open=True, allow_none=True)
        check_bool_option("validate", self.validate)


@dataclass(frozen=True)
class KDOptions:
    """Options of a distillation divergence between teacher p and student q, per token.

    Attributes:
        divergence: a registered divergence (:func:`tune_losses.divergences.divergence_names`): built
            in ``forward_kl`` (KL(p||q)), ``reverse_kl`` (KL(q||p)), ``symmetric_kl``
            (``r * FKL + (1 - r) * RKL``), ``jsd`` (generalized JSD(beta)), ``tvd``.
        temperature: T > 0, finite; both sides' logits are divided by T.
        scale_by_temperature_squared: multiply the loss by T^2 (Hinton et al.), so gradient
            magnitudes do not shrink as T grows.
        beta: JSD's mixture weight: ``beta KL(p||m) + (1 - beta) KL(q||m)``, ``m = beta p + (1 - beta) q``.
            beta = 0 and beta = 1 are taken as the limits used by TRL and Liger: forward KL and
            reverse KL (the unscaled formula is identically 0 there).
        sym_kd_ratio: r of ``symmetric_kl``, in [0, 1] (torchtune's name).
        true_kl: for the forward-KL term: True gives ``sum p (log p - log q)``; False gives
            torchtune 0.6.1's logged value ``-sum p log q`` (KL plus the teacher's entropy).
            Both have the same gradient with respect to the student.
        ignore_index: label value of tokens left out of the loss.
        validate: check once per call (one device sync) that every label is in ``[0, V)`` or
            ``ignore_index``, though the divergence reads only the ignore mask: a label of -1
            meant as "ignore" under ``ignore_index=-100`` would otherwise count silently.
        teacher_vocab: a teacher vocabulary larger than the student's (padding rows): None (default)
            makes any size mismatch an error naming both sizes; ``"drop"`` leaves the teacher's extra entries out of its softmax, ``"pad_student"``
            keeps them and pads the student's logits with zeros (:mod:`tune_losses.vocab_alignment`).
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    scale_by_temperature_squared: bool = True
    beta: float = 0.5
    sym_kd_ratio: float = 0.5
    true_kl: bool = True
    ignore_index: int = IGNORE_INDEX
    validate: bool = True
    teacher_vocab: Optional[str] = None

    def __post_init__(self):
        check_choice("divergence", self.divergence, divergence_choices())
        if self.teacher_vocab is not None:
            check_choice("teacher_vocab", self.teacher_vocab, TEACHER_VOCAB_MODES)
        check_float_option("temperature", self.temperature, 0.0, low_open=True)
        check_bool_option("scale_by_temperature_squared", self.scale_by_temperature_squared)
        check_float_option("beta", self.beta, 0.0, 1.0)
        check_float_option("sym_kd_ratio", self.sym_kd_ratio, 0.0, 1.0)
        check_bool_option("true_kl", self.true_kl)
        check_int_option("ignore_index", self.ignore_index)
        check_bool_option("validate", self.validate)

    @property
    def loss_scale(self) -> float:
        """Factor applied to the divergence: T^2 when enabled, else 1."""
        return self.temperature**2 if self.scale_by_temperature_squared else 1.0


ALGORITHMS = ("auto", "grad_in_forward", "recompute")
"""How a fused loss computes its gradients (:mod:`tune_losses.fused.engine`)."""

DW_ACCUMULATIONS = ("auto", "fp32", "blocked", "chunk")
"""How dW is summed over chunks (:mod:`tune_losses.fused.dw_accumulation`)."""


@dataclass(frozen=True)
class VocabParallelOptions:
    """Where the output weight's vocabulary rows live (one object instead of four arguments).

    Attributes:
        process_group: vocabulary parallelism with a local shard: the weight (and bias) hold this
            rank's consecutive rows of the ``[V, H]`` projection, ranks in group order; hidden states
            and labels are the same on every rank of the group.
        vocab_parallel: for a DTensor weight: None (auto: ``Shard(0)`` on a mesh dimension named
            ``tp`` / ``tensor`` is vocabulary-parallel, any other DTensor is gathered once per call),
            True (required), False (never).
        vocab_start, vocab_size: with ``process_group``: this shard's first row and the global V
            (one all-gather of the shard sizes finds them when not both given).
    """

    process_group: Optional[ProcessGroup] = None
    vocab_parallel: Optional[bool] = None
    vocab_start: Optional[int] = None
    vocab_size: Optional[int] = None

    def __post_init__(self):
        if self.vocab_parallel is not None and not isinstance(self.vocab_parallel, bool):
            raise ArgumentTypeError(
                f"vocab_parallel: expected None, True or False, got {self.vocab_parallel!r} "
                f"({_type_name(self.vocab_parallel)})"
            )
        check_int_option("vocab_start", self.vocab_start, 0, allow_none=True)
        check_int_option("vocab_size", self.vocab_size, 1, allow_none=True)


@dataclass(frozen=True)
class ExecutionOptions:
    """How a fused call runs; the values and gradients are the same either way.

    Attributes:
        algorithm: ``"auto"`` / ``"grad_in_forward"`` (gradients made in forward, logits made once;
            sum and mean reductions) or ``"recompute"`` (backward recomputes each chunk: any
            ``grad_output``, several backward passes).
        drop_ignored_tokens: leave the rows of ignored tokens out before the chunk loop: no logits
            and no matmul work for them, at one host sync per call to find the rows.
        dw_accumulation: ``"auto"`` (default), ``"fp32"``, ``"blocked"`` or ``"chunk"``: how the
            weight gradient is summed over chunks (precision against memory; see
            :mod:`tune_losses.fused.dw_accumulation`).
    """

    algorithm: str = "auto"
    drop_ignored_tokens: bool = False
    dw_accumulation: str = "auto"

    def __post_init__(self):
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_bool_option("drop_ignored_tokens", self.drop_ignored_tokens)
        check_choice("dw_accumulation", self.dw_accumulation, DW_ACCUMULATIONS)


TAILS = ("renormalize", "bucket")
"""How a sparse teacher's left-out mass is treated (:mod:`tune_losses.sparse_teacher`)."""


@dataclass(frozen=True)
class SparseKDOptions:
    """Options of the forward KL against a cached sparse teacher (k log-probabilities per token).

    Attributes:
        temperature: T > 0: the student's logits are divided by T (the cached log-probabilities are
            already at T) and the loss is multiplied by T^2.
        tail: ``"renormalize"`` (the teacher's entries renormalized to sum 1) or ``"bucket"`` (the
            teacher's left-out mass against the student's mass outside the ids); see
            :mod:`tune_losses.sparse_teacher`.
        ignore_index: label value of tokens left out of the loss.
        validate: check once per call (one device sync) the labels' range, the cached ids' range and
            distinctness, and that no used log-probability is positive.
    """

    temperature: float = 1.0
    tail: str = "renormalize"
    ignore_index: int = IGNORE_INDEX
    validate: bool = True

    def __post_init__(self):
        check_float_option("temperature", self.temperature, 0.0, low_open=True)
        check_choice("tail", self.tail, TAILS)
        check_int_option("ignore_index", self.ignore_index)
        check_bool_option("validate", self.validate)


class _Mix:
    """``(1 - kd_ratio) * CE + kd_ratio * KD``: the checks and the flat form shared by
    :class:`DistillationOptions` (a dense teacher) and :class:`SparseDistillationOptions` (a cached
    one), which differ only in the distillation term's options (``KD_TYPE``)."""

    KD_TYPE: ClassVar[Union[Type[KDOptions], Type[SparseKDOptions]]]
    kd_ratio: float
    kd: Union[KDOptions, SparseKDOptions]
    ce: Optional[CEOptions]

    def __post_init__(self):
        check_float_option("kd_ratio", self.kd_ratio, 0.0, 1.0)
        if not isinstance(self.kd, self.KD_TYPE):
            raise ArgumentTypeError(f"kd: expected a {self.KD_TYPE.__name__}, got {_type_name(self.kd)}")
        if self.ce is None:  # the distillation term's ignore_index and validate, no smoothing
            object.__setattr__(self, "ce", CEOptions(ignore_index=self.kd.ignore_index, validate=self.kd.validate))
        elif not isinstance(self.ce, CEOptions):
            raise ArgumentTypeError(f"ce: expected a CEOptions, got {_type_name(self.ce)}")
        elif self.ce.ignore_index != self.kd.ignore_index:
            raise ValueError(
                f"ce.ignore_index: expected {self.kd.ignore_index} (as kd.ignore_index), got {self.ce.ignore_index}"
            )

    @classmethod
    def from_flat(cls, kd_ratio: float = 0.5, label_smoothing: float = 0.0, **kd_fields):
        """The object from the flat keywords of before the options objects: ``kd_ratio``,
        ``label_smoothing`` and ``KD_TYPE``'s fields; the cross-entropy shares the distillation
        term's ``ignore_index`` and ``validate``."""
        kd = cls.KD_TYPE(**kd_fields)
        return cls(kd_ratio, kd, CEOptions(kd.ignore_index, label_smoothing, validate=kd.validate))  # type: ignore[call-arg]

    @classmethod
    def form(cls) -> str:
        """How the object is written, for a deprecation message."""
        return f"{cls.__name__}(kd_ratio=..., kd={cls.KD_TYPE.__name__}(...), ce=CEOptions(...))"


@dataclass(frozen=True)
class DistillationOptions(_Mix):
    """``(1 - kd_ratio) * CE + kd_ratio * KD``: the mix and each term's options.

    Attributes:
        kd_ratio: weight of the distillation term, in [0, 1].
        kd: the divergence's options (its ``ignore_index`` and ``validate`` hold for the call).
        ce: the cross-entropy's options; its ``ignore_index`` must be the divergence's.
    """

    KD_TYPE: ClassVar[Type[KDOptions]] = KDOptions
    kd_ratio: float = 0.5
    kd: KDOptions = field(default_factory=KDOptions)
    ce: Optional[CEOptions] = None


@dataclass(frozen=True)
class SparseDistillationOptions(_Mix):
    """``(1 - kd_ratio) * CE + kd_ratio * sparse KD`` against a cached teacher.

    Attributes:
        kd_ratio: weight of the distillation term, in [0, 1].
        kd: the sparse term's :class:`SparseKDOptions` (its ``ignore_index`` and ``validate`` hold
            for the call).
        ce: the cross-entropy's options (label smoothing, ...); its ``ignore_index`` must be kd's.
            None: kd's ``ignore_index`` and ``validate``, no smoothing.
    """

    KD_TYPE: ClassVar[Type[SparseKDOptions]] = SparseKDOptions
    kd_ratio: float = 0.5
    kd: SparseKDOptions = field(default_factory=SparseKDOptions)
    ce: Optional[CEOptions] = None


def check_reduction(reduction: str) -> str:
    check_choice("reduction", reduction, REDUCTIONS)
    return reduction
