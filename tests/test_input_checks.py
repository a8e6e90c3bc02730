"""Misuse of every public entry point gives a clear error: the argument's name, what was expected,
what came; options are checked when they are built (constructors, not the first forward).

Each case: (entry point call, exception type, the argument named, what came as shown in the message).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from tune_losses import (
    CEOptions,
    CEWithChunkedOutputLoss,
    ForwardKLLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDLoss,
    JSDWithChunkedOutputLoss,
    KDOptions,
    LinearCrossEntropyLoss,
    LinearDistillationLoss,
    ReverseKLWithChunkedOutputLoss,
    SymmetricKLLoss,
    SymmetricKLWithChunkedOutputLoss,
    TVDLoss,
    TVDWithChunkedOutputLoss,
    all_reduce_token_count,
    count_step_tokens,
    count_valid_tokens,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_kd_loss,
    linear_log_probs,
    megatron_loss_func,
    normalize,
    set_output_mode,
    split_like,
    split_tokens,
)
from tune_losses.chunking import token_chunk_bounds
from tune_losses.options import ArgumentTypeError, DistillationOptions, ExecutionOptions, VocabParallelOptions

B, S, H, HT, V = 2, 5, 8, 6, 11


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, S, H, generator=g)
    w = torch.randn(V, H, generator=g)
    th = torch.randn(B, S, HT, generator=g)
    tw = torch.randn(V, HT, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 0] = -100
    x = torch.randn(B, S, V, generator=g)
    tx = torch.randn(B, S, V, generator=g)
    return h, w, th, tw, labels, list(torch.tensor_split(x, 2, 1)), list(torch.tensor_split(tx, 2, 1))


h, w, th, tw, labels, chunks, tchunks = _inputs()
minus_one = labels.masked_fill(labels == labels[1, 1], -1)  # -1 is not ignore_index (-100)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(H, V)

    def forward(self, x):
        return self.lm_head(x)


def _lce_forward(hidden, lab):
    loss = LinearCrossEntropyLoss()
    loss.set_model_output(_Head())
    return loss(hidden, lab)


T, VE = ArgumentTypeError, ValueError


# (id, call, exception, argument named, what came (regex))
def option_case(cls, exc, **option):
    """A case of ``cls(name=value)`` refused with ``exc``, naming ``name`` and showing ``repr(value)``."""
    ((name, value),) = option.items()
    return (f"{cls.__name__}_{name}_{value!r}", lambda: cls(**option), exc, name, re.escape(repr(value)))


CASES = [
    # --- issue 9 item 2, as filed ----------------------------------------------------------------
    ("fused_ce_int16_labels", lambda: linear_cross_entropy(h, w, labels.short()), T, "labels", r"torch\.int16"),
    (
        "fused_ce_uint8_labels",
        lambda: linear_cross_entropy(h, w, labels.clamp(min=0).to(torch.uint8)),
        T,
        "labels",
        r"torch\.uint8",
    ),
    ("fused_kd_int16_labels", lambda: linear_kd_loss(h, w, th, tw, labels.short()), T, "labels", r"torch\.int16"),
    (
        "fused_distill_uint8_labels",
        lambda: linear_distillation_loss(h, w, th, tw, labels.clamp(min=0).byte()),
        T,
        "labels",
        r"torch\.uint8",
    ),
    (
        "chunked_ce_int16_labels",
        lambda: CEWithChunkedOutputLoss(2)(chunks, labels.short()),
        T,
        "labels",
        r"torch\.int16",
    ),
    (
        "chunked_kd_uint8_labels",
        lambda: ForwardKLWithChunkedOutputLoss(2)(chunks, tchunks, labels.clamp(min=0).byte()),
        T,
        "labels",
        r"torch\.uint8",
    ),
    ("fused_ce_V0", lambda: linear_cross_entropy(h, w[:0], labels), VE, "weight", r"\(0, 8\)"),
    (
        "fused_ce_V0_unvalidated",
        lambda: linear_cross_entropy(h, w[:0], labels, options=CEOptions(validate=False)),
        VE,
        "weight",
        r"\(0, 8\)",
    ),
    ("fused_kd_V0", lambda: linear_kd_loss(h, w[:0], th, tw[:0], labels), VE, "student_weight", r"\(0, 8\)"),
    (
        "chunked_ce_V0",
        lambda: CEWithChunkedOutputLoss(2)([c[..., :0] for c in chunks], labels),
        VE,
        r"logits\[0\]",
        r"\(2, 3, 0\)",
    ),
    (
        "chunked_kd_V0",
        lambda: ReverseKLWithChunkedOutputLoss(2)([c[..., :0] for c in chunks], [c[..., :0] for c in tchunks], labels),
        VE,
        r"student_logits\[0\]",
        r"\(2, 3, 0\)",
    ),
    ("fused_hidden_list", lambda: linear_cross_entropy(list(h), w, labels), T, "hidden", "list of 2"),
    ("fused_teacher_hidden_list", lambda: linear_kd_loss(h, w, list(th), tw, labels), T, "teacher_hidden", "list of 2"),
    ("module_hidden_list", lambda: _lce_forward(list(h), labels), T, "hidden", "list of 2"),
    (
        "temperature_inf",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(temperature=math.inf)),
        VE,
        "temperature",
        "inf",
    ),
    ("z_loss_nan", lambda: linear_cross_entropy(h, w, labels, options=CEOptions(z_loss=math.nan)), VE, "z_loss", "nan"),
    ("chunk_size_true", lambda: linear_cross_entropy(h, w, labels, chunk_size=True), T, "chunk_size", "True"),
    ("kd_label_minus_one", lambda: linear_kd_loss(h, w, th, tw, minus_one), VE, "labels", "-1"),
    ("distill_label_minus_one", lambda: linear_distillation_loss(h, w, th, tw, minus_one), VE, "labels", "-1"),
    (
        "chunked_kd_label_minus_one",
        lambda: ForwardKLWithChunkedOutputLoss(2)(chunks, tchunks, minus_one),
        VE,
        "labels",
        "-1",
    ),
    (
        "kd_label_V",
        lambda: linear_kd_loss(h, w, th, tw, labels.masked_fill(labels == labels[1, 1], V)),
        VE,
        "labels",
        str(V),
    ),
    option_case(LinearDistillationLoss, VE, kd_ratio=2),
    option_case(LinearDistillationLoss, VE, temperature=0),
    option_case(LinearCrossEntropyLoss, VE, chunk_size=0),
    option_case(CEWithChunkedOutputLoss, VE, num_output_chunks=0),
    # --- the rest of the sweep: non-finite / bool / wrong-type options ------------------------------
    (
        "temperature_nan",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(temperature=math.nan)),
        VE,
        "temperature",
        "nan",
    ),
    (
        "temperature_bool",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(temperature=True)),
        T,
        "temperature",
        "True",
    ),
    (
        "temperature_str",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(temperature="2")),
        T,
        "temperature",
        "'2'",
    ),
    ("z_loss_inf", lambda: linear_cross_entropy(h, w, labels, options=CEOptions(z_loss=math.inf)), VE, "z_loss", "inf"),
    (
        "z_loss_negative",
        lambda: linear_cross_entropy(h, w, labels, options=CEOptions(z_loss=-0.1)),
        VE,
        "z_loss",
        r"-0\.1",
    ),
    (
        "softcap_inf",
        lambda: linear_cross_entropy(h, w, labels, options=CEOptions(softcap=math.inf)),
        VE,
        "softcap",
        "inf",
    ),
    (
        "label_smoothing_bool",
        lambda: linear_cross_entropy(h, w, labels, options=CEOptions(label_smoothing=True)),
        T,
        "label_smoothing",
        "True",
    ),
    ("chunk_size_float", lambda: linear_cross_entropy(h, w, labels, chunk_size=2.0), T, "chunk_size", r"2\.0"),
    ("kd_chunk_size_true", lambda: linear_kd_loss(h, w, th, tw, labels, chunk_size=True), T, "chunk_size", "True"),
    (
        "ignore_index_float",
        lambda: linear_cross_entropy(h, w, labels, ignore_index=-100.0),
        T,
        "ignore_index",
        r"-100\.0",
    ),
    (
        "ignore_index_none",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(ignore_index=None)),
        T,
        "ignore_index",
        "None",
    ),
    (
        "validate_str",
        lambda: linear_cross_entropy(h, w, labels, options=CEOptions(validate="no")),
        T,
        "validate",
        "'no'",
    ),
    (
        "kd_validate_int",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(validate=1)),
        T,
        "validate",
        "1",
    ),
    (
        "kd_ratio_bool",
        lambda: linear_distillation_loss(
            h, w, th, tw, labels, options=DistillationOptions(kd_ratio=True, kd=KDOptions())
        ),
        T,
        "kd_ratio",
        "True",
    ),
    (
        "kd_ratio_nan",
        lambda: linear_distillation_loss(
            h, w, th, tw, labels, options=DistillationOptions(kd_ratio=math.nan, kd=KDOptions())
        ),
        VE,
        "kd_ratio",
        "nan",
    ),
    (
        "beta_inf",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(divergence="jsd", beta=math.inf)),
        VE,
        "beta",
        "inf",
    ),
    (
        "scale_by_temperature_squared_str",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(scale_by_temperature_squared="yes")),
        T,
        "scale_by_temperature_squared",
        "'yes'",
    ),
    (
        "divergence_none",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(divergence=None)),
        VE,
        "divergence",
        "None",
    ),
    # --- wrong tensor types and shapes at the fused entry points ------------------------------------
    ("fused_weight_list", lambda: linear_cross_entropy(h, list(w), labels), T, "weight", "list of 11"),
    ("fused_hidden_numpy", lambda: linear_cross_entropy(h.numpy(), w, labels), T, "hidden", "ndarray"),
    ("fused_bias_list", lambda: linear_cross_entropy(h, w, labels, bias=[0.0] * V), T, "bias", "list of 11"),
    ("fused_labels_list", lambda: linear_cross_entropy(h, w, labels.tolist()), T, "labels", "list of 2"),
    ("fused_labels_float", lambda: linear_cross_entropy(h, w, labels.float()), T, "labels", r"torch\.float32"),
    ("fused_hidden_0dim", lambda: linear_cross_entropy(h[0, 0, 0], w, labels), VE, "hidden", "0-dim"),
    ("fused_H0", lambda: linear_cross_entropy(h[..., :0], w[:, :0], labels), VE, "weight", r"\(11, 0\)"),
    (
        "fused_teacher_weight_list",
        lambda: linear_distillation_loss(h, w, th, list(tw), labels),
        T,
        "teacher_weight",
        "list of 11",
    ),
    (
        "vocab_parallel_str",
        lambda: linear_cross_entropy(h, w, labels, parallel=VocabParallelOptions(vocab_parallel="yes")),
        T,
        "vocab_parallel",
        "'yes'",
    ),
    (
        "vocab_start_bool",
        lambda: linear_kd_loss(h, w, th, tw, labels, parallel=VocabParallelOptions(vocab_start=True)),
        T,
        "vocab_start",
        "True",
    ),
    (
        "vocab_size_zero",
        lambda: linear_cross_entropy(h, w, labels, parallel=VocabParallelOptions(vocab_size=0)),
        VE,
        "vocab_size",
        "0",
    ),
    ("log_probs_int16_labels", lambda: linear_log_probs(h, w, labels.short()), T, "labels", r"torch\.int16"),
    ("log_probs_hidden_list", lambda: linear_log_probs(list(h), w, labels), T, "hidden", "list of 2"),
    ("log_probs_V0", lambda: linear_log_probs(h, w[:0], labels), VE, "weight", r"\(0, 8\)"),
    (
        "log_probs_temperature_inf",
        lambda: linear_log_probs(h, w, labels, temperature=math.inf),
        VE,
        "temperature",
        "inf",
    ),
    ("log_probs_temperature_bool", lambda: linear_log_probs(h, w, labels, temperature=True), T, "temperature", "True"),
    (
        "log_probs_return_entropy_str",
        lambda: linear_log_probs(h, w, labels, return_entropy="x"),
        T,
        "return_entropy",
        "'x'",
    ),
    ("log_probs_label_minus_one", lambda: linear_log_probs(h, w, minus_one), VE, "labels", "-1"),
    ("log_probs_chunk_size_true", lambda: linear_log_probs(h, w, labels, chunk_size=True), T, "chunk_size", "True"),
    ("num_tokens_bool", lambda: linear_cross_entropy(h, w, labels, num_tokens=True), VE, "num_tokens", "bool"),
    ("num_tokens_nan", lambda: linear_cross_entropy(h, w, labels, num_tokens=math.nan), VE, "num_tokens", "nan"),
    ("scale_nan", lambda: linear_cross_entropy(h, w, labels, reduction="sum", scale=math.nan), VE, "scale", "nan"),
    (
        "drop_ignored_tokens_str",
        lambda: linear_cross_entropy(h, w, labels, execution=ExecutionOptions(drop_ignored_tokens="yes")),
        T,
        "drop_ignored_tokens",
        "'yes'",
    ),
    (
        "teacher_vocab_unknown",
        lambda: linear_kd_loss(h, w, th, tw, labels, options=KDOptions(teacher_vocab="x")),
        VE,
        "teacher_vocab",
        "'x'",
    ),
    option_case(LinearCrossEntropyLoss, T, tp_enabled=1),
    option_case(LinearCrossEntropyLoss, VE, num_output_chunks=0),
    option_case(LinearDistillationLoss, T, mask_ignored_tokens="no"),
    (
        "ForwardKL_chunked_teacher_vocab",
        lambda: ForwardKLWithChunkedOutputLoss(2, teacher_vocab="x"),
        VE,
        "teacher_vocab",
        "'x'",
    ),
    # --- module constructors check everything at construction --------------------------------------
    option_case(LinearCrossEntropyLoss, VE, z_loss=math.nan),
    option_case(LinearCrossEntropyLoss, T, chunk_size=True),
    option_case(LinearCrossEntropyLoss, VE, algorithm="fast"),
    option_case(LinearCrossEntropyLoss, T, ignore_index="x"),
    option_case(LinearDistillationLoss, VE, temperature=math.inf),
    option_case(LinearDistillationLoss, VE, divergence="kl"),
    option_case(LinearDistillationLoss, VE, algorithm="x"),
    option_case(LinearDistillationLoss, T, kd_ratio=True),
    option_case(LinearDistillationLoss, VE, label_smoothing=math.nan),
    option_case(LinearDistillationLoss, VE, chunk_size=0),
    (
        "CEWithChunkedOutputLoss_num_output_chunks_true",
        lambda: CEWithChunkedOutputLoss(True),
        T,
        "num_output_chunks",
        "True",
    ),
    (
        "CEWithChunkedOutputLoss_ignore_index_float",
        lambda: CEWithChunkedOutputLoss(2, ignore_index=1.0),
        T,
        "ignore_index",
        r"1\.0",
    ),
    ("CEWithChunkedOutputLoss_validate_int", lambda: CEWithChunkedOutputLoss(2, validate=1), T, "validate", "1"),
    ("CEWithChunkedOutputLoss_z_loss_inf", lambda: CEWithChunkedOutputLoss(2, z_loss=math.inf), VE, "z_loss", "inf"),
    (
        "ForwardKL_chunked_temperature_inf",
        lambda: ForwardKLWithChunkedOutputLoss(2, temperature=math.inf),
        VE,
        "temperature",
        "inf",
    ),
    ("ForwardKL_chunked_true_kl_str", lambda: ForwardKLWithChunkedOutputLoss(2, true_kl="x"), T, "true_kl", "'x'"),
    (
        "ReverseKL_chunked_num_output_chunks_float",
        lambda: ReverseKLWithChunkedOutputLoss(2.0),
        T,
        "num_output_chunks",
        r"2\.0",
    ),
    ("SymmetricKL_chunked_ratio_nan", lambda: SymmetricKLWithChunkedOutputLoss(2, math.nan), VE, "sym_kd_ratio", "nan"),
    ("JSD_chunked_beta_bool", lambda: JSDWithChunkedOutputLoss(2, True), T, "beta", "True"),
    ("TVD_chunked_validate_str", lambda: TVDWithChunkedOutputLoss(2, validate="on"), T, "validate", "'on'"),
    ("ForwardKLLoss_ignore_index_none", lambda: ForwardKLLoss(None), T, "ignore_index", "None"),
    ("SymmetricKLLoss_ratio_bool", lambda: SymmetricKLLoss(True), T, "sym_kd_ratio", "True"),
    ("JSDLoss_beta_nan", lambda: JSDLoss(math.nan), VE, "beta", "nan"),
    option_case(TVDLoss, VE, temperature=-1.0),
    option_case(CEOptions, VE, z_loss=math.nan),
    option_case(KDOptions, VE, temperature=math.inf),
    option_case(KDOptions, T, true_kl=0),
    # --- chunked-output calls -----------------------------------------------------------------------
    (
        "chunked_kd_chunk_count_mismatch",
        lambda: ForwardKLWithChunkedOutputLoss(2)(chunks, tchunks[:1], labels),
        VE,
        "teacher_logits",
        r"^ 1$",
    ),
    (
        "chunked_kd_teacher_tensor_for_chunks",
        lambda: ForwardKLWithChunkedOutputLoss(2)(chunks, torch.cat(tchunks, 1), labels),
        VE,
        "teacher_logits",
        r"^ 1$",
    ),
    ("chunked_ce_non_tensor_chunks", lambda: CEWithChunkedOutputLoss(2)([1, 2], labels), T, r"logits\[0\]", "int"),
    ("chunked_ce_logits_str", lambda: CEWithChunkedOutputLoss(2)("logits", labels), T, "logits", "str"),
    ("chunked_ce_empty_list", lambda: CEWithChunkedOutputLoss(2)([], labels), VE, "logits", "empty list"),
    ("chunked_ce_labels_list", lambda: CEWithChunkedOutputLoss(2)(chunks, labels.tolist()), T, "labels", "list of 2"),
    ("chunked_ce_chunks_too_short", lambda: CEWithChunkedOutputLoss(2)(chunks[:1], labels), VE, "logits", r"\[3\]"),
    (
        "chunked_kd_normalize_str",
        lambda: ForwardKLWithChunkedOutputLoss(2)(chunks, tchunks, labels, normalize="x"),
        T,
        "normalize",
        "'x'",
    ),
    # --- splitter, heads, accounting -----------------------------------------------------------------
    ("split_tokens_list", lambda: split_tokens([1, 2, 3], 2), T, "x", "list of 3"),
    ("split_tokens_bool", lambda: split_tokens(h, True), T, "num_chunks", "True"),
    ("split_like_tensor_for_chunks", lambda: split_like(labels, torch.cat(chunks, 1)), T, "logits", "Tensor"),
    ("token_chunk_bounds_bool", lambda: token_chunk_bounds(10, True), T, "chunk_size", "True"),
    ("token_chunk_bounds_float", lambda: token_chunk_bounds(10, 2.5), T, "chunk_size", r"2\.5"),
    ("set_output_mode_chunks_bool", lambda: set_output_mode(_Head(), "chunks", True), T, "num_output_chunks", "True"),
    ("set_output_mode_mode_none", lambda: set_output_mode(_Head(), None), VE, "mode", "None"),
    ("normalize_int_count", lambda: normalize(torch.tensor(3.0), 2), T, "num_tokens", "int"),
    ("count_valid_tokens_list", lambda: count_valid_tokens([1, -100]), T, "labels", "list of 2"),
    ("count_valid_tokens_ignore_index_str", lambda: count_valid_tokens(labels, "x"), T, "ignore_index", "'x'"),
    ("count_valid_tokens_float_labels", lambda: count_valid_tokens(labels.float()), T, "labels", r"torch\.float32"),
    ("count_step_tokens_int16", lambda: count_step_tokens([labels, labels.short()]), T, "labels", r"torch\.int16"),
    ("all_reduce_token_count_int", lambda: all_reduce_token_count(3), T, "num_tokens", "int"),
    ("megatron_loss_mask_list", lambda: megatron_loss_func([1, 0], torch.ones(2)), T, "loss_mask", "list of 2"),
    ("megatron_output_list", lambda: megatron_loss_func(torch.ones(2), [1.0, 2.0]), T, "output_tensor", "list of 2"),
]


@pytest.mark.parametrize("call, exc, arg, came", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misuse_names_the_argument_and_what_came(call, exc, arg, came):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert info.type is exc, f"expected exactly {exc.__name__}, got {info.type.__name__}: {message}"
    assert re.match(rf"{arg}(?!\w)", message), f"message does not open with {arg!r}: {message}"
    assert "expected" in message, message
    assert re.search(came, message.split("got", 1)[-1]), f"{came!r} not shown: {message}"


def test_argument_type_error_is_a_type_error_and_a_value_error():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


# ---------------------------------------------------------------------------- what stays accepted


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_int64_and_int32_labels_accepted_everywhere(dtype):
    lab = labels.to(dtype)
    ref = linear_cross_entropy(h, w, labels)
    torch.testing.assert_close(linear_cross_entropy(h, w, lab), ref)
    linear_kd_loss(h, w, th, tw, lab)
    linear_distillation_loss(h, w, th, tw, lab)
    torch.testing.assert_close(linear_log_probs(h, w, lab), linear_log_probs(h, w, labels))
    CEWithChunkedOutputLoss(2)(chunks, lab)
    ForwardKLWithChunkedOutputLoss(2)(chunks, tchunks, lab)
    assert int(count_valid_tokens(lab)) == int(count_valid_tokens(labels))


def test_numbers_of_any_real_type_are_accepted_for_float_options():
    """ints and numpy floats (YAML / numpy configs) are fine: only bool, str, nan and inf are refused."""
    a = linear_kd_loss(h, w, th, tw, labels, options=KDOptions(temperature=2))
    b = linear_kd_loss(h, w, th, tw, labels, options=KDOptions(temperature=np.float64(2.0)))
    torch.testing.assert_close(a, b)
    LinearDistillationLoss(kd_ratio=1, temperature=np.float32(1.5))
    CEWithChunkedOutputLoss(2, label_smoothing=0, z_loss=1e-4, softcap=30)
    KDOptions(beta=0, sym_kd_ratio=1)


def test_validate_false_lets_kd_labels_through_without_a_check():
    """The range check is the one host sync; validate=False skips it (a label of -1 then counts)."""
    out = linear_kd_loss(h, w, th, tw, minus_one, reduction="sum", options=KDOptions(validate=False))
    ref = linear_kd_loss(h, w, th, tw, minus_one.masked_fill(minus_one == -1, 0), reduction="sum")
    torch.testing.assert_close(out, ref)
    ForwardKLWithChunkedOutputLoss(2, validate=False)(chunks, tchunks, minus_one)


def test_empty_inputs_give_zero():
    """No token at all (S = 0 or B = 0) is a batch without valid tokens: 0, not an error."""
    assert linear_cross_entropy(h[:, :0], w, labels[:, :0]).item() == 0.0
    assert linear_kd_loss(h[:0], w, th[:0], tw, labels[:0]).item() == 0.0
    assert CEWithChunkedOutputLoss(2)([c[:, :0] for c in chunks], labels[:, :0]).item() == 0.0
