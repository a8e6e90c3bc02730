"""A divergence added as one class in one file (here: this test file), with no closed-form gradient:
its gradient comes from autograd over its elementwise terms. Checked against fp64 full logits
differentiated by autograd, through the fused losses and the chunked-output losses. The worked
example of CONTRIBUTING.md; also: every built-in divergence's closed form agrees with the autograd
path on the same chunk."""

from __future__ import annotations

import pytest
import torch
from fused_common import DIVERGENCE_CASES, case_id
from reference import DIVERGENCES, make_labels, ref_kd

from tune_losses import DivergenceWithChunkedOutputLoss, linear_kd_loss
from tune_losses.divergences import Divergence, divergence_names, divergence_terms, get_divergence
from tune_losses.divergences.base import _by_autograd
from tune_losses.options import KDOptions


class Hellinger(Divergence):
    """Squared Hellinger distance ``0.5 sum (sqrt p - sqrt q)^2``: a value only, no closed form."""

    name = "test_hellinger"

    def value(self, log_p, log_q, opts):
        return 0.5 * ((0.5 * log_p).exp() - (0.5 * log_q).exp()).square()


def test_the_class_definition_registers_it():
    assert "test_hellinger" in divergence_names()
    assert isinstance(get_divergence("test_hellinger"), Hellinger)
    assert "test_hellinger" not in DIVERGENCES  # the shared test matrix keeps the built-in ones
    KDOptions(divergence="test_hellinger")  # accepted by the options
    with pytest.raises(ValueError, match="divergence"):
        KDOptions(divergence="hellinger_typo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_fused_loss_with_an_autograd_divergence_matches_fp64(dtype, ignore):
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab, temperature = 37, 16, 29, 2.0
    h, th = torch.randn(n, hdim, generator=g), torch.randn(n, hdim, generator=g)
    w, tw = torch.randn(vocab, hdim, generator=g) / 4, torch.randn(vocab, hdim, generator=g) / 4
    labels = make_labels((n,), vocab, ignore, torch.Generator().manual_seed(1))
    x, wx = h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
    loss = linear_kd_loss(
        x,
        wx,
        th.to(dtype),
        tw.to(dtype),
        labels,
        chunk_size=8,
        options=KDOptions(divergence="test_hellinger", temperature=temperature),
    )
    loss.backward()
    xr, wr = h.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
    zt = th.to(dtype).double() @ tw.to(dtype).double().T
    ref = ref_kd(xr @ wr.T, zt, labels, divergence="test_hellinger", temperature=temperature)
    ref.backward()
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(wx.grad.double(), wr.grad, **tol)


def test_chunked_output_loss_with_an_autograd_divergence_matches_fp64():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(2, 9, 23, generator=g) * 2, torch.randn(2, 9, 23, generator=g) * 2
    zs[0, 1, 4] = zt[1, 2, 5] = float("-inf")  # masked entries count 0
    labels = make_labels((2, 9), 23, "some", torch.Generator().manual_seed(3))
    s = zs.clone().requires_grad_()
    loss = DivergenceWithChunkedOutputLoss(divergence="test_hellinger")(
        list(s.split([4, 5], dim=1)), list(zt.split([4, 5], dim=1)), labels
    )
    loss.backward()
    sr = zs.double().requires_grad_()
    ref = ref_kd(sr, zt.double(), labels, divergence="test_hellinger")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), sr.grad, rtol=1e-4, atol=1e-6)


# The shared matrix, and torchtune's forward-KL value (the cross-entropy) beside the true KL.
CLOSED_FORM_CASES = DIVERGENCE_CASES + [("forward_kl", {"true_kl": False})]


@pytest.mark.parametrize("divergence,extra", CLOSED_FORM_CASES, ids=[case_id(d, kw) for d, kw in CLOSED_FORM_CASES])
def test_builtin_closed_forms_agree_with_autograd_over_their_values(divergence, extra):
    """A closed form is an optimization of the generic path: same terms, same a and b."""
    g = torch.Generator().manual_seed(4)
    zs, zt = (
        torch.randn(5, 31, generator=g, dtype=torch.float64) * 2,
        torch.randn(5, 31, generator=g, dtype=torch.float64) * 2,
    )
    zs[0, 3] = zt[1, 6] = float("-inf")
    log_q, log_p = zs.log_softmax(-1), zt.log_softmax(-1)
    opts = KDOptions(divergence, **extra)
    terms, a, _, b, _ = divergence_terms(log_p.clone(), log_q.clone(), opts, True, True)
    terms_ag, a_ag, b_ag = _by_autograd(get_divergence(divergence), log_p, log_q, opts, True, True)
    # Masked entries (rows 0, 1): JSD keeps a side's finite part where the other is -inf, the
    # generic path counts the entry 0; elsewhere they agree.
    torch.testing.assert_close(terms[2:], terms_ag[2:])
    # a and b are defined up to c * q (c * p): what the chain rule uses is a - q sum(a). The closed
    # forms drop such terms using sum q = 1, which holds on rows without masked entries (2 onwards).
    q, p = log_q.exp()[2:], log_p.exp()[2:]
    a, a_ag, b, b_ag = a[2:], a_ag[2:], b[2:], b_ag[2:]
    torch.testing.assert_close(a - q * a.sum(-1, keepdim=True), a_ag - q * a_ag.sum(-1, keepdim=True))
    torch.testing.assert_close(b - p * b.sum(-1, keepdim=True), b_ag - p * b_ag.sum(-1, keepdim=True))
