"""Each loss against a direct formula written independently of the implementation (float64 reference)."""

import math

import pytest
import torch

from kdistill.losses import distillation_loss, soft_loss, soft_targets


def _softmax64(z, T):
    z = z.double() / T
    z = z - z.max(dim=1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=1, keepdim=True)


def _log_softmax64(z, T):
    z = z.double() / T
    m = z.max(dim=1, keepdim=True).values
    return z - m - (z - m).exp().sum(dim=1, keepdim=True).log()


def reference(s, t, y, T, alpha, kind):
    p, log_p, log_q, q = _softmax64(t, T), _log_softmax64(t, T), _log_softmax64(s, T), _softmax64(s, T)
    if kind == "kl":
        # sum over classes of p (log p - log q), where p = 0 contributes 0; averaged over the batch
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        soft = T * T * terms.sum(1).mean()
    elif kind == "soft_ce":
        soft = T * T * (-(p * log_q).sum(1)).mean()
    elif kind == "logit_mse":
        soft = ((s.double() - t.double()) ** 2).mean()
    else:
        soft = ((q - p) ** 2).mean()
    if alpha == 1:
        return soft
    hard = -_log_softmax64(s, 1.0)[torch.arange(len(y)), y].mean()
    return alpha * soft + (1 - alpha) * hard


KINDS = ["kl", "soft_ce", "logit_mse", "prob_mse"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("T", [0.05, 1.0, 4.0, 20.0, 100.0])
@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.0])
def test_matches_formula(kind, scale, T, alpha):
    g = torch.Generator().manual_seed(int(scale) + int(T * 100) + int(alpha * 10))
    s = torch.randn(16, 10, generator=g) * scale
    t = torch.randn(16, 10, generator=g) * scale
    y = torch.randint(0, 10, (16,), generator=g)
    got = distillation_loss(s, t, y, temperature=T, alpha=alpha, kind=kind)
    want = reference(s, t, y, T, alpha, kind)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5 * max(1.0, abs(want.item())) + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite_and_only_to_student(kind):
    s = (torch.randn(8, 10) * 1e4).requires_grad_()
    t = (torch.randn(8, 10) * 1e4).requires_grad_()
    loss = distillation_loss(s, t, torch.randint(0, 10, (8,)), temperature=0.05, alpha=0.5, kind=kind)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kl_is_zero_for_identical_logits_and_batchmean():
    z = torch.randn(32, 10)
    assert soft_loss(z, z.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    # batchmean: duplicating the batch leaves the value unchanged (a plain "mean" would divide by classes too)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    one = soft_loss(s, t, temperature=2.0)
    two = soft_loss(torch.cat([s, s]), torch.cat([t, t]), temperature=2.0)
    assert one.item() == pytest.approx(two.item(), rel=1e-6)
    manual = 4.0 * (_softmax64(t, 2) * (_log_softmax64(t, 2) - _log_softmax64(s, 2))).sum(1).mean()
    assert one.item() == pytest.approx(manual.item(), rel=1e-5)


def test_soft_ce_and_kl_share_gradients():
    s = torch.randn(8, 10, requires_grad=True)
    t = torch.randn(8, 10)
    g1 = torch.autograd.grad(soft_loss(s, t, temperature=5.0, kind="kl"), s)[0]
    g2 = torch.autograd.grad(soft_loss(s, t, temperature=5.0, kind="soft_ce"), s)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_t_squared_keeps_gradient_scale():
    # At high T the T^2-scaled soft gradient approaches (s - t) / C (logit matching), independent of T.
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    g = torch.autograd.grad(soft_loss(s, t, temperature=1000.0), s)[0]
    s0, t0 = s.detach() - s.detach().mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    assert torch.allclose(g, (s0 - t0) / 10 / 4, atol=1e-3)


def test_soft_targets_rows_sum_to_one_and_flatten_with_T():
    z = torch.tensor([[5.0, 1.0, -3.0]])
    p1, p20 = soft_targets(z, 1.0), soft_targets(z, 20.0)
    assert torch.allclose(p1.sum(1), torch.ones(1)) and p20.max() < p1.max()
    assert math.isclose(float(p1[0, 0]), math.exp(5) / (math.exp(5) + math.exp(1) + math.exp(-3)), rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0, "alpha": 1.0}, "temperature"),
        ({"temperature": -1.0, "alpha": 1.0}, "temperature"),
        ({"temperature": 1.0, "alpha": 1.5}, "alpha"),
        ({"temperature": 1.0, "alpha": -0.1}, "alpha"),
        ({"temperature": 1.0, "alpha": 1.0, "kind": "bogus"}, "kind"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)


def test_rejects_shape_mismatch_and_missing_labels():
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4), temperature=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), None, temperature=1.0, alpha=0.5)
    # labels are not needed for pure distillation
    assert torch.isfinite(distillation_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=2.0, alpha=1.0))
