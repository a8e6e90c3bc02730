"""Fused linear cross-entropy for any Hugging Face Transformers causal LM, by patching one instance.

::

    from tune_losses.integrations.transformers import patch
    model = patch(AutoModelForCausalLM.from_pretrained(...))   # or a PEFT model
    out = model(input_ids, labels=labels)                        # out.loss fused, out.logits None

With ``labels``, in training mode (or always with ``train_only=False``), and ``logits_to_keep`` 0, the
patched forward runs the model's own forward with no logits to compute (``logits_to_keep`` an empty
index; for a forward without that argument, its head module returns an empty tensor for that call),
takes the backbone's final hidden states, applies the model's own head steps, and computes the loss with
:func:`tune_losses.linear_cross_entropy` on the output layer's weight: no ``[tokens, V]`` tensor exists.
It keeps Transformers' contract: the label shift (or ``shift_labels`` as given), ``ignore_index``,
``num_items_in_batch`` (the sum divided by it), and the MoE router auxiliary loss. Everything else
(no labels, eval mode, ``logits_to_keep != 0``, ``skip_logits=False``) runs the stock forward unchanged,
so ``generate()`` and evaluation see the model as built.

The patch is per instance and model-agnostic: what the stock forward does between its backbone and
its loss (head transforms, logit scale, softcap, vocabulary cut, aux loss, z-loss) is read from its source
(:mod:`.head_source`), and a scaled ``nn.Linear`` subclass head from the layer's (:mod:`.output_layer`);
anything not recognised raises. :func:`apply_head` is the one application of that reading, shared by
:func:`patch`, :func:`distillation_loss` and the TRL trainers. It holds no reference to the model outside the model (``copy.deepcopy`` gives a
patched copy training its own parameters) and keeps the forward's signature (``functools.wraps``), so
``Trainer`` still passes ``num_items_in_batch``.

FSDP2: the output weight is read inside every call; a sharded one is gathered by the fused loss
(:func:`tune_losses.fused.placement.materialize_weight`). DeepSpeed ZeRO-3 is untested here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
from dataclasses import dataclass, fields
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

from tune_losses.chunking import shift_labels as shift_labels_of
from tune_losses.fused.functional import (
    flat_distillation_options,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
)
from tune_losses.fused.placement import materialize_weight
from tune_losses.integrations.head_source import UNSHIFTED, HeadSpec, forward_class, read_chain, read_head
from tune_losses.integrations.output_layer import check_output_layer, output_weight
from tune_losses.options import IGNORE_INDEX, CEOptions, ExecutionOptions, check_bool_option, check_int_option
from tune_losses.validation import is_dtensor

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "lm_head_inputs",
    "apply_head",
    "HeadInputs",
    "distillation_loss",
    "unwrap_model",
    "IGNORE_INDEX",
]

CE_OPTIONS = ("label_smoothing", "z_loss", "softcap", "chunk_size", "algorithm", "validate")
"""Keyword options of :func:`tune_losses.linear_cross_entropy` that :func:`patch` passes on."""


class CECall(NamedTuple):
    """How :func:`patch` and the TRL SFT trainer call :func:`tune_losses.linear_cross_entropy`: the
    options objects, made (and checked) once from the flat options those APIs take."""

    options: CEOptions
    execution: ExecutionOptions
    chunk_size: Optional[int]

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], allowed: Sequence[str], **fixed) -> CECall:
        """From ``flat`` (names in ``allowed``, else an error listing them) and ``fixed`` CE options."""
        unknown = sorted(set(flat) - set(allowed))
        if unknown:
            raise ValueError(f"ce_options: unknown option(s) {unknown}; expected some of {list(allowed)}")
        check_int_option("chunk_size", flat.get("chunk_size"), 1, allow_none=True)
        ce = {k: flat[k] for k in ("label_smoothing", "z_loss", "softcap", "validate") if k in flat}
        return cls(CEOptions(**ce, **fixed), ExecutionOptions(flat.get("algorithm", "auto")), flat.get("chunk_size"))


def fused_lm_loss(model, spec: HeadSpec, head: HeadInputs, targets: torch.Tensor, ce: CECall, num_tokens, ignore_index):
    """The causal-LM loss of ``model`` from its head inputs: :func:`tune_losses.linear_cross_entropy`
    (the model's own softcap, else ``ce``'s) divided by ``num_tokens`` when given (else the mean), plus
    the model's own z-loss over every position (Bamba) as its forward adds it. Shared by :func:`patch`
    and :class:`tune_losses.integrations.trl.FusedSFTTrainer`."""
    options = ce.options
    softcap = head.softcap if head.softcap is not None else options.softcap
    if (softcap, ignore_index) != (options.softcap, options.ignore_index):
        options = dataclasses.replace(options, softcap=softcap, ignore_index=ignore_index)
    if torch.is_tensor(num_tokens):
        num_tokens = num_tokens.to(head.hidden.device)
    kw = dict(chunk_size=ce.chunk_size, num_tokens=num_tokens, options=options, execution=ce.execution)
    loss = linear_cross_entropy(head.hidden, head.weight, targets, bias=head.bias, **kw)
    z_coef = spec.z_loss_coefficient(model)
    if z_coef > 0:
        loss = loss + z_coef * mean_squared_lse(head, softcap, ce.chunk_size)
    return loss


_STATE = "_tune_losses_patch"
_INNER = "_tune_losses_inner_forward"


@dataclass(frozen=True)
class _PatchState:
    train_only: bool
    ce: CECall
    spec: HeadSpec


def unwrap_model(model):
    """The Transformers model inside PEFT (``get_base_model()``) and DDP / accelerate (``.module``) wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model) and model.get_base_model() is not model:
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def patch(model, *, train_only: bool = True, **ce_options):
    """Make ``model``'s training loss the fused linear cross-entropy (this instance only).

    Args:
        model: a Transformers ``*ForCausalLM`` (or a PEFT model around one).
        train_only: fused only in training mode; eval mode runs the stock forward (full logits).
        ce_options: passed to :func:`tune_losses.linear_cross_entropy`: ``label_smoothing``, ``z_loss``,
            ``softcap`` (only for models without their own), ``chunk_size``, ``algorithm``, ``validate``.

    Returns:
        ``model`` itself, patched (patching again replaces the options).

    Raises:
        ValueError: unknown option, a model whose forward post-processes its logits in a way the fused
            loss cannot reproduce, or whose loss is not Transformers' causal-LM loss.
    """
    ce = CECall.from_flat(ce_options, CE_OPTIONS)  # checked now, not at the first training step
    check_bool_option("train_only", train_only)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a Transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    hf = unwrap_model(model)
    if is_patched(hf):
        unpatch(hf)
    _check_takes_labels(hf)
    spec = read_head(hf)
    if "softcap" in ce_options and spec.softcap is not None:
        raise ValueError(
            f"ce_options: softcap is set by {spec.model_type} itself ({'.'.join(spec.softcap)}); don't pass softcap"
        )
    _check_loss_function(hf, spec)
    if not train_only:
        _check_training_mode(hf, spec)
    check_output_layer(read_chain(hf, spec.head))  # an unrecognised output layer forward fails now
    inner = hf.__dict__.get("forward")  # a forward someone installed on the instance before us
    if inner is not None:
        setattr(hf, _INNER, inner)
    object.__setattr__(hf, _STATE, _PatchState(train_only, ce, spec))
    hf.forward = types.MethodType(_forward_for(forward_class(type(hf))), hf)
    return model


def unpatch(model):
    """Undo :func:`patch` on ``model`` (a no-op if it is not patched). Returns ``model``."""
    hf = unwrap_model(model)
    if not is_patched(hf):
        return model
    inner = hf.__dict__.pop(_INNER, None)
    del hf.__dict__[_STATE]
    if inner is not None:
        hf.forward = inner
    else:
        del hf.__dict__["forward"]
    return model


def is_patched(model) -> bool:
    return _STATE in unwrap_model(model).__dict__


def _check_takes_labels(hf) -> None:
    """A forward without a ``labels`` argument computes no loss (a speculative-decoding drafter's, fed
    another model's hidden states): there is nothing for the fused loss to replace."""
    cls = forward_class(type(hf))
    if "labels" not in inspect.signature(cls.forward).parameters:
        raise ValueError(
            f"model: {cls.__name__}.forward takes no labels, so it computes no loss for the fused loss to "
            f"replace; it is not patched"
        )


def _check_training_mode(hf, spec: HeadSpec) -> None:
    """A forward with eval-only steps between its backbone and its loss (``spec.eval_steps``) is read for
    training mode only."""
    if spec.eval_steps:
        raise ValueError(
            f"model: {spec.model_type}.forward post-processes its logits differently in eval mode (under "
            f"`if {spec.eval_steps[0]}`); the fused loss matches it in training mode only (train_only=True, "
            f"the model in train())"
        )


def _check_loss_function(hf, spec: HeadSpec) -> None:
    """The forward's ``self.loss_function`` must be Transformers' causal-LM loss, compared as a function:
    ``LOSS_MAPPING`` maps several names to it (``ForConditionalGeneration`` for Gemma 3, ...)."""
    if spec.loss == UNSHIFTED:
        return
    from transformers.loss.loss_utils import LOSS_MAPPING

    causal = LOSS_MAPPING["ForCausalLM"]
    custom = hf.__dict__.get("_loss_function")
    loss_type = getattr(hf, "loss_type", None)
    fn = custom if custom is not None else LOSS_MAPPING.get(loss_type, causal)  # unknown names fall back to it
    if inspect.unwrap(fn) is not inspect.unwrap(causal):
        what = "custom loss_function" if custom is not None else f"loss_type {loss_type!r}"
        raise ValueError(
            f"model: the {what} of {type(hf).__name__} is {getattr(fn, '__name__', fn)!r}, not Transformers' "
            f"causal-LM loss {causal.__name__}, which is what the fused loss replaces"
        )


@functools.cache
def _forward_for(cls):
    """A copy of :func:`_patched_forward` carrying ``cls.forward``'s name, docstring and signature."""
    f = types.FunctionType(
        _patched_forward.__code__,
        _patched_forward.__globals__,
        "forward",
        _patched_forward.__defaults__,
        _patched_forward.__closure__,
    )
    f.__kwdefaults__ = _patched_forward.__kwdefaults__
    return functools.wraps(cls.forward)(f)


@functools.cache
def _positional_names(cls):
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _stock(model):
    inner = model.__dict__.get(_INNER)
    return inner if inner is not None else types.MethodType(type(model).forward, model)


def _patched_forward(self, *args, **kwargs):
    state = self.__dict__.get(_STATE)
    stock = _stock(self)
    if args:
        names = _positional_names(forward_class(type(self)))
        if len(args) > len(names):
            return stock(*args, **kwargs)
        kwargs.update(zip(names, args))
    skip_logits = kwargs.pop("skip_logits", None)
    labels = kwargs.get("labels")
    if skip_logits and labels is None:
        raise ValueError("skip_logits: True needs labels (the fused loss replaces the logits)")
    keep = kwargs.get("logits_to_keep", 0)
    fused = (
        state is not None
        and labels is not None
        and skip_logits is not False
        and isinstance(keep, int)
        and keep == 0
        and (skip_logits or self.training or not state.train_only)
    )
    if not fused:
        return stock(**kwargs)

    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    return_dict = kwargs.pop("return_dict", None)
    spec = state.spec
    head = lm_head_inputs(self, _spec=spec, **kwargs)
    if spec.loss == UNSHIFTED:  # torch's CrossEntropyLoss() on the labels as given: a mean, its default -100
        targets, num_items_in_batch, ignore_index = labels, None, IGNORE_INDEX
    elif shift_labels is None:
        targets = shift_labels_of(labels, ignore_index)
    else:
        targets = shift_labels
    targets = targets.to(head.hidden.device)
    with _no_autocast(head.hidden):
        # The sum over valid tokens divided by num_items_in_batch when given (Transformers' contract),
        # applied to the gradients in fp32 before any low-precision cast.
        loss = fused_lm_loss(self, spec, head, targets, state.ce, num_items_in_batch, ignore_index)
    outputs = head.outputs
    coef = spec.aux_coefficient(self)
    aux = getattr(outputs, "aux_loss", None)
    if coef is not None and aux is not None:
        loss = loss + coef * aux.to(loss.device)
    outputs = type(outputs)(
        **{**{f.name: getattr(outputs, f.name) for f in fields(outputs)}, "loss": loss, "logits": None}
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if return_dict:
        return outputs
    # Stock's tuple drops None fields; the logits slot is kept (None) so that `loss, logits = out[:2]`
    # does not silently receive the cache.
    return (loss, None) + tuple(v for k, v in outputs.items() if k not in ("loss", "logits"))


def mean_squared_lse(head: HeadInputs, softcap, chunk_size) -> torch.Tensor:
    """``mean(logsumexp(z)^2)`` over every position (Bamba's z-loss), without a ``[tokens, V]`` tensor:
    ``lse = z_0 - log softmax(z)_0`` with the log-probability of token 0 from the fused log-prob pass."""
    if softcap is not None:
        raise ValueError("model: a z-loss over every position together with a logit softcap is not supported")
    zeros = torch.zeros(head.hidden.shape[:-1], dtype=torch.long, device=head.hidden.device)
    log_p0 = linear_log_probs(head.hidden, head.weight, zeros, bias=head.bias, chunk_size=chunk_size, validate=False)
    z0 = head.hidden.float() @ head.weight[0].float()
    if head.bias is not None:
        z0 = z0 + head.bias[0].float()
    return (z0 - log_p0.float()).pow(2).mean()


class HeadInputs(NamedTuple):
    """What the output layer would see, for a fused loss: ``logits == softcap(hidden @ weight.T + bias)``.

    ``hidden`` ``[B, S, H]`` already went through the model's steps before the output layer (head
    transforms, logit scale); ``weight`` ``[V, H]`` and ``bias`` are in the compute dtype (the autocast
    dtype under autocast); ``softcap`` the model's, or None; ``outputs`` the model's own output of that
    call (``logits`` empty, ``aux_loss`` etc. as stock), None from :func:`apply_head`.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    outputs: Any


def lm_head_inputs(model, *, _spec: Optional[HeadSpec] = None, **inputs) -> HeadInputs:
    """Run ``model`` (a Transformers causal LM, or a PEFT model around one) on ``inputs`` without computing
    logits, and return its final hidden states with the output layer's weight (:class:`HeadInputs`).

    ``inputs`` are the model's forward arguments (``input_ids``, ``attention_mask``, ...; no ``labels``).
    Gradients flow as in the model's own forward. Used by :func:`patch`, :func:`distillation_loss` and the
    TRL trainers.
    """
    hf = unwrap_model(model)
    spec = _spec if _spec is not None else read_head(hf)
    if inputs.get("labels") is not None:
        raise ValueError("labels: lm_head_inputs runs the model without labels; compute the loss from its result")
    inputs.pop("labels", None)
    inputs.pop("return_dict", None)
    base = read_chain(hf, spec.base)
    anchor = next((t for t in inputs.values() if torch.is_tensor(t)), None)
    device = anchor.device if anchor is not None else None
    takes_keep = "logits_to_keep" in _parameters(forward_class(type(hf)))
    if takes_keep:
        inputs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=device)  # keep no position: no logits
    captured = []
    handle = base.register_forward_hook(lambda module, args, output: captured.append(output))
    # A forward without logits_to_keep: its head module returns an empty [..., 0] tensor for this call.
    silence = contextlib.nullcontext() if takes_keep else _empty_output(read_chain(hf, spec.call))
    try:
        with silence:
            outputs = _stock(hf)(return_dict=True, **inputs)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"model: {spec.model_type}.forward did not call its backbone {'.'.join(spec.base)}")
    last = captured[-1]
    hidden = last.last_hidden_state if hasattr(last, "last_hidden_state") else last[0]
    return apply_head(hf, hidden, spec)._replace(outputs=outputs)


def apply_head(model, hidden: torch.Tensor, spec: Optional[HeadSpec] = None) -> HeadInputs:
    """The model's steps from its backbone's final hidden states ``[B, S, H]`` to its output layer, as
    :class:`HeadInputs` (``outputs`` None): hidden-state scale, head transforms (run as the modules they
    are, so they train), the output layer's weight and bias (PEFT and scaled ``nn.Linear`` subclasses
    resolved, :func:`~tune_losses.integrations.output_layer.output_weight`), the logit scale, the softcap.

    The one application of a :class:`~tune_losses.integrations.head_source.HeadSpec` shared by
    :func:`patch`, :func:`distillation_loss` and the TRL trainers.
    """
    hf = unwrap_model(model)
    spec = spec if spec is not None else read_head(hf)
    if not hf.training:
        _check_training_mode(hf, spec)
    scale = spec.hidden_scale(hf)
    if scale is not None:
        hidden = hidden * scale
    for chain in spec.transforms:
        hidden = read_chain(hf, chain)(hidden)
    layer = read_chain(hf, spec.head)
    if spec.call != spec.head:
        hidden = _output_layer_input(read_chain(hf, spec.call), layer, hidden)
    weight, bias = output_weight(layer, ".".join(spec.head))
    rows = spec.vocab_rows(hf)
    if rows is not None and rows < weight.shape[0]:  # logits[..., :rows] = x W[:rows]^T + b[:rows]
        weight = materialize_weight(weight)[:rows]
        bias = None if bias is None else materialize_weight(bias)[:rows]
    scale = spec.logit_scale(hf)
    if scale is not None:  # s * (x W^T + b) = (s x) W^T + s b
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    dtype = _compute_dtype(hidden, weight)
    hidden = hidden.to(dtype)
    weight = weight.to(dtype) if weight.dtype != dtype and not is_dtensor(weight) else weight
    bias = bias.to(dtype) if bias is not None and bias.dtype != dtype and not is_dtensor(bias) else bias
    return HeadInputs(hidden, weight, bias, spec.softcap_value(hf), None)


@functools.cache
def _parameters(cls):
    return tuple(inspect.signature(cls.forward).parameters)


@contextlib.contextmanager
def _empty_output(module: torch.nn.Module):
    """``module`` returns ``x.new_empty(*x.shape[:-1], 0)`` for its input ``x`` inside the block: the stock
    forward runs to its end with no ``[tokens, V]`` tensor."""
    prior = module.__dict__.get("forward")
    module.forward = lambda x, *args, **kwargs: x.new_empty(*x.shape[:-1], 0)
    try:
        yield
    finally:
        if prior is None:
            del module.__dict__["forward"]
        else:
            module.forward = prior


def _output_layer_input(container: torch.nn.Module, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives when ``container(hidden)`` runs (its transform steps, with autograd), without
    computing the layer's output: the layer's forward is swapped for one that records its input and
    returns an empty ``[..., 0]`` tensor (the container returns it untouched, checked by :func:`read_head`)."""
    seen = []
    prior = layer.__dict__.get("forward")

    def record(x, *args, **kwargs):
        seen.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    layer.forward = record
    try:
        container(hidden)
    finally:
        if prior is None:
            del layer.__dict__["forward"]
        else:
            layer.forward = prior
    return seen[-1]


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the stock output layer would compute in: autocast's, else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _no_autocast(hidden: torch.Tensor):
    """The fused loss chooses its own precision (fp32 math); autocast would recast its matmuls."""
    return torch.autocast(hidden.device.type, enabled=False)


def distillation_loss(
    student,
    teacher,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    shift_labels: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    **loss_options,
):
    """``(1 - kd_ratio) * CE + kd_ratio * KD`` between two Transformers causal LMs, with neither's logits.

    Both models run without logits (:func:`lm_head_inputs`; the teacher under ``torch.no_grad()``), then
    :func:`tune_losses.linear_distillation_loss` takes both hidden states and output weights. Labels
    are shifted as Transformers does (or ``shift_labels`` given). The teacher and student must share the
    vocabulary (``[V, H_t]`` and ``[V, H_s]``); models with a logit softcap are not supported here.

    Args:
        loss_options: ``chunk_size``, ``options``, ``parallel``, ``execution`` of
            :func:`tune_losses.linear_distillation_loss`, or the flat ``kd_ratio``, ``divergence``,
            ``temperature``, ``beta``, ``scale_by_temperature_squared``, ``label_smoothing``, ``algorithm``,
            ... (made into those objects here).
        num_items_in_batch: when given, the loss is the sum over valid tokens divided by it (as
            Transformers' loss with gradient accumulation), else the mean over valid tokens.

    Returns:
        :class:`tune_losses.FusedOutput` (``loss`` differentiable; ``ce``, ``kd`` detached, same normalization).
    """
    for reserved in ("reduction", "student_bias", "teacher_bias"):
        if reserved in loss_options:
            raise ValueError(f"{reserved}: set by distillation_loss itself")
    call = flat_distillation_options(loss_options, ignore_index)  # checked before the models run
    s = lm_head_inputs(student, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    with torch.no_grad():
        t = lm_head_inputs(teacher, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if s.softcap is not None or t.softcap is not None:
        raise ValueError("model: distillation_loss does not support models with a logit softcap")
    if shift_labels is None:
        shift_labels = shift_labels_of(labels, ignore_index)
    shift_labels = shift_labels.to(s.hidden.device)
    with _no_autocast(s.hidden):
        out = linear_distillation_loss(
            s.hidden,
            s.weight,
            t.hidden.to(s.hidden.device),
            t.weight,
            shift_labels,
            student_bias=s.bias,
            teacher_bias=t.bias,
            reduction="mean" if num_items_in_batch is None else "sum",
            **call,
        )
    if num_items_in_batch is None:
        return out
    n = num_items_in_batch.to(out.loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return out._replace(loss=out.loss / n, ce=out.ce / n, kd=out.kd / n)
