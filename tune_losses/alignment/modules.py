"""``nn.Module`` wrappers of the fused alignment losses, for recipes and YAML ``_component_``s.

Like the fused CE / distillation modules: ``set_model_output(model)`` takes the policy's output
projection and switches the model to return hidden states; ``set_reference_output(ref_model)`` does
the same for the frozen reference model (the teacher hook's counterpart), whose per-token
log-probabilities are then made under no-grad by the same engine. A recipe chooses between these and
full-logits losses (torchtune's ``DPOLoss``, :class:`tune_losses.DPOLoss`) by config alone.
"""

from __future__ import annotations

from typing import Optional, Sequence, cast

import torch
from torch import nn

from tune_losses.alignment.formulas import REFERENCE_FREE
from tune_losses.alignment.log_probs import REFERENCE_NAMES, run_options, token_log_probs
from tune_losses.alignment.options import PreferenceOptions, Reference
from tune_losses.alignment.policy import PolicyOutput, linear_policy_loss
from tune_losses.alignment.policy_formulas import PolicyOptions
from tune_losses.alignment.preference import (
    PreferenceOutput,
    PreferenceTerms,
    linear_preference_loss,
    linear_preference_terms,
)
from tune_losses.heads import OutputProjection, set_output_mode
from tune_losses.options import IGNORE_INDEX, ExecutionOptions

_NAMED = ("loss_type", "beta", "epsilon_low", "epsilon_high", "temperature", "max_completion_length", "return_entropy")
POLICY_MODULE_OPTIONS = tuple(k for k in PolicyOptions.__dataclass_fields__ if k not in _NAMED)
"""The :class:`PolicyOptions` fields :class:`LinearPolicyLoss` takes through ``**options``."""


def _require(proj: Optional[OutputProjection], who: str) -> OutputProjection:
    if proj is None:
        raise ValueError(
            f"{who}: no output projection; call set_model_output(model) "
            f"(set_reference_output(ref_model) for the reference) first"
        )
    return proj


class _AlignmentModule(nn.Module):
    def __init__(self, ignore_index: int, chunk_size: Optional[int], validate: bool = True):
        super().__init__()
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self._run = run_options(chunk_size, ignore_index, validate, None)  # checked once, at construction
        self.projection: Optional[OutputProjection] = None
        self.reference_projection: Optional[OutputProjection] = None

    def set_model_output(self, model: nn.Module) -> None:
        """Take the policy's output projection and make the model return hidden states ``[B, S, H]``."""
        self.projection = set_output_mode(model, "hidden")

    def set_reference_output(self, ref_model: nn.Module) -> None:
        """Take the frozen reference model's output projection and make it return hidden states."""
        self.reference_projection = set_output_mode(ref_model, "hidden")

    def _reference(self, ref_hidden: torch.Tensor) -> Reference:
        p = _require(self.reference_projection, type(self).__name__ + " (reference)")
        return Reference(ref_hidden, p.weight, p.bias)

    def reference_log_probs(
        self, ref_hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """The reference model's per-token log-probabilities ``[B, S]`` (no-grad; 0 at ignored tokens)."""
        reference = self._reference(ref_hidden)
        with torch.no_grad():
            out = token_log_probs(*reference, labels, self._run, names=REFERENCE_NAMES, temperature=temperature)
        return cast(torch.Tensor, out)  # no entropy asked for: the log-probabilities alone


class LinearPreferenceLoss(_AlignmentModule):
    """Fused preference loss (:func:`tune_losses.linear_preference_loss`) as a module.

    Args:
        loss_type, beta, gamma, label_smoothing, discopop_tau, nll_weight, average_log_prob: the
            :class:`~tune_losses.alignment.options.PreferenceOptions` fields (made and checked once,
            here; the flat keywords are the YAML surface).
        ignore_index, chunk_size: as :func:`tune_losses.linear_preference_loss` (``nll_target`` is a
            call argument).

    Usage::

        loss_fn = LinearPreferenceLoss(beta=0.1)
        loss_fn.set_model_output(policy)            # policy(tokens) -> hidden [2B, S, H]
        loss_fn.set_reference_output(reference)     # reference(tokens) -> hidden [2B, S, H']
        with torch.no_grad():
            ref_hidden = reference(tokens)
        out = loss_fn(policy(tokens), labels, ref_hidden=ref_hidden)   # PreferenceOutput
    """

    def __init__(
        self,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        gamma: float = 0.0,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        average_log_prob: Optional[bool] = None,
        ignore_index: int = IGNORE_INDEX,
        chunk_size: Optional[int] = None,
        discopop_tau: float = 0.05,
    ):
        # Every constructor keyword that names a PreferenceOptions field goes into it (no list to keep in step).
        options = PreferenceOptions(
            **{k: v for k, v in locals().items() if k in PreferenceOptions.__dataclass_fields__}
        )
        super().__init__(ignore_index, chunk_size)
        self.options = options
        self.loss_type = loss_type
        self.beta = beta

    @property
    def needs_reference(self) -> bool:
        """Whether the loss value depends on a reference model (False for SimPO and ORPO)."""
        return self.loss_type not in REFERENCE_FREE

    def terms(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        ref_hidden: Optional[torch.Tensor] = None,
        ref_logps: Optional[Sequence[torch.Tensor]] = None,
        nll_target: Optional[torch.Tensor] = None,
    ) -> PreferenceTerms:
        """Sums and counts (:class:`tune_losses.alignment.PreferenceTerms`) for step-exact normalization.

        hidden ``[2B, S, H]`` (chosen rows first), labels ``[2B, S]``; the reference as ``ref_hidden``
        ``[2B, S, H']`` (needs :meth:`set_reference_output`), ``ref_logps`` ``([B], [B])``, or neither;
        ``nll_target`` ``[2B, S]``: other labels for the NLL term (ORPO).
        """
        return linear_preference_terms(hidden, labels=labels, **self._call_args(ref_hidden, ref_logps, nll_target))

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        ref_hidden: Optional[torch.Tensor] = None,
        ref_logps: Optional[Sequence[torch.Tensor]] = None,
        nll_target: Optional[torch.Tensor] = None,
    ) -> PreferenceOutput:
        """:class:`tune_losses.PreferenceOutput` of this batch (normalized by its own pairs and tokens)."""
        return linear_preference_loss(hidden, labels=labels, **self._call_args(ref_hidden, ref_logps, nll_target))

    def _call_args(self, ref_hidden, ref_logps, nll_target) -> dict:
        p = _require(self.projection, type(self).__name__)
        return dict(
            weight=p.weight,
            bias=p.bias,
            reference=None if ref_hidden is None else self._reference(ref_hidden),
            ref_logps=ref_logps,
            nll_target=nll_target,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
            options=self.options,
        )


class LinearPolicyLoss(_AlignmentModule):
    """Fused policy loss (:func:`tune_losses.linear_policy_loss`) as a module.

    Args:
        loss_type, beta, epsilon_low, epsilon_high, temperature, max_completion_length,
        return_entropy: :class:`~tune_losses.alignment.PolicyOptions` fields, and through
            ``options`` its others by name (``delta``, ``importance_sampling_level``,
            ``use_bias_correction_kl``, ``sapo_temperature_pos``, ``vespo_k_pos``, ``validate``, ...):
            made and checked once, here (the flat keywords are the YAML surface).
        ignore_index, chunk_size: as :func:`tune_losses.linear_policy_loss`.
        algorithm: :class:`~tune_losses.options.ExecutionOptions`' ``algorithm``.

    ``forward(hidden [G, S, H], labels [G, S], advantages [G], old_logps=None, ref_logps=None,
    num_items_in_batch=None, ref_hidden=None, vllm_is_ratio=None)``; with a reference model hooked
    (:meth:`set_reference_output`), pass ``ref_hidden=`` instead of ``ref_logps``.
    """

    def __init__(
        self,
        loss_type: str = "grpo",
        beta: float = 0.0,
        epsilon_low: float = 0.2,
        epsilon_high: Optional[float] = None,
        temperature: float = 1.0,
        max_completion_length: Optional[int] = None,
        ignore_index: int = IGNORE_INDEX,
        chunk_size: Optional[int] = None,
        return_entropy: bool = True,
        algorithm: str = "auto",
        **options,
    ):
        unknown = sorted(set(options) - set(POLICY_MODULE_OPTIONS))
        if unknown:
            raise TypeError(
                f"LinearPolicyLoss: unexpected option(s) {unknown}; expected some of {POLICY_MODULE_OPTIONS}"
            )
        named = {k: v for k, v in locals().items() if k in PolicyOptions.__dataclass_fields__}
        policy_options = PolicyOptions(**named, **options)
        execution = ExecutionOptions(algorithm=algorithm)
        super().__init__(ignore_index, chunk_size, policy_options.validate)
        self.options, self.execution = policy_options, execution
        self.temperature = temperature

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        advantages: torch.Tensor,
        old_logps: Optional[torch.Tensor] = None,
        ref_logps: Optional[torch.Tensor] = None,
        num_items_in_batch=None,
        ref_hidden: Optional[torch.Tensor] = None,
        vllm_is_ratio: Optional[torch.Tensor] = None,
    ) -> PolicyOutput:
        if ref_hidden is not None:
            if ref_logps is not None:
                raise ValueError("ref_logps: give the reference either as ref_hidden or as ref_logps, not both")
            ref_logps = self.reference_log_probs(ref_hidden, labels, self.temperature)
        p = _require(self.projection, type(self).__name__)
        return linear_policy_loss(
            hidden,
            p.weight,
            labels,
            advantages,
            bias=p.bias,
            old_logps=old_logps,
            ref_logps=ref_logps,
            vllm_is_ratio=vllm_is_ratio,
            num_items_in_batch=num_items_in_batch,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
            options=self.options,
            execution=self.execution,
        )
