"""Sparse (top-k + tail) teacher targets: the loss against an independent float64 formula, k = V against the
dense loss, masks, huge logits, temperatures, and the storage (dtypes, bytes)."""

import math

import pytest
import torch

from kdistill.losses import hard_loss, soft_loss
from kdistill.losses.sparse import (SparseTargets, index_dtype, sparse_distillation_loss, sparse_distillation_terms,
                                    sparse_soft_loss, sparsify)


def _reference_kl(s, targets: SparseTargets, labels, T):
    """T^2 KL between the (k+1)-bucket distributions, written out per position in float64 from the stored
    numbers, with Python loops (no shared code with the implementation)."""
    b, l, v = s.shape
    total, count = 0.0, 0
    for i in range(b):
        for j in range(l):
            if labels[i, j] == -100:
                continue
            count += 1
            vals = targets.values[i, j].double().tolist()
            idx = [int(c) for c in targets.indices[i, j].long().tolist()]
            a = [x / T for x in vals]
            k = len(idx)
            if k < v:
                a.append(float(targets.tail[i, j]) / T + (1 - 1 / T) * math.log(v - k))
            z = max(a)
            lse = z + math.log(sum(math.exp(x - z) for x in a))
            p = [math.exp(x - lse) for x in a]
            row = [float(x) / T for x in s[i, j].double()]
            m = max(row)
            slse = m + math.log(sum(math.exp(x - m) for x in row))
            q = [math.exp(row[c] - slse) for c in idx]
            if k < v:
                q.append(sum(math.exp(row[c] - slse) for c in range(v) if c not in set(idx)))
            total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)
    return T * T * total / max(count, 1)


def _data(b=3, l=5, v=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, l, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, l, v, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, v, (b, l), generator=g)
    y[0, 3:] = -100
    y[2, 0] = -100
    return s, t, y


@pytest.mark.parametrize("k,T", [(1, 1.0), (4, 1.0), (4, 2.5), (10, 0.7), (11, 3.0)])
def test_sparse_kl_matches_a_float64_formula_with_padding(k, T):
    s, t, y = _data()
    targets = sparsify(t, k)
    got = sparse_soft_loss(s, targets, temperature=T, labels=y)
    assert float(got) == pytest.approx(_reference_kl(s, targets, y, T), rel=1e-9, abs=1e-12)


def test_k_equal_to_vocabulary_is_the_dense_loss():
    s, t, y = _data(v=13)
    for kind in ("kl", "reverse_kl", "jsd", "tv", "soft_ce"):
        for T in (1.0, 2.0):
            dense = soft_loss(s, t, temperature=T, labels=y, kind=kind)
            exact = sparse_soft_loss(s, sparsify(t, 13, torch.float32), temperature=T, labels=y, kind=kind)
            half = sparse_soft_loss(s, sparsify(t, 13), temperature=T, labels=y, kind=kind)
            assert float(exact) == pytest.approx(float(dense), rel=1e-6), (kind, T)
            assert float(half) == pytest.approx(float(dense), rel=1e-2, abs=1e-4), (kind, T)


def test_at_t1_the_tail_bucket_makes_the_sparse_kl_a_lower_bound_and_close():
    s, t, y = _data(v=50, scale=2.0)
    dense = float(soft_loss(s, t, temperature=1.0, labels=y))
    sparse = [float(sparse_soft_loss(s, sparsify(t, k, torch.float64), temperature=1.0, labels=y))
              for k in (1, 5, 20, 49)]
    assert all(x <= dense + 1e-9 for x in sparse)  # merging classes lowers a divergence
    assert sparse == sorted(sparse)  # more classes kept: closer to the dense value
    assert sparse[-1] == pytest.approx(dense, rel=1e-3)


def test_huge_logits_give_finite_values_and_gradients():
    s, t, y = _data(v=9, scale=1.0)
    s = (s * 1e4).requires_grad_(True)
    targets = sparsify(t * 1e5, 3)
    assert torch.isfinite(targets.values.float()).all() and torch.isfinite(targets.tail.float()).all()
    loss = sparse_distillation_loss(s, targets, y, temperature=2.0, alpha=0.5, kind="jsd", beta=0.3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert float(sparse_soft_loss(t * 1e5, targets, temperature=1.0, labels=y)) == pytest.approx(0.0, abs=1e-6)


def test_mask_and_whole_batch_normaliser_as_the_dense_path():
    s, t, y = _data(b=4)
    targets = sparsify(t, 4)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, :2] = False
    whole = sparse_soft_loss(s, targets, temperature=2.0, labels=y, mask=mask)
    n = int(((y != -100) & mask).sum())
    halves = sum(sparse_soft_loss(s[i:i + 2], SparseTargets(targets.values[i:i + 2], targets.indices[i:i + 2],
                                                            targets.tail[i:i + 2], 11),
                                  temperature=2.0, labels=y[i:i + 2], mask=mask[i:i + 2], normalizer=n)
                 for i in (0, 2))
    assert float(halves) == pytest.approx(float(whole), rel=1e-12)
    assert float(sparse_soft_loss(s, targets, temperature=2.0, labels=torch.full_like(y, -100))) == 0.0


def test_chunked_gradient_equals_one_piece():
    s, t, y = _data(b=4, l=7, v=30)
    targets = sparsify(t, 6)
    grads = []
    for chunk in (None, 30 * 8 * 8 * 3):  # one piece; 3 rows per chunk
        z = s.clone().requires_grad_(True)
        sparse_soft_loss(z, targets, temperature=1.5, labels=y, chunk_bytes=chunk).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_storage_dtypes_and_bytes():
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(32768) == torch.int16 and index_dtype(32769) == torch.int32
    targets = sparsify(torch.randn(2, 3, 1000), 32)
    assert targets.values.dtype == torch.float16 and targets.indices.dtype == torch.int16
    assert targets.bytes_per_position() == 32 * (2 + 2) + 2


def test_refusals_name_the_fix():
    s, t, y = _data()
    with pytest.raises(ValueError, match="kind: 'logit_mse' compares every class"):
        sparse_soft_loss(s, sparsify(t, 3), temperature=1.0, kind="logit_mse")
    with pytest.raises(ValueError, match="share a vocabulary"):
        sparse_soft_loss(s[..., :10], sparsify(t, 3), temperature=1.0)
    with pytest.raises(ValueError, match="k: the number of classes kept"):
        sparsify(t, 12)


def _bucket_kl_autograd(s, targets: SparseTargets, labels, T):
    """The same T^2 bucket KL written with plain float64 autograd ops (masks by index lists, no chunking),
    to check the written-out gradient of the kl/soft_ce path."""
    v, k = s.shape[-1], targets.k
    rows = s.reshape(-1, v)
    keep = (labels.reshape(-1) != -100).nonzero().flatten().tolist()
    total = s.new_zeros(())
    for r in keep:
        idx = targets.indices.reshape(-1, k)[r].long()
        a = targets.values.reshape(-1, k)[r].double() / T
        if k < v:
            a = torch.cat([a, (targets.tail.reshape(-1)[r].double() / T + (1 - 1 / T) * math.log(v - k)).reshape(1)])
        log_p = a - torch.logsumexp(a, 0)
        log_q_all = torch.log_softmax(rows[r] / T, 0)
        others = torch.ones(v, dtype=torch.bool)
        others[idx] = False
        log_q = log_q_all[idx]
        if k < v:
            log_q = torch.cat([log_q, torch.logsumexp(log_q_all[others], 0).reshape(1)])
        total = total + (log_p.exp() * (log_p - log_q)).sum()
    return T * T * total / max(len(keep), 1)


@pytest.mark.parametrize("k,T,dtype", [(1, 1.0, torch.float64), (4, 2.5, torch.float64), (11, 3.0, torch.float64),
                                       (5, 0.7, torch.float32)])
def test_written_out_bucket_gradient_matches_float64_autograd_with_garbage_at_padding(k, T, dtype):
    s, t, y = _data()
    s[0, 4] = float("nan")  # padding (label -100): must not reach the loss or the gradient
    s[2, 0] = float("inf")
    targets = sparsify(t, k)
    z = s.clone().to(dtype).requires_grad_(True)
    sparse_soft_loss(z, targets, temperature=T, labels=y, chunk_bytes=11 * 8 * 8 * 2).backward()
    ref_in = torch.where((y != -100).unsqueeze(-1), s, 0.0).requires_grad_(True)
    _bucket_kl_autograd(ref_in, targets, y, T).backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(z.grad.double(), ref_in.grad, rtol=tol, atol=tol)
    assert bool((z.grad[y == -100] == 0).all())


@pytest.mark.parametrize("kind", ["jsd", "reverse_kl", "tv"])
def test_autograd_kinds_keep_padding_garbage_out_of_the_gradient(kind):
    s, t, y = _data()
    s[0, 4], t[2, 0] = float("nan"), float("inf")
    for teacher in (t, sparsify(t.nan_to_num(), 4)):
        z = s.clone().requires_grad_(True)
        if isinstance(teacher, SparseTargets):
            loss = sparse_soft_loss(z, teacher, temperature=2.0, labels=y, kind=kind)
        else:
            loss = soft_loss(z, teacher, temperature=2.0, labels=y, kind=kind)
        loss.backward()
        assert math.isfinite(float(loss)) and bool(torch.isfinite(z.grad).all())
        assert bool((z.grad[y == -100] == 0).all())


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("k,T,alpha", [(4, 2.5, 0.3), (11, 1.0, 0.5), (6, 0.7, 0.0)])
def test_one_pass_mix_equals_the_two_terms_apart(kind, k, T, alpha):
    """alpha * soft + (1 - alpha) * CE from one pass per chunk: value, CE term and gradient equal the terms
    computed apart (float64), garbage at padding included."""
    s, t, y = _data()
    s[0, 4] = float("nan")
    targets = sparsify(t, k)
    z = s.clone().requires_grad_(True)
    loss, hard = sparse_distillation_terms(z, targets, y, temperature=T, alpha=alpha, kind=kind,
                                           chunk_bytes=11 * 8 * 8 * 2)
    loss.backward()
    ref_in = torch.where((y != -100).unsqueeze(-1), s, 0.0).requires_grad_(True)
    ref_hard = hard_loss(ref_in, y)
    ref = alpha * sparse_soft_loss(ref_in, targets, temperature=T, labels=y, kind=kind) + (1 - alpha) * ref_hard
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-12) and float(hard) == pytest.approx(float(ref_hard), rel=1e-12)
    torch.testing.assert_close(z.grad, ref_in.grad, rtol=1e-12, atol=1e-14)
