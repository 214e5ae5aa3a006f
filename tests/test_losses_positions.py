"""Per-position losses (issue 29): (B, L, C) logits, -100 labels, masks, normalizer, divergence registry, chunking.

Every kind is checked against an independent float64 formula written here; the (B, C) case against a
copy of the code kdistill had before positions existed (bit for bit).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import kdistill.losses.divergences as divergences
from kdistill.losses import (
    LOSS_KINDS,
    distillation_loss,
    soft_loss,
    stacked_distillation_loss,
)

BUILTIN = ["kl", "reverse_kl", "jsd", "tv", "soft_ce", "logit_mse", "prob_mse"]
LEGACY = ["kl", "soft_ce", "logit_mse", "prob_mse"]


# --------------------------------------------------------------------------- independent references


def _probs64(z, T):
    """(softmax, log_softmax) of z / T in float64, by hand."""
    z = z.double() / T
    z = z - z.max(dim=-1, keepdim=True).values
    log_total = z.exp().sum(dim=-1, keepdim=True).log()
    return (z - log_total).exp(), z - log_total


def _xlogy_rows(a, log_a, log_b):
    """sum over classes of a (log a - log b), terms with a == 0 counted as 0."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def reference_rows(kind, s, t, T, beta=0.5):
    """Per-position value of ``kind``, float64, from textbook formulas."""
    q, log_q = _probs64(s, T)
    p, log_p = _probs64(t, T)
    if kind == "kl":
        return T * T * _xlogy_rows(p, log_p, log_q)
    if kind == "reverse_kl":
        return T * T * _xlogy_rows(q, log_q, log_p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        log_m = m.log()
        return T * T * (beta * _xlogy_rows(p, log_p, log_m) + (1 - beta) * _xlogy_rows(q, log_q, log_m))
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "soft_ce":
        return -T * T * (p * log_q).sum(-1)
    if kind == "logit_mse":
        return ((s.double() - t.double()) ** 2).mean(-1)
    assert kind == "prob_mse"
    return ((q - p) ** 2).mean(-1)


def reference_loss(kind, s, t, labels, mask, T, alpha, beta=0.5):
    valid = mask.bool() & (labels != -100)
    n = max(int(valid.sum()), 1)
    soft = reference_rows(kind, s, t, T, beta)[valid].sum() / n
    if alpha == 1:
        return soft
    log_r = _probs64(s, 1.0)[1]
    hard = -log_r[valid].gather(-1, labels[valid][:, None]).sum() / n
    return alpha * soft + (1 - alpha) * hard


def _sequence_batch(seed, b=3, l=6, c=9, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, l, c, generator=g) * scale
    t = torch.randn(b, l, c, generator=g) * scale
    labels = torch.randint(0, c, (b, l), generator=g)
    labels[:, 0] = -100  # a "prompt" token
    labels[0, 2] = -100
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[1, 4:] = False  # right padding
    mask[2, 5:] = False
    return s, t, labels, mask


# --------------------------------------------------------------------------- (B, C): unchanged bit for bit


def todays_distillation_loss(student_logits, teacher_logits, labels, *, temperature, alpha, kind):
    """A copy of kdistill's soft_loss + distillation_loss before issue 29 (commit 148aae1)."""
    out_dtype = student_logits.dtype
    s, t = student_logits.to(torch.float64), teacher_logits.detach().to(torch.float64)
    t2 = temperature * temperature
    if kind == "logit_mse":
        soft = F.mse_loss(s, t).to(out_dtype)
    else:
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        if kind == "kl":
            soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * t2
        elif kind == "soft_ce":
            soft = -(log_p.exp() * log_q).sum(dim=-1).mean() * t2
        else:
            soft = F.mse_loss(log_q.exp(), log_p.exp())
        soft = soft.to(out_dtype)
    if alpha == 1.0:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels).to(soft.dtype)
    return alpha * soft + (1.0 - alpha) * hard


@pytest.mark.parametrize("kind", LEGACY)
@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_batch_by_class_logits_give_exactly_todays_values_and_gradients(kind, alpha):
    g = torch.Generator().manual_seed(7)
    s0, t = torch.randn(16, 10, generator=g) * 5, torch.randn(16, 10, generator=g) * 5
    y = torch.randint(0, 10, (16,), generator=g)
    s1, s2 = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    got = distillation_loss(s1, t, y, temperature=3.0, alpha=alpha, kind=kind)
    want = todays_distillation_loss(s2, t, y, temperature=3.0, alpha=alpha, kind=kind)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(s1.grad, s2.grad)
    if alpha == 1.0:  # soft_loss alone, labels or not
        assert torch.equal(soft_loss(s0, t, temperature=3.0, kind=kind), want)
        assert torch.equal(soft_loss(s0, t, temperature=3.0, kind=kind, labels=y), want)


# --------------------------------------------------------------------------- each kind against its formula


@pytest.mark.parametrize("kind", BUILTIN)
@pytest.mark.parametrize("scale, T", [(1.0, 1.0), (3.0, 4.0), (1e4, 0.05), (1e4, 2.0)])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_each_kind_matches_float64_formula_over_valid_positions(kind, scale, T, alpha):
    s, t, labels, mask = _sequence_batch(int(scale) % 97 + int(T * 10), scale=scale)
    s.requires_grad_()
    got = distillation_loss(s, t, labels, mask=mask, temperature=T, alpha=alpha, kind=kind)
    want = reference_loss(kind, s.detach(), t, labels, mask, T, alpha)
    assert torch.isfinite(got) and got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    got.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_weights_the_teacher_side(beta):
    s, t, labels, mask = _sequence_batch(3)
    got = soft_loss(s, t, temperature=2.0, kind="jsd", labels=labels, mask=mask, beta=beta)
    want = reference_loss("jsd", s, t, labels, mask, 2.0, 1.0, beta=beta)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # swapping student and teacher is the same as swapping beta and 1 - beta
    swapped = soft_loss(t, s, temperature=2.0, kind="jsd", labels=labels, mask=mask, beta=1 - beta)
    assert swapped.item() == pytest.approx(got.item(), rel=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl_as_in_trl():
    s, t, labels, mask = _sequence_batch(4)
    kw = dict(temperature=2.0, labels=labels, mask=mask)
    assert torch.equal(soft_loss(s, t, kind="jsd", beta=0.0, **kw), soft_loss(s, t, kind="kl", **kw))
    assert torch.equal(soft_loss(s, t, kind="jsd", beta=1.0, **kw), soft_loss(s, t, kind="reverse_kl", **kw))
    half = soft_loss(s, t, kind="jsd", beta=0.5, temperature=1.0, labels=labels, mask=mask)
    assert 0 < half.item() <= math.log(2)


def test_tv_is_a_bounded_distance():
    s, t, labels, mask = _sequence_batch(5, scale=1e4)
    assert 0 < soft_loss(s, t, temperature=1.0, kind="tv", labels=labels, mask=mask).item() <= 1.0
    assert soft_loss(s, s.clone(), temperature=1.0, kind="tv", labels=labels, mask=mask).item() == 0.0


# --------------------------------------------------------------------------- which positions count


def test_masked_and_ignored_positions_do_not_count():
    s, t, labels, mask = _sequence_batch(6)
    base = distillation_loss(s, t, labels, mask=mask, temperature=2.0, alpha=0.5)
    s2, t2 = s.clone(), t.clone()
    invalid = ~mask | (labels == -100)
    s2[invalid] = torch.randn(int(invalid.sum()), s.shape[-1]) * 100
    t2[invalid] = torch.randn(int(invalid.sum()), s.shape[-1]) * 100
    assert torch.equal(distillation_loss(s2, t2, labels, mask=mask, temperature=2.0, alpha=0.5), base)
    # an int 0/1 mask is the same as a bool one; no valid position at all gives 0, not NaN
    assert torch.equal(distillation_loss(s, t, labels, mask=mask.int(), temperature=2.0, alpha=0.5), base)
    empty = distillation_loss(s, t, torch.full_like(labels, -100), temperature=2.0, alpha=0.5)
    assert empty.item() == 0.0


def test_soft_term_without_labels_uses_the_mask_only():
    s, t, labels, mask = _sequence_batch(8)
    got = soft_loss(s, t, temperature=2.0, mask=mask)
    want = reference_loss("kl", s, t, torch.zeros_like(labels), mask, 2.0, 1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_minus_100_labels_in_batch_by_class_logits_drop_those_rows():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, -100, 3, -100, 4])
    got = distillation_loss(s, t, y, temperature=2.0, alpha=0.3)
    keep = y != -100
    want = distillation_loss(s[keep], t[keep], y[keep], temperature=2.0, alpha=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("kind", BUILTIN)
def test_chunked_soft_term_has_the_unchunked_value_and_gradient(kind):
    s, t, labels, mask = _sequence_batch(10, b=3, l=7, c=50)
    small = 50 * 8 * 8 * 4  # 4 positions per chunk: 6 chunks, the last one short
    grads, values = [], []
    for chunk_bytes in (None, small):
        z = s.clone().requires_grad_()
        loss = distillation_loss(z, t, labels, mask=mask, temperature=3.0, alpha=0.8, kind=kind,
                                 chunk_bytes=chunk_bytes)
        (2.5 * loss).backward()
        values.append(loss.detach())
        grads.append(z.grad)
    assert values[1].item() == pytest.approx(values[0].item(), rel=1e-6)
    # float32 math on the positions path: chunked and whole differ by float32 rounding (max |grad| here ~0.05)
    assert torch.allclose(grads[1], grads[0], rtol=1e-6, atol=1e-8)
    assert grads[0].abs().sum() > 0
    with torch.no_grad():  # the no-grad path chunks too
        kw = dict(temperature=3.0, kind=kind, labels=labels, mask=mask)
        chunked, whole = soft_loss(s, t, chunk_bytes=small, **kw), soft_loss(s, t, chunk_bytes=None, **kw)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("scale, T", [(1.0, 1.0), (3.0, 4.0), (1e4, 0.05), (1e4, 2.0)])
def test_written_out_gradient_matches_float64_autograd(kind, scale, T):
    """kl and soft_ce take their per-position gradient from a formula (T (q - p), float32): it must equal
    autograd through the float64 reference, huge logits and huge garbage at invalid positions included."""
    s, t, labels, mask = _sequence_batch(int(scale) % 89 + int(T * 10), b=4, l=40, c=33, scale=scale)
    invalid = ~mask | (labels == -100)
    s[invalid], t[invalid] = 1e30, -1e30  # padding garbage must not leak
    z = s.clone().requires_grad_()
    loss = distillation_loss(z, t, labels, mask=mask, temperature=T, alpha=0.6, kind=kind, chunk_bytes=33 * 8 * 8 * 7)
    loss.backward()
    z64 = torch.where(invalid[..., None], 0.0, s).double().requires_grad_()
    want = reference_loss(kind, z64, torch.where(invalid[..., None], 0.0, t).double(), labels, mask, T, 0.6)
    want.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert torch.equal(z.grad[invalid], torch.zeros_like(z.grad[invalid]))
    # float32 rounding of probabilities: absolute error ~1e-7 of the largest gradient entry
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6 * z64.grad.abs().max().item())


# --------------------------------------------------------------------------- accumulation invariance


def _padded(seqs, idx):
    """Right-pad the sequences ``idx`` to their own longest: (features, teacher, labels, mask)."""
    length = max(seqs[i][0].shape[0] for i in idx)
    h, c = seqs[0][0].shape[1], seqs[0][1].shape[1]
    x = torch.zeros(len(idx), length, h)
    t = torch.randn(len(idx), length, c) * 50  # garbage at padding: must not count
    y = torch.full((len(idx), length), -100)
    m = torch.zeros(len(idx), length, dtype=torch.bool)
    for row, i in enumerate(idx):
        xi, ti, yi = seqs[i]
        n = xi.shape[0]
        x[row, :n], t[row, :n], y[row, :n], m[row, :n] = xi, ti, yi, True
    return x, t, y, m


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["kl", "jsd", "logit_mse"])
def test_microbatches_with_whole_batch_normalizer_add_up_to_the_whole_batch(k, kind):
    g = torch.Generator().manual_seed(100 + k)
    h, c = 5, 11
    lengths = [7, 2, 5, 9, 3, 6, 1, 4]
    seqs = []
    for n in lengths:
        y = torch.randint(0, c, (n,), generator=g)
        y[: n // 3] = -100  # prompt tokens
        seqs.append((torch.randn(n, h, generator=g), torch.randn(n, c, generator=g), y))
    weight = torch.randn(h, c, generator=g, requires_grad=True)

    def loss(idx, normalizer=None):
        x, t, y, m = _padded(seqs, idx)
        return distillation_loss(x @ weight, t, y, mask=m, temperature=2.0, alpha=0.7, kind=kind,
                                 normalizer=normalizer, chunk_bytes=c * 8 * 8 * 5)

    whole = loss(list(range(len(seqs))))
    (g_whole,) = torch.autograd.grad(whole, weight)
    total = sum(int((y != -100).sum()) for _, _, y in seqs)
    parts = [p.tolist() for p in torch.tensor_split(torch.arange(len(seqs)), k)]
    summed = sum(loss(p, normalizer=torch.tensor(float(total))) for p in parts)
    (g_summed,) = torch.autograd.grad(summed, weight)
    assert summed.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(g_summed, g_whole, rtol=1e-5, atol=1e-7)
    if k > 1:  # without the normalizer, averaging micro-batch means does not give the whole batch
        naive = sum(loss(p) for p in parts) / k
        assert abs(naive.item() - whole.item()) > 1e-4


# --------------------------------------------------------------------------- registry and bad input


def test_loss_kinds_is_the_registry_and_a_new_kind_is_one_function():
    assert tuple(LOSS_KINDS) == tuple(divergences.REGISTRY) and set(BUILTIN) <= set(LOSS_KINDS)
    assert LOSS_KINDS == tuple(divergences.REGISTRY)

    @divergences.register("test_l1", scale=1.0)
    def l1(s, t, temperature, scale):
        return scale * (s - t).abs().mean(-1)

    try:
        assert "test_l1" in LOSS_KINDS
        s, t, labels, mask = _sequence_batch(11)
        got = soft_loss(s, t, temperature=1.0, kind="test_l1", labels=labels, mask=mask, scale=2.0)
        valid = mask & (labels != -100)
        assert got.item() == pytest.approx((2 * (s - t).abs().mean(-1))[valid].mean().item(), rel=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            divergences.register("test_l1")(l1)
    finally:
        del divergences.REGISTRY["test_l1"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "jsd", "beta": 1.5}, "beta"),
        ({"kind": "kl", "beta": 0.5}, "beta: not an option of kind 'kl'"),
        ({"kind": "nope"}, "kind"),
        ({"normalizer": 0}, "normalizer"),
        ({"normalizer": torch.ones(2)}, "normalizer"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, "mask shape"),
        ({"labels": torch.zeros(3, 5, dtype=torch.long)}, "labels shape"),
        ({"labels": torch.zeros(3, 6)}, "integer"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
    ],
)
def test_bad_arguments_get_one_clear_error(kwargs, match):
    s, t = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    with pytest.raises(ValueError, match=match):
        soft_loss(s, t, temperature=1.0, **kwargs)


def test_stacked_losses_refuse_kinds_they_do_not_implement():
    with pytest.raises(ValueError, match="multi-student"):
        stacked_distillation_loss(torch.randn(2, 3, 5), torch.randn(3, 5), temperature=1.0, alpha=1.0, kind="jsd")


@pytest.mark.parametrize("shape", [(5, 9), (3, 6, 9)])
def test_float64_logits_give_the_mixed_loss_to_float64_precision(shape):
    """alpha * T^2 KL + (1 - alpha) * CE over valid positions, all in float64: the hard term too (it was
    computed in float32, 1e-8 relative off a float64 reference)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * 4
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if len(shape) == 3:
        y[0, 2:] = -100
    T, a = 2.5, 0.3
    keep = y != -100
    q, log_q = _probs64(s[keep], T)
    p, log_p = _probs64(t[keep], T)
    ce = -torch.log_softmax(s[keep], -1).gather(-1, y[keep][:, None]).mean()
    want = a * T * T * (p * (log_p - log_q)).sum(-1).mean() + (1 - a) * ce
    got = distillation_loss(s, t, y, temperature=T, alpha=a)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(float(want), rel=1e-12)
