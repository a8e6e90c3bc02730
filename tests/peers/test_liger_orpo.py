"""Liger-Kernel's ORPO test file, adapted to call our ``linear_preference_loss(loss_type="orpo")``.

Adapted from Liger-Kernel (BSD-2-Clause) ``test/chunked_loss/test_orpo_loss.py``: both tests, every
case (24), their inputs (with ``nll_target``: the NLL term on other labels than the preference
labels), their torch reference (tests/peers/liger_preference_reference.py) and tolerances. ORPO's NLL
is always on (weight 1, as Liger's); Liger's logged odds-ratio means are not compared (we do not
return them). The functional test compares ours with the reference under the functional's defaults
(no ignored token, beta 0.1). See tests/peers/liger_harness.py for the comparison and the fast / slow
/ ``TUNE_LOSSES_PEER_FULL`` split.
"""

from __future__ import annotations

import pytest
import torch
from liger_harness import check_case, make_inputs, parametrize_cases
from liger_preference_reference import orpo_pair_loss

BIG_SHAPES = [(8, 128, 1024, 4096), (3, 47, 31, 123)]
SMALL_SHAPES = [(2, 2, 8, 8), (3, 47, 31, 123)]
DTYPES = [(1.0, torch.bfloat16, 5e-2, 5e-1), (1.0, torch.float32, 1e-5, 5e-4)]
ODD = (3, 47, 31, 123)


@pytest.mark.parametrize(
    "c",
    parametrize_cases(
        lambda c: c["shape"] == ODD and c["bias"],
        BIG_SHAPES[0],
        shape=BIG_SHAPES,
        dtype=DTYPES,
        bias=[True, False],
        ii_beta=[(-100, 0.1), (42, 0.2)],
    ),
)
def test_correctness(c):
    torch.manual_seed(42)
    B, T, H, V = c["shape"]
    scalar, dtype, atol, rtol = c["dtype"]
    ignore_index, beta = c["ii_beta"]
    inputs = make_inputs(B, T, H, V, dtype, scalar, c["bias"], use_ref=False, ignore_index=ignore_index)
    nll_target = torch.randint(0, V, (2 * B, T))
    check_case(
        orpo_pair_loss(beta),
        dict(loss_type="orpo"),
        inputs,
        atol=atol,
        rtol=rtol,
        beta=beta,
        ignore_index=ignore_index,
        nll_target=nll_target,
    )


@pytest.mark.parametrize(
    "c",
    parametrize_cases(
        lambda c: c["shape"] == ODD and c["bias"], None, shape=SMALL_SHAPES, dtype=DTYPES, bias=[True, False]
    ),
)
def test_correctness_functional(c):
    torch.manual_seed(42)
    B, T, H, V = c["shape"]
    scalar, dtype, atol, rtol = c["dtype"]
    inputs = make_inputs(B, T, H, V, dtype, scalar, c["bias"], use_ref=False, ignore=False)
    check_case(orpo_pair_loss(0.1), dict(loss_type="orpo"), inputs, atol=atol, rtol=rtol, beta=0.1, check_aux=False)
