"""Distillation from sparse teacher targets: per position, the teacher's top-k classes and the mass left out.

What is stored per position (:class:`SparseTargets`, built by :func:`sparsify`; cached by
:mod:`kdistill.teachers.sparse`):

* ``values`` (k,): the teacher's log-probabilities at T = 1, ``log_softmax(z)``, of its k most likely classes
  (float16 by default: see :data:`DEFAULT_VALUE_DTYPE`);
* ``indices`` (k,): those classes, in the smallest integer dtype that holds the vocabulary (:func:`index_dtype`);
* ``tail`` (): the log of the probability mass of the V - k other classes at T = 1, computed as a logsumexp of
  their logits in float64 (so a tail of 1e-30 is not lost to cancellation); -inf when k = V.

The targets at temperature T, from exactly these numbers: k + 1 *buckets*, the k stored classes and one tail
bucket holding every other class::

    a_j    = values_j / T                                  (j < k)
    a_tail = tail / T + (1 - 1/T) * log(V - k)
    log p  = a - logsumexp(a)

At T = 1 this is the teacher's distribution with its left-out classes merged into one bucket, renormalised over
what is stored (float16 rounding leaves the stored masses summing to 1 within about 1e-3). At T != 1 the
left-out classes' mass at T cannot be recovered from their mass at T = 1, so it is **approximated** by treating
them as V - k equal logits holding the stored mass (each e^tail / (V - k), so at T their mass is
(V - k) (e^tail / (V - k))^(1/T)): exact when the left-out logits are equal, otherwise (power-mean inequality)
an upper bound on the tail's mass at T > 1 and a lower bound at T < 1.

The student side: log q = log_softmax(s / T) over all V classes; its buckets are q at the k stored classes and
Q, its mass on all the others (a logsumexp over them: finite for any logits). The loss is the registered kind
(:mod:`kdistill.losses.divergences`) between the two (k + 1)-bucket distributions, with that kind's T^2
convention; for ``kl``::

    T^2 * ( sum_j p_j (log p_j - log q_j)  +  P_tail (log P_tail - log Q) )

Merging classes into one bucket can only lower a divergence (data processing inequality), so the sparse
KL is at most the dense one; with k = V there is no tail bucket and the loss is the dense loss (up to the
rounding of the stored values). Kinds ``kl``, ``reverse_kl``, ``jsd``, ``tv``, ``soft_ce`` apply to buckets;
``logit_mse`` and ``prob_mse`` compare every class and are refused. Positions, ``labels`` (-100 = ignore),
``mask``, ``normalizer`` and chunking follow :func:`kdistill.losses.soft_loss` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdistill.losses import (DEFAULT_CHUNK_BYTES, FUSED_KINDS, _autograd_chunk, _check_temperature, _chunked_total,
                             _denominator, _hard_term, _positions_work, _valid)
from kdistill.losses.divergences import resolve

DEFAULT_VALUE_DTYPE = torch.float16
"""float16, not bfloat16: the stored numbers are log-probabilities (<= 0, and in practice > -65504, float16's
range; lower ones are clamped there, where the probability is 0 in any float), and float16 keeps 11 significant
bits to bfloat16's 8: near the top of the distribution (log p in [-1, 0]) its spacing is 2^-11 against 2^-8, so
the probabilities that carry the mass are 8x more precise in the same two bytes."""
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BUCKET_KINDS = ("kl", "reverse_kl", "jsd", "tv", "soft_ce")
_FUSED_CHUNK_BYTES = 4 * 2**20  # one (rows, V) float buffer of the written-out step: measured 1.5x faster than 1 MiB
# at (2048 positions, V = 2048) on 2 cores (fewer op launches; the step keeps one such buffer, not several)


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype holding class ids 0 .. num_classes - 1: uint8 (<= 256), int16 (<= 32768),
    int32 (torch's uint16 lacks the indexing ops the lookup needs, so 32769 .. 65536 classes take int32)."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 2**15:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class SparseTargets:
    """The sparse teacher outputs of a batch: ``values``/``indices`` (..., k), ``tail`` (...); see the module doc."""

    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    num_classes: int

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    def to(self, device) -> "SparseTargets":
        return SparseTargets(self.values.to(device), self.indices.to(device), self.tail.to(device), self.num_classes)

    def bytes_per_position(self) -> int:
        return self.k * (self.values.element_size() + self.indices.element_size()) + self.tail.element_size()


@torch.no_grad()
def sparsify(logits: torch.Tensor, k: int, value_dtype: torch.dtype = DEFAULT_VALUE_DTYPE) -> SparseTargets:
    """The top-``k`` log-probabilities (T = 1) of ``logits`` (..., V), their classes and the log of the mass
    left out, computed in float64 and stored as the module doc says."""
    v = logits.shape[-1]
    if not (isinstance(k, int) and 1 <= k <= v):
        raise ValueError(f"k: the number of classes kept per position must be an integer in [1, {v}], got {k!r}")
    log_p = torch.log_softmax(logits.detach().to(torch.float64), dim=-1)
    top, idx = log_p.topk(k, dim=-1)
    if k == v:
        tail = torch.full(log_p.shape[:-1], -math.inf, dtype=torch.float64, device=log_p.device)
    else:
        tail = torch.logsumexp(log_p.scatter(-1, idx, -math.inf), dim=-1)
    low = torch.finfo(value_dtype).min  # a log-probability below it is a probability of 0 in any float
    if k < v:
        tail = tail.clamp(min=low)
    return SparseTargets(top.clamp(min=low).to(value_dtype), idx.to(index_dtype(v)), tail.to(value_dtype), v)


def _teacher_buckets(values: torch.Tensor, tail: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """log p over the k + 1 buckets at ``temperature`` (k buckets when k = V), in ``values``' dtype."""
    k = values.shape[-1]
    a = values / temperature
    if k < num_classes:
        a_tail = tail / temperature + (1.0 - 1.0 / temperature) * math.log(num_classes - k)
        a = torch.cat([a, a_tail.unsqueeze(-1)], dim=-1)
    return a - torch.logsumexp(a, dim=-1, keepdim=True)


def _student_buckets(s: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q over the same buckets: log_softmax(s / T) at the stored classes, and the logsumexp of the others."""
    log_q = torch.log_softmax(s / temperature, dim=-1)
    picked = log_q.gather(-1, idx)
    if idx.shape[-1] == s.shape[-1]:
        return picked
    rest = torch.logsumexp(log_q.scatter(-1, idx, -math.inf), dim=-1, keepdim=True)
    return torch.cat([picked, rest], dim=-1)


def _check_sparse(student_logits: torch.Tensor, targets: SparseTargets, labels, mask, kind: str) -> None:
    if kind not in BUCKET_KINDS:
        raise ValueError(f"kind: {kind!r} compares every class, which sparse (top-k) teacher targets do not hold; "
                         f"use one of {BUCKET_KINDS}, or a dense teacher")
    positions = tuple(student_logits.shape[:-1])
    if student_logits.dim() < 2 or tuple(targets.values.shape[:-1]) != positions \
            or targets.indices.shape != targets.values.shape or tuple(targets.tail.shape) != positions:
        raise ValueError(f"sparse teacher targets of positions {tuple(targets.values.shape[:-1])} (k = {targets.k}) "
                         f"do not match the student logits {tuple(student_logits.shape)}")
    if targets.num_classes != student_logits.shape[-1]:
        raise ValueError(f"teacher: its sparse targets are over {targets.num_classes} classes, the student outputs "
                         f"{student_logits.shape[-1]}; a teacher and a student must share a vocabulary")
    for name, t in (("labels", labels), ("mask", mask)):
        if t is not None and tuple(t.shape) != positions:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match the logits' positions {positions}")


def sparse_soft_loss(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    temperature: float,
    kind: str = "kl",
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    **options: float,
) -> torch.Tensor:
    """The soft term from sparse teacher targets (module doc): the ``kind`` between the (k + 1)-bucket
    distributions, summed over valid positions (mask keeps it, label not -100) / their count or ``normalizer``,
    in chunks of positions (float32 math, float64 for float64 logits); the result has the student logits' dtype."""
    _check_temperature(temperature)
    _, opts = resolve(kind, options)  # validates the kind and its options
    _check_sparse(student_logits, targets, labels, mask, kind)
    valid = _valid(student_logits, labels, mask)
    total, denom, _ = _sparse_total(student_logits, targets, valid, normalizer, temperature, kind, opts, chunk_bytes)
    return (total / denom).to(student_logits.dtype)


def _pack(targets: SparseTargets, s: torch.Tensor, work: torch.dtype, labels: torch.Tensor | None) -> torch.Tensor:
    """(rows, 2k + 1 [+ 1]) floats: values, class ids, tail [, label]: one tensor the chunks slice together."""
    k, v = targets.k, s.shape[-1]
    pack = work if v <= 2**24 else torch.float64  # class ids must be exact in the packed float tensor
    parts = [targets.values.reshape(-1, k).to(pack), targets.indices.reshape(-1, k).to(pack),
             targets.tail.reshape(-1, 1).to(pack)]
    if labels is not None:
        parts.append(labels.reshape(-1, 1).to(device=targets.values.device, dtype=pack))
    return torch.cat(parts, dim=1).to(s.device)


def _sparse_total(student_logits, targets, valid, normalizer, temperature, kind, opts, chunk_bytes,
                  labels=None, alpha: float = 1.0):
    """(total, denom, hard): the soft term's sum over valid rows (times ``alpha``, plus (1 - alpha) times the
    cross-entropy sum with ``labels`` when they are given: one pass for both, :func:`_fused_bucket_chunk`),
    its divisor, and the cross-entropy sum alone (detached; None without labels)."""
    work = _positions_work(student_logits)
    denom = _denominator(valid, normalizer, work)
    v, k = student_logits.shape[-1], targets.k
    s = student_logits.reshape(-1, v)
    packed = _pack(targets, s, work, labels)
    run = _bucket_run(temperature, kind, k, v, opts)
    hard = torch.zeros((), dtype=work, device=s.device) if labels is not None else None
    fused = kind in FUSED_KINDS
    step = _fused_bucket_chunk(temperature, kind, work, k, v, alpha, hard) if fused else _autograd_chunk(run, work)
    total = _chunked_total(run, step, s, packed, valid.reshape(-1), work, chunk_bytes, fused, _FUSED_CHUNK_BYTES)
    return total, denom, hard


def _fused_bucket_chunk(temperature: float, kind: str, work: torch.dtype, k: int, v: int, alpha: float = 1.0,
                        hard: torch.Tensor | None = None):
    """A chunk step for ``kl`` / ``soft_ce`` on buckets with the gradient written out (no autograd graph).

    With a = s / T, q = softmax(a), S the stored classes, p_b the teacher's bucket probabilities (k stored + the
    tail P) and Q = sum of q outside S, the loss per valid row is T^2 sum_b p_b (log p_b - log q_b) (``kl``) or
    -T^2 sum_b p_b log q_b (``soft_ce``), and both have the gradient T (q - r) w.r.t. s, where r = p_j at the
    stored class j and r = P q_c / Q at a class c outside S (the tail's target spread as the student spreads
    its own tail mass): T e_c (1 / Z - P / Z_rest) there, with e = exp(a - max a), Z its sum and Z_rest its sum
    outside S. About nine passes over the (rows, V) chunk. A chunk where Z_rest underflows (every class outside
    S more than ~87 nats below the row's top, in float32) is redone by autograd on a logsumexp, finite for any
    logits.

    With ``hard`` (a scalar accumulating the cross-entropy sum; the label is the packed rows' last column) the
    step returns alpha * soft + (1 - alpha) * CE and writes that mix's gradient, alpha T (q - r) + (1 - alpha)
    (softmax(s) - onehot(y)), in the same pass over the chunk: no second log-softmax of the logits, no second
    gradient buffer for autograd to add.
    """
    t2 = temperature * temperature
    tiny = torch.finfo(work).tiny

    w = alpha if hard is not None else 1.0  # the soft term's weight in what the step returns

    def step(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        idx = t[:, k:2 * k].long()
        log_p = _teacher_buckets(t[:, :k].to(work), t[:, 2 * k].to(work), temperature, v)  # (rows, k [+ 1])
        p = log_p.exp()
        keep = valid.unsqueeze(-1)
        zero = torch.zeros((), dtype=work, device=s.device)
        e = torch.where(keep, s.detach(), 0.0).to(work)  # padding garbage stays out
        m = e.amax(dim=-1, keepdim=True)
        ce = _hard_rows(e, m, t[:, -1], keep) if hard is not None else None  # before e is overwritten
        top = m.div(-temperature)  # -max a
        log_q = e.gather(-1, idx).div_(temperature).add_(top)  # a_j - max a, exact (no exp/log round trip)
        torch.add(top, e, alpha=1.0 / temperature, out=e).exp_()  # exp(a - max a), one pass for shift and scale
        zq = e.sum(dim=-1, keepdim=True)
        e_top = e.gather(-1, idx)
        coef = torch.full_like(zq, w * temperature).div_(zq)
        if k < v:
            e.scatter_(-1, idx, 0.0)
            zr = e.sum(dim=-1, keepdim=True)
            if bool((zr < tiny).any()):  # the student's tail underflows in this chunk: exact logsumexp path
                soft = _autograd_chunk(_bucket_run(temperature, kind, k, v), work)(s, t, valid, out)
                return _add_hard(out.mul_(w), ce, hard, alpha, keep) + w * soft
            coef.sub_(p[:, k:] * (w * temperature) / zr)
            log_q = torch.cat([log_q, zr.log()], dim=-1)
        log_q.sub_(zq.log())
        g = out if out.dtype == work else torch.empty_like(e)
        torch.mul(e, coef.masked_fill_(~keep, 0.0), out=g)  # outside S (0 at S: e was zeroed there)
        g.scatter_(-1, idx, (e_top / zq - p[:, :k]).mul_(w * temperature).masked_fill_(~keep, 0.0))
        hard_part = _add_hard(g, ce, hard, alpha, keep)
        if g is not out:
            out.copy_(g)
        terms = p * (log_p - log_q) if kind == "kl" else -p * log_q
        per_row = torch.where(p > 0, terms, zero).sum(-1)  # an empty bucket adds 0, not 0 * inf
        return torch.where(valid, per_row, zero).sum() * (w * t2) + hard_part

    return step


def _hard_rows(e: torch.Tensor, m: torch.Tensor, label: torch.Tensor, keep: torch.Tensor):
    """(exp(s - max s), its row sums, per-row cross-entropy, labels) of a chunk's masked logits ``e``."""
    y = torch.where(keep.squeeze(-1), label.long(), 0).unsqueeze(-1)  # unscored rows: any class, zero weight
    e1 = torch.sub(e, m).exp_()
    z1 = e1.sum(dim=-1, keepdim=True)
    rows = (m + z1.log() - e.gather(-1, y)).squeeze(-1)  # -log softmax(s)_y
    return e1, z1, rows, y


def _add_hard(g: torch.Tensor, ce, hard: torch.Tensor | None, alpha: float, keep: torch.Tensor) -> torch.Tensor:
    """Add (1 - alpha) (softmax(s) - onehot(y)) to the chunk's gradient ``g`` and the CE sum to ``hard``; return
    (1 - alpha) times the chunk's CE sum (0 without a hard term)."""
    if hard is None:
        return torch.zeros((), dtype=g.dtype, device=g.device)
    e1, z1, rows, y = ce
    b = 1.0 - alpha
    g.addcmul_(e1, (b / z1).masked_fill_(~keep, 0.0))
    g.scatter_add_(-1, y, keep.to(g.dtype).mul_(-b))
    total = torch.where(keep.squeeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum()
    hard.add_(total.detach())
    return total * b


def _bucket_run(temperature: float, kind: str, k: int, v: int, options: dict | None = None):
    """Per-row bucket divergence of ``kind`` on (rows, V) student logits and packed targets (the autograd form)."""
    div, opts = resolve(kind, options or {})

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        idx = b[:, k:2 * k].long()
        log_p = _teacher_buckets(b[:, :k].to(a.dtype), b[:, 2 * k].to(a.dtype), temperature, v)
        log_q = _student_buckets(a, idx, temperature)
        return div.fn(log_q * temperature, log_p * temperature, temperature, **opts)  # fn divides by T again

    return run


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    kind: str = "kl",
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    **options: float,
) -> torch.Tensor:
    """``alpha`` * :func:`sparse_soft_loss` + (1 - ``alpha``) * cross-entropy with ``labels``, both over the same
    valid positions, as :func:`kdistill.losses.distillation_loss` with dense teacher logits."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: the soft-target weight must be in [0, 1], got {alpha}")
    if alpha < 1.0 and labels is None:
        raise ValueError(f"labels: required when alpha < 1 (alpha={alpha}); pass labels or set alpha=1")
    return sparse_distillation_terms(student_logits, targets, labels, temperature=temperature, alpha=alpha, kind=kind,
                                     mask=mask, normalizer=normalizer, chunk_bytes=chunk_bytes, **options)[0]


def sparse_distillation_terms(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    kind: str = "kl",
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    **options: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, hard): :func:`sparse_distillation_loss` and its cross-entropy term alone (detached; None when
    alpha = 1). For ``kl``/``soft_ce`` on per-position logits both terms come from one pass over each chunk of
    the logits with one written-out gradient (:func:`_fused_bucket_chunk`); otherwise they are computed apart."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: the soft-target weight must be in [0, 1], got {alpha}")
    if alpha < 1.0 and labels is None:
        raise ValueError(f"labels: required when alpha < 1 (alpha={alpha}); pass labels or set alpha=1")
    one_pass = kind in FUSED_KINDS and student_logits.dim() > 2 and chunk_bytes is not None \
        and torch.is_grad_enabled() and student_logits.requires_grad  # the pass writes the gradient as it goes
    if alpha == 1.0 or not one_pass:
        soft = sparse_soft_loss(student_logits, targets, temperature=temperature, kind=kind, labels=labels,
                                mask=mask, normalizer=normalizer, chunk_bytes=chunk_bytes, **options)
        if alpha == 1.0:
            return soft, None
        valid = _valid(student_logits, labels, mask)
        hard = _hard_term(student_logits, labels, valid, _denominator(valid, normalizer, torch.float32))
        return alpha * soft + (1.0 - alpha) * hard.to(soft.dtype), hard.detach()
    _check_temperature(temperature)
    _, opts = resolve(kind, options)
    _check_sparse(student_logits, targets, labels, mask, kind)
    valid = _valid(student_logits, labels, mask)
    total, denom, hard = _sparse_total(student_logits, targets, valid, normalizer, temperature, kind, opts,
                                       chunk_bytes, labels=labels, alpha=alpha)
    return (total / denom).to(student_logits.dtype), hard / denom
