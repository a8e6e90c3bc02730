"""Liger-Kernel's SimPO test file, adapted to call our ``linear_preference_loss(loss_type="simpo")``.

Adapted from Liger-Kernel (BSD-2-Clause) ``test/chunked_loss/test_simpo_loss.py``: both tests, every
case (40), their inputs, their torch reference (Liger's CPO reference with ``loss_type="simpo"``:
tests/peers/liger_preference_reference.py) and tolerances. SimPO on mean log-probs, margin ``gamma``,
label smoothing, plus the chosen NLL (weight 1, on in Liger's module and reference). The functional
test compares ours with the reference under the functional's defaults (no ignored token, beta 0.1,
gamma 0.5, no NLL). See tests/peers/liger_harness.py for the comparison and the fast / slow /
``TUNE_LOSSES_PEER_FULL`` split.
"""

from __future__ import annotations

import pytest
import torch
from liger_harness import check_case, make_inputs, parametrize_cases
from liger_preference_reference import cpo_pair_loss

BIG_SHAPES = [(8, 128, 1024, 4096), (3, 47, 31, 123)]
SMALL_SHAPES = [(2, 2, 8, 8), (3, 47, 31, 123)]
ODD = (3, 47, 31, 123)


@pytest.mark.parametrize(
    "c",
    parametrize_cases(
        lambda c: c["shape"] == ODD and c["bias"] and c["label_smoothing"] > 0,
        BIG_SHAPES[0],
        shape=BIG_SHAPES,
        dtype=[(1.0, torch.bfloat16, 5e-3, 5e-3), (1.0, torch.float32, 1e-5, 5e-4)],
        bias=[True, False],
        ii_beta_gamma=[(-100, 0.1, 0.5), (42, 0.2, 0.85)],
        label_smoothing=[0.0, 0.1],
    ),
)
def test_correctness(c):
    torch.manual_seed(42)
    B, T, H, V = c["shape"]
    scalar, dtype, atol, rtol = c["dtype"]
    ignore_index, beta, gamma = c["ii_beta_gamma"]
    ls = c["label_smoothing"]
    inputs = make_inputs(B, T, H, V, dtype, scalar, c["bias"], use_ref=False, ignore_index=ignore_index)
    check_case(
        cpo_pair_loss(beta, ls, simpo_gamma=gamma),
        dict(loss_type="simpo", gamma=gamma, label_smoothing=ls, nll_weight=1.0),
        inputs,
        atol=atol,
        rtol=rtol,
        beta=beta,
        ignore_index=ignore_index,
        average_log_prob=True,
    )


@pytest.mark.parametrize(
    "c",
    parametrize_cases(
        lambda c: c["shape"] == ODD and c["bias"],
        None,
        shape=SMALL_SHAPES,
        dtype=[(1.0, torch.bfloat16, 5e-2, 5e-1), (1.0, torch.float32, 1e-5, 5e-4)],
        bias=[True, False],
    ),
)
def test_correctness_functional(c):
    torch.manual_seed(42)
    B, T, H, V = c["shape"]
    scalar, dtype, atol, rtol = c["dtype"]
    inputs = make_inputs(B, T, H, V, dtype, scalar, c["bias"], use_ref=False, ignore=False)
    check_case(
        cpo_pair_loss(0.1, simpo_gamma=0.5),
        dict(loss_type="simpo", gamma=0.5),
        inputs,
        atol=atol,
        rtol=rtol,
        beta=0.1,
        average_log_prob=True,
        compute_nll_loss=False,
        check_aux=False,
    )
