"""Options travel as objects (CEOptions, KDOptions, DistillationOptions, VocabParallelOptions,
ExecutionOptions); the old flat keyword arguments keep working with a DeprecationWarning that names
the new form, and give the same results; saying one thing twice is an error."""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch
from reference import make_labels

import tune_losses as tl
from tune_losses import (
    CEOptions,
    DistillationOptions,
    ExecutionOptions,
    KDOptions,
    VocabParallelOptions,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_kd_loss,
    linear_log_probs,
)
from tune_losses.deprecation import PREFIX, TuneLossesDeprecationWarning


def _inputs(seed=0, n=13, hdim=8, vocab=31):
    g = torch.Generator().manual_seed(seed)
    h, th = torch.randn(n, hdim, generator=g), torch.randn(n, hdim, generator=g)
    w, tw = torch.randn(vocab, hdim, generator=g) / 3, torch.randn(vocab, hdim, generator=g) / 3
    labels = make_labels((n,), vocab, "some", g)
    return h, w, th, tw, labels


def test_public_functions_take_about_twelve_parameters():
    fns = (linear_cross_entropy, linear_log_probs, linear_kd_loss, linear_distillation_loss)
    for fn in fns + (tl.linear_sparse_kd_loss, tl.linear_sparse_distillation_loss):
        named = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        assert len(named) <= 14, (fn.__name__, len(named))


def test_flat_ce_options_warn_and_match_the_object_form():
    h, w, _, _, labels = _inputs()
    new = linear_cross_entropy(
        h, w, labels, options=CEOptions(label_smoothing=0.1, z_loss=1e-3), execution=ExecutionOptions("recompute")
    )
    with pytest.warns(DeprecationWarning) as record:  # one warning per options object
        old = linear_cross_entropy(h, w, labels, label_smoothing=0.1, z_loss=1e-3, algorithm="recompute")
    messages = sorted(str(r.message) for r in record)
    assert "pass execution=ExecutionOptions(algorithm=...)" in messages[0]
    assert "pass options=CEOptions(label_smoothing=, z_loss=...)" in messages[1]
    assert all(m.startswith(PREFIX) for m in messages)
    assert all(r.category is TuneLossesDeprecationWarning and r.filename == __file__ for r in record)
    torch.testing.assert_close(old, new)


def test_flat_kd_and_distillation_options_warn_and_match():
    h, w, th, tw, labels = _inputs(1)
    kd = KDOptions("jsd", temperature=2.0, beta=0.3, ignore_index=-100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the object form warns nothing
        new_kd = linear_kd_loss(h, w, th, tw, labels, options=kd)
        new = linear_distillation_loss(h, w, th, tw, labels, options=DistillationOptions(0.3, kd))
    with pytest.warns(DeprecationWarning, match="options=KDOptions"):
        old_kd = linear_kd_loss(h, w, th, tw, labels, divergence="jsd", temperature=2.0, beta=0.3)
    with pytest.warns(DeprecationWarning, match="options=DistillationOptions"):
        old = linear_distillation_loss(h, w, th, tw, labels, kd_ratio=0.3, divergence="jsd", temperature=2.0, beta=0.3)
    torch.testing.assert_close(old_kd, new_kd)
    torch.testing.assert_close(old.loss, new.loss)


def test_flat_vocab_parallel_arguments_become_one_object():
    h, w, _, _, labels = _inputs(2)
    with pytest.warns(DeprecationWarning, match=r"parallel=VocabParallelOptions\(vocab_parallel="):
        old = linear_log_probs(h, w, labels, vocab_parallel=False)
    new = linear_log_probs(h, w, labels, parallel=VocabParallelOptions(vocab_parallel=False))
    torch.testing.assert_close(old, new)


def test_saying_one_thing_twice_or_wrongly_raises():
    h, w, th, tw, labels = _inputs(3)
    with pytest.raises(TypeError, match="label_smoothing= and options= both given"):
        linear_cross_entropy(h, w, labels, options=CEOptions(), label_smoothing=0.1)
    with pytest.raises(ValueError, match="ignore_index"):
        linear_cross_entropy(h, w, labels, ignore_index=0, options=CEOptions(ignore_index=-100))
    with pytest.raises(TypeError, match="options: expected a KDOptions"):
        linear_kd_loss(h, w, th, tw, labels, options=CEOptions())
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        linear_cross_entropy(h, w, labels, label_smothing=0.1)
    with pytest.raises(ValueError, match="vocab_start"):
        VocabParallelOptions(vocab_start=-1)
    with pytest.raises(ValueError, match="algorithm"):
        ExecutionOptions("fast")
    with pytest.raises(ValueError, match=r"ce.ignore_index: expected -1"):
        DistillationOptions(kd=KDOptions(ignore_index=-1), ce=CEOptions(ignore_index=-100))


def test_flat_ignore_index_of_cross_entropy_is_a_common_argument():
    h, w, _, _, labels = _inputs(4)
    labels = labels.masked_fill(labels == -100, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = linear_cross_entropy(h, w, labels, ignore_index=0)
    b = linear_cross_entropy(h, w, labels, options=CEOptions(ignore_index=0))
    torch.testing.assert_close(a, b)


def test_new_options_are_exported():
    names = ("CEOptions", "KDOptions", "DistillationOptions", "ExecutionOptions", "VocabParallelOptions")
    for name in names + ("SparseKDOptions", "SparseDistillationOptions"):
        assert name in tl.__all__


@pytest.mark.parametrize("form", ["objects", "flat"])
@pytest.mark.parametrize("fn", ["kd", "distillation", "sparse_kd", "sparse_distillation"])
def test_each_argument_is_checked_once_where_it_is_made(fn, form, option_checks):
    """Every scalar argument is checked once: an options object's fields when it is built (never again
    down the call), the call's own arguments in the call, and the deprecated flat keywords by the
    objects the call builds from them (so exactly what building those objects checks)."""
    h, w, th, tw, labels = _inputs(5)
    lp, ids = torch.log_softmax(torch.randn(*labels.shape, 31, generator=torch.Generator().manual_seed(6)), -1).topk(4)
    sparse, mix = fn.startswith("sparse"), fn.endswith("distillation")
    if sparse:
        term, kd_cls, mix_cls = dict(temperature=2.0, tail="bucket"), tl.SparseKDOptions, tl.SparseDistillationOptions
        call = functools.partial(
            tl.linear_sparse_distillation_loss if mix else tl.linear_sparse_kd_loss, h, w, labels, ids, lp
        )
    else:
        term, kd_cls, mix_cls = dict(divergence="jsd", temperature=2.0, beta=0.3), KDOptions, DistillationOptions
        call = functools.partial(linear_distillation_loss if mix else linear_kd_loss, h, w, th, tw, labels)
    flat = {**term, **(dict(kd_ratio=0.3, label_smoothing=0.1) if mix else {})}
    execution = ExecutionOptions("recompute")
    option_checks.clear()
    kd = kd_cls(**term)
    options = mix_cls(0.3, kd, CEOptions(label_smoothing=0.1)) if mix else kd
    made = set(option_checks)  # what building the objects checks
    option_checks.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if form == "flat" else "error")
        kw = flat if form == "flat" else dict(options=options)
        call(chunk_size=4, execution=execution, **kw)
    in_call = {"chunk_size", "reduction", "vocab_start", "vocab_size"}  # the call's own; parallel's defaults
    assert set(option_checks) == in_call | (made if form == "flat" else set()), option_checks
    # A flat distillation builds two term objects, each checking the call's ignore_index and validate
    # (the cross-entropy shares them): the only repeats, and only in the deprecated form.
    twice = {"ignore_index", "validate"} if (form, mix) == ("flat", True) else set()
    assert {k for k, n in option_checks.items() if n != 1} == twice, option_checks
