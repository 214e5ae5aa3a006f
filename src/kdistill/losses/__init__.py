"""Distillation losses: pure functions of logits.

The soft-target kinds (``kl``, ``reverse_kl``, ``jsd``, ``tv``, ``soft_ce``, ``logit_mse``, ``prob_mse``)
live in :mod:`kdistill.losses.divergences`, one registered function each; ``LOSS_KINDS`` is a live view of
their names. Their temperature and T^2 conventions are in each function's docstring; in short, with
p = softmax(teacher / T) and q = softmax(student / T), ``kl`` is T^2 * KL(p || q) and the KL family
carries T^2 because its gradients scale as 1/T^2 (Hinton et al. 2015, section 2).

Positions. :func:`soft_loss` and :func:`distillation_loss` take logits (B, C) -- one prediction per
sample -- or (B, L, C), or any number of position dimensions before the class dimension (a language
model's per-token logits). ``labels`` has the logits' shape without the class dimension, with -100
for "ignore" (the PyTorch / Hugging Face convention); ``mask`` (same shape, bool or 0/1, nonzero =
keep) is an attention mask. A position is *valid* when the mask keeps it and, when labels are given,
its label is not -100; both the soft and the hard term use the same valid positions (as TRL's GKD and
DistillKit: padding and prompt tokens carry label -100). Each term is its per-position value summed
over valid positions, divided by their number (a batch with none gives 0), or by ``normalizer`` when
one is given: the valid-position count of the whole batch, so that micro-batch losses (gradient
accumulation, DDP shards) add up to the whole batch's loss whatever the split and padding. (DDP
averages gradients over its W ranks: there pass the global count / W, which gives each rank's
gradient the weight of its valid positions.)

For (B, C) logits with no mask, no normalizer and no -100 label, the original kinds (kl, soft_ce,
logit_mse, prob_mse) take the code path (and so give every bit of the result) kdistill always had:
batchmean KL, mean soft cross-entropy, mean squared error over batch and classes, cross-entropy
averaged over the batch; that path is not chunked. Telling it apart reads the labels once (a host
synchronisation on an accelerator, only for 2-D logits with labels).

Precision and speed. (B, C) logits are computed in float64 (bit for bit as always). On (B, L, ...)
logits the soft term is float32 math (float64 only for float64 logits): it is the largest tensor of a
language model's step, and float64 there made it several times slower than the float32 KL users write;
``kl`` and ``soft_ce`` take their gradient from the formula T (q - p) in a few vectorised passes per
chunk, no autograd graph (tests compare values and gradients with float64 references).

Memory. On (B, L, V) logits with a large vocabulary the soft term is computed in chunks of positions
(``chunk_bytes``, 64 MiB of work by default; ``kl``/``soft_ce`` use smaller, cache-sized chunks) with each
chunk's exact gradient taken at once, so peak memory holds the logits, one gradient buffer and one
chunk's temporaries instead of several full-size copies (``benchmarks/loss_memory.py`` measures it).

Beyond logits matching: :func:`dkd_loss` (decoupled KD, Zhao et al. 2022), :func:`hint_loss` (FitNets,
Romero et al. 2015) and :func:`attention_transfer_loss` (Zagoruyko & Komodakis 2017) on feature maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdistill.losses.divergences import KIND_NAMES, resolve

LOSS_KINDS = KIND_NAMES  # the registered kinds' names (live); see kdistill.losses.divergences
STACKED_KINDS = ("kl", "soft_ce", "logit_mse", "prob_mse")  # what the multi-student losses implement
IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 64 * 2**20
_CACHE_BYTES = 2**20  # one (rows, C) buffer of the written-out kl/soft_ce chunk step (about an L2 cache)
_TEMPS_PER_ROW = 8  # float64 (rows, C) temporaries a kind's forward and backward hold at once (estimate)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last dimension."""
    _check_temperature(temperature)
    return F.softmax(logits / temperature, dim=-1)


def _work(t: torch.Tensor) -> torch.dtype:
    # The soft term costs O(positions x classes): compute it in float64 (where the device has it) so
    # that T^2 does not amplify float32 cancellation in log p - log q at high temperatures.
    return torch.float32 if t.device.type == "mps" else torch.float64


def _legacy_soft(student_logits, teacher_logits, temperature: float, kind: str) -> torch.Tensor:
    """kdistill's original (B, C) soft term, kept verbatim so existing runs reproduce bit for bit."""
    out_dtype = student_logits.dtype
    work = _work(student_logits)
    s, t = student_logits.to(work), teacher_logits.detach().to(work)
    t2 = temperature * temperature
    if kind == "logit_mse":
        return F.mse_loss(s, t).to(out_dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    if kind == "kl":
        loss = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * t2
    elif kind == "soft_ce":
        loss = -(log_p.exp() * log_q).sum(dim=-1).mean() * t2
    else:  # prob_mse
        loss = F.mse_loss(log_q.exp(), log_p.exp())
    return loss.to(out_dtype)


def _check_positions(student_logits, teacher_logits, labels, mask) -> None:
    """One clear error for logits, labels or mask of the wrong shape or type."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape (batch, classes) or (batch, positions..., classes)"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits: need (batch, classes) or (batch, positions..., classes), "
                         f"got {tuple(student_logits.shape)}")
    positions = tuple(student_logits.shape[:-1])
    if labels is not None:
        if tuple(labels.shape) != positions:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match the logits' positions {positions}"
                             " (labels have the logits' shape without the class dimension)")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels: need integer class indices (-100 to ignore), got {labels.dtype}")
    if mask is not None and tuple(mask.shape) != positions:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' positions {positions}")


def _denominator(valid: torch.Tensor, normalizer, dtype: torch.dtype) -> torch.Tensor:
    """``normalizer`` (checked) or the number of valid positions (at least 1), as a 0-d ``dtype`` tensor."""
    if normalizer is None:
        return valid.sum().clamp(min=1).to(dtype)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer: need one number (the whole batch's valid-position count), "
                             f"got shape {tuple(normalizer.shape)}")
        return normalizer.reshape(()).to(device=valid.device, dtype=dtype)
    if not (isinstance(normalizer, (int, float)) and math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer: must be a finite number > 0 (the whole batch's valid-position count), "
                         f"got {normalizer!r}")
    return torch.tensor(float(normalizer), dtype=dtype, device=valid.device)


def _valid(student_logits, labels, mask) -> torch.Tensor:
    """The (positions,) bool tensor of valid positions: kept by the mask, label not -100."""
    valid = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    if mask is not None:
        valid = valid & (mask.to(student_logits.device) != 0)
    if labels is not None:
        valid = valid & (labels.to(student_logits.device) != IGNORE_INDEX)
    return valid


def _is_legacy(student_logits, labels, mask, normalizer, kind: str) -> bool:
    """Whether the original (B, C) code path applies (reads labels once: a sync on an accelerator)."""
    if student_logits.dim() != 2 or mask is not None or normalizer is not None or kind not in STACKED_KINDS:
        return False
    return labels is None or not bool((labels == IGNORE_INDEX).any())


def _chunk_rows(n_classes: int, itemsize: int, chunk_bytes: int | None) -> int | None:
    """Rows per chunk so that one chunk's float work stays near ``chunk_bytes``; None: no chunking."""
    if chunk_bytes is None:
        return None
    if not (isinstance(chunk_bytes, int) and chunk_bytes > 0):
        raise ValueError(f"chunk_bytes: must be a positive integer or None (no chunking), got {chunk_bytes!r}")
    return max(1, chunk_bytes // (n_classes * itemsize * _TEMPS_PER_ROW))


RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
FUSED_KINDS = ("kl", "soft_ce")  # kinds whose per-position gradient is written out (the same for both)


def _positions_work(logits: torch.Tensor) -> torch.dtype:
    """The working dtype of the positions path: float32 (float64 only for float64 logits).

    The per-position soft term costs O(positions x classes), the largest tensor of a language model's
    step: float64 there made kdistill's KD step several times slower than the float32 KL users write
    (``benchmarks/lm_speed.py``). float32 log_softmax is stable for any finite logits; the cost is
    float32 rounding in log p - log q (relative ~1e-6 of the terms, tested against float64 formulas).
    (B, C) logits keep float64 (:func:`_work`), so one-label-per-sample runs reproduce bit for bit.
    """
    if logits.dim() == 2:
        return _work(logits)
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _masked_sum(run: RowFn, s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """Sum over the valid rows of ``run(s in work, t)`` on (rows, C) logits; invalid rows add exactly 0.

    ``run`` converts ``t`` itself (the sparse path packs class ids there that must stay exact). Invalid rows are
    zeroed on both sides first, so garbage there (NaN, inf logits at padding) cannot reach the gradient."""
    keep = valid.unsqueeze(-1)
    s, t = torch.where(keep, s.to(work), 0.0), torch.where(keep, t, 0.0)
    values = run(s, t)
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def _autograd_chunk(run: RowFn, work: torch.dtype) -> ChunkFn:
    """A chunk step for any kind: the sum of ``run`` over the chunk's valid rows; its gradient (by autograd)
    goes to ``out``."""

    def step(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = s.detach().to(work).requires_grad_(True)
            part = _masked_sum(run, z, t, valid, work)
            (g,) = torch.autograd.grad(part, z)
        out.copy_(g)
        return part.detach()

    return step


def _fused_kl_chunk(temperature: float, kind: str, work: torch.dtype) -> ChunkFn:
    """A chunk step for ``kl`` / ``soft_ce`` with the gradient written out, no autograd graph.

    Per valid row, with a = s / T, b = t / T (each shifted by its row max), p = softmax(b), q = softmax(a):
    ``kl`` is T^2 sum p (b - a) + T^2 (log Z_q - log Z_p) (= T^2 sum p (log p - log q)), ``soft_ce`` is
    -T^2 sum p a + T^2 log Z_q (= -T^2 sum p log q); both have the gradient T (q - p) w.r.t. s, written
    into ``out`` (the caller's gradient buffer). Invalid rows give 0 and a zero gradient (a masked fill,
    so garbage logits there cannot leak NaN). Few passes over the chunk, each a plain vectorised op.
    """
    t2 = temperature * temperature

    def log_exp_sum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z / T shifted by its row max, exp of it, the row sums of the exp), the shift done in place."""
        a = z.detach().to(work).div(temperature)
        a.sub_(a.amax(dim=-1, keepdim=True))
        e = a.exp()
        return a, e, e.sum(dim=-1, keepdim=True)

    def step(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, q, zq = log_exp_sum(s)
        b, p, zp = log_exp_sum(t)
        p.div_(zp)
        if kind == "kl":
            per_row = torch.linalg.vecdot(p, b.sub_(a)) + (zq.log() - zp.log()).squeeze(-1)
        else:
            per_row = zq.log().squeeze(-1) - torch.linalg.vecdot(p, a)
        g = out if out.dtype == work else torch.empty_like(q)  # e.g. bfloat16 logits: float32 math, then cast
        torch.mul(q, temperature / zq, out=g).sub_(p, alpha=temperature).masked_fill_(~valid.unsqueeze(-1), 0.0)
        if g is not out:
            out.copy_(g)
        zero = torch.zeros((), dtype=work, device=s.device)
        return torch.where(valid, per_row, zero).sum() * t2

    return step


class _ChunkedSum(torch.autograd.Function):
    """A sum over rows, chunk by chunk, each chunk's exact gradient taken during the forward by ``step``.

    ``step(s_chunk, t_chunk, valid_chunk, out)`` returns the chunk's sum and writes its gradient w.r.t.
    ``s_chunk`` into ``out`` (the chunk's rows of the gradient buffer):
    :func:`_autograd_chunk` for any kind, :func:`_fused_kl_chunk` for ``kl``/``soft_ce``. Only one chunk's
    temporaries are alive at a time; what survives until the backward is one gradient buffer in the
    logits' dtype (the backward scales it by the incoming gradient).
    """

    @staticmethod
    def forward(ctx, s, t, valid, step, rows, work):  # noqa: D401 - autograd signature
        total = torch.zeros((), dtype=work, device=s.device)
        grad = torch.empty_like(s)
        for start in range(0, s.shape[0], rows):
            stop = start + rows
            total += step(s[start:stop], t[start:stop], valid[start:stop], grad[start:stop])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def _chunked_total(run: RowFn, step: ChunkFn, s, t, valid, work: torch.dtype, chunk_bytes,
                   fused: bool = False, cache_bytes: int = _CACHE_BYTES) -> torch.Tensor:
    """Sum of ``run`` over the valid rows of (rows, C) ``s``, ``t``: chunked with ``step``'s gradients when
    the student needs one; plain autograd when ``chunk_bytes`` is None (the unchunked reference form) or,
    unless ``step`` is a written-out gradient (``fused``, then ``cache_bytes`` per (rows, C) buffer), when
    everything fits in one chunk."""
    itemsize = torch.finfo(work).bits // 8
    rows = _chunk_rows(s.shape[-1], itemsize, chunk_bytes)
    if rows is not None and fused:  # a few plain passes per chunk: keep each (rows, C) buffer cache-sized
        rows = min(rows, max(8, cache_bytes // (s.shape[-1] * itemsize)))
    if rows is None or (rows >= s.shape[0] and not fused):
        return _masked_sum(run, s, t, valid, work)
    if torch.is_grad_enabled() and s.requires_grad:
        return _ChunkedSum.apply(s, t, valid, step, rows, work)
    return sum(_masked_sum(run, s[i:i + rows], t[i:i + rows], valid[i:i + rows], work)
               for i in range(0, s.shape[0], rows))


def _soft_term(student_logits, teacher_logits, valid, denom, temperature, div, options, chunk_bytes) -> torch.Tensor:
    """The soft term over valid positions: sum of ``div`` per position / ``denom``, chunked over positions."""
    work = _positions_work(student_logits)
    c = student_logits.shape[-1]
    s, t, v = student_logits.reshape(-1, c), teacher_logits.detach().reshape(-1, c), valid.reshape(-1)

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return div.fn(a, b.to(a.dtype), temperature, **options)

    fused = div.name in FUSED_KINDS and student_logits.dim() > 2  # (B, C): autograd, bit for bit as before
    step = _fused_kl_chunk(temperature, div.name, work) if fused else _autograd_chunk(run, work)
    total = _chunked_total(run, step, s, t, v, work, chunk_bytes, fused)
    return (total / denom.to(total.dtype)).to(student_logits.dtype)


def _hard_term(student_logits, labels, valid, denom) -> torch.Tensor:
    """Cross-entropy with ``labels`` summed over valid positions / ``denom``: float32 math (float64 logits keep
    float64, so a float64 reference check sees float64 rounding, not float32's)."""
    c = student_logits.shape[-1]
    y = labels.to(student_logits.device).long().masked_fill(~valid, IGNORE_INDEX).reshape(-1)
    z = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    total = F.cross_entropy(z.reshape(-1, c), y, reduction="sum")
    return total / denom.to(total.dtype)


def hard_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy with ``labels`` over valid positions (label not -100, kept by ``mask``): summed, divided
    by their number or by ``normalizer`` (the whole batch's count), as the hard term of :func:`distillation_loss`.
    Logits (B, C) or (B, positions..., C); float32 result."""
    _check_positions(student_logits, student_logits, labels, mask)
    valid = _valid(student_logits, labels, mask)
    return _hard_term(student_logits, labels, valid, _denominator(valid, normalizer, torch.float32))


def soft_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    kind: str = "kl",
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
    **options: float,
) -> torch.Tensor:
    """The soft-target term alone: the registered ``kind`` averaged over valid positions.

    Logits are (B, C) or (B, positions..., C); ``labels`` (optional here, -100 = ignore) and ``mask``
    (nonzero = keep) have the logits' shape without C and only select positions; ``normalizer``
    replaces the local valid count (see the module docstring). ``options`` are the kind's own (``beta``
    for ``jsd``). ``chunk_bytes`` bounds one chunk's work on the positions path (None: one piece, by
    autograd). The teacher is detached; the result has the student logits' dtype.
    """
    _check_temperature(temperature)
    div, opts = resolve(kind, options)
    _check_positions(student_logits, teacher_logits, labels, mask)
    if _is_legacy(student_logits, labels, mask, normalizer, kind):
        return _legacy_soft(student_logits, teacher_logits, temperature, kind)
    valid = _valid(student_logits, labels, mask)
    denom = _denominator(valid, normalizer, _work(student_logits))
    return _soft_term(student_logits, teacher_logits, valid, denom, temperature, div, opts, chunk_bytes)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
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
    """``alpha`` * soft term + (1 - ``alpha``) * cross-entropy with the hard ``labels``.

    ``alpha`` is the weight of the soft targets: 1 means pure distillation (no labels needed),
    0 means ordinary supervised training. Both terms average over the same valid positions (mask
    keeps it, label not -100) or divide by ``normalizer``; shapes and options as in :func:`soft_loss`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: the soft-target weight must be in [0, 1], got {alpha}")
    _check_temperature(temperature)
    div, opts = resolve(kind, options)
    if alpha < 1.0 and labels is None:
        raise ValueError(f"labels: required when alpha < 1 (alpha={alpha}); pass labels or set alpha=1")
    _check_positions(student_logits, teacher_logits, labels, mask)
    if _is_legacy(student_logits, labels, mask, normalizer, kind):
        soft = _legacy_soft(student_logits, teacher_logits, temperature, kind)
        if alpha == 1.0:
            return soft
        z = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
        hard = F.cross_entropy(z, labels).to(soft.dtype)
        return alpha * soft + (1.0 - alpha) * hard
    valid = _valid(student_logits, labels, mask)
    denom = _denominator(valid, normalizer, _work(student_logits))
    soft = _soft_term(student_logits, teacher_logits, valid, denom, temperature, div, opts, chunk_bytes)
    if alpha == 1.0:
        return soft
    hard = _hard_term(student_logits, labels, valid, denom).to(soft.dtype)
    return alpha * soft + (1.0 - alpha) * hard



def _per_student(value, n: int, name: str, device: torch.device) -> torch.Tensor:
    """A float or a length-``n`` sequence/tensor as an (n,) float64 tensor on ``device``."""
    v = torch.as_tensor(value, dtype=torch.float64).to(device)
    if v.dim() == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise ValueError(f"{name}: need one value or one per student ({n}), got shape {tuple(v.shape)}")
    return v


def _check_stacked(student_logits, teacher_logits, labels, temperature, alpha, kind, checked=False):
    """Validate the stacked losses' arguments; return (temperatures, alphas, labels needed).

    ``checked=True`` (a trainer that validated its settings once) skips the checks of values, which
    would synchronise an accelerator at every step: temperature and alpha must then be (N,) tensors.
    """
    if checked:
        return temperature, alpha, labels is not None
    if kind not in STACKED_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {STACKED_KINDS}, the kinds the multi-student losses implement")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits: need (students, batch, classes), got {tuple(student_logits.shape)}")
    n, b, c = student_logits.shape
    if teacher_logits is not None and teacher_logits.shape not in ((n, b, c), (b, c)):
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be ({n}, {b}, {c}) or ({b}, {c})")
    temps = _per_student(temperature, n, "temperature", student_logits.device)
    alphas = _per_student(alpha, n, "alpha", student_logits.device)
    if not bool((temps > 0).all()):
        raise ValueError(f"temperature: must be > 0, got {temps.tolist()}")
    if not bool(((alphas >= 0) & (alphas <= 1)).all()):
        raise ValueError(f"alpha: the soft-target weight must be in [0, 1], got {alphas.tolist()}")
    need_labels = teacher_logits is None or bool((alphas < 1).any())
    if need_labels:
        if labels is None:
            raise ValueError("labels: required when some alpha < 1; pass labels or set every alpha to 1")
        if labels.shape not in ((n, b), (b,)):
            raise ValueError(f"labels shape {tuple(labels.shape)} must be ({n}, {b}) or ({b},)")
    return temps, alphas, need_labels


def stacked_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature,
    alpha,
    kind: str = "kl",
) -> torch.Tensor:
    """:func:`distillation_loss` of N students at once, each with its own temperature and alpha.

    ``student_logits`` is (N, B, C); ``teacher_logits`` is (N, B, C), or (B, C) when every student saw
    the same batch; ``labels`` is (N, B) or (B,). ``temperature`` and ``alpha`` are floats or one value
    per student. Returns the (N,) losses: entry i equals ``distillation_loss(student_logits[i],
    teacher_logits[i], labels[i], temperature=T[i], alpha=alpha[i], kind=kind)`` up to rounding, so the
    sum's gradient with respect to each student's logits is that student's own gradient.
    """
    temps, alphas, need_labels = _check_stacked(student_logits, teacher_logits, labels, temperature, alpha, kind)
    n, b, c = student_logits.shape
    out_dtype = student_logits.dtype
    work = torch.float32 if student_logits.device.type == "mps" else torch.float64  # as in soft_loss
    s, t = student_logits.to(work), teacher_logits.detach().to(work)
    if kind == "logit_mse":
        soft = (s - t).square().mean(dim=(1, 2))
    else:
        temp = temps.to(work).view(n, 1, 1)
        log_q = F.log_softmax(s / temp, dim=-1)
        log_p = F.log_softmax(t / temp, dim=-1)
        t2 = temps.to(work).square()
        if kind == "kl":
            soft = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=-1) * t2
        elif kind == "soft_ce":
            soft = -(log_p.exp() * log_q).sum(dim=-1).mean(dim=-1) * t2
        else:  # prob_mse
            soft = (log_q.exp() - log_p.exp()).square().mean(dim=(1, 2))
    soft = soft.to(out_dtype)
    if not need_labels:
        return soft
    y = labels.expand(n, b) if labels.dim() == 1 else labels
    hard = F.cross_entropy(student_logits.float().reshape(n * b, c), y.reshape(n * b), reduction="none")
    hard = hard.view(n, b).mean(dim=1).to(soft.dtype)
    a = alphas.to(soft.dtype)
    return torch.where(alphas == 1, soft, a * soft + (1 - a) * hard)


def _softmax_pair(z: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax, softmax) of ``z`` along ``dim``, sharing one exp."""
    z = z - z.amax(dim=dim, keepdim=True)
    e = z.exp()
    total = e.sum(dim=dim, keepdim=True)
    return z - total.log(), e / total


def stacked_distillation_loss_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    temperature,
    alpha,
    kind: str = "kl",
    checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N,) losses of :func:`stacked_distillation_loss` and their sum's gradient w.r.t. the logits.

    For ``kl`` and ``soft_ce`` (whose gradient is the same, T * (q - p) / B), ``logit_mse`` (2 (s - t) / (B C))
    and the hard-label cross-entropy ((softmax(s) - onehot) / B) the gradient is written out, in the same precision as
    the losses (float64 soft term, float32 hard term), with classes on the middle axis so every
    reduction is vectorised over the batch: a multi-student trainer spends far less time here than
    with autograd. ``prob_mse`` falls back to autograd. ``teacher_logits=None`` means plain supervised
    training: the loss is the cross-entropy with ``labels`` and ``alpha`` is ignored. ``checked=True``
    skips validation (see :func:`_check_stacked`); with it, ``labels`` must be None when every alpha is 1.
    """
    if teacher_logits is not None and kind not in ("kl", "soft_ce", "logit_mse"):
        z = student_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = stacked_distillation_loss(z, teacher_logits, labels, temperature=temperature, alpha=alpha, kind=kind)
            (grad,) = torch.autograd.grad(losses.sum(), z)
        return losses.detach(), grad
    temps, alphas, need_labels = _check_stacked(student_logits, teacher_logits, labels, temperature, alpha, kind, checked)
    n, b, _ = student_logits.shape
    out_dtype = student_logits.dtype
    logits_cb = student_logits.detach().transpose(1, 2)  # (N, C, B)
    loss = grad = None
    if teacher_logits is not None:
        work = torch.float32 if student_logits.device.type == "mps" else torch.float64
        t_cb = teacher_logits.detach().transpose(-1, -2).to(work)
        if kind == "logit_mse":  # mean of (s - t)^2 over batch and classes: gradient 2 (s - t) / (B C)
            diff = logits_cb.to(work) - t_cb
            loss = diff.square().mean(dim=(1, 2)).to(out_dtype)
            grad = diff.mul_(2.0 / diff[0].numel()).to(out_dtype)
        else:
            temp = temps.to(work).view(n, 1, 1)
            log_q, q = _softmax_pair(logits_cb.to(work) / temp, dim=1)
            log_p, p = _softmax_pair(t_cb / temp, dim=1)
            cross = (p * (log_p - log_q)) if kind == "kl" else -(p * log_q)
            loss = (cross.sum(dim=1).mean(dim=-1) * temps.to(work).square()).to(out_dtype)
            grad = (q - p).mul_(temp / b).to(out_dtype)
        if not need_labels:
            return loss, grad.transpose(1, 2)
    y = (labels.expand(n, b) if labels.dim() == 1 else labels).view(n, 1, b)
    log_r, r = _softmax_pair(logits_cb.float(), dim=1)
    hard = -log_r.gather(1, y).view(n, b).mean(dim=1).to(out_dtype)
    hard_grad = r.scatter_add_(1, y, torch.full(y.shape, -1.0, device=r.device, dtype=r.dtype)).div_(b).to(out_dtype)
    if teacher_logits is None:
        return hard, hard_grad.transpose(1, 2)
    a = alphas.to(out_dtype)
    loss = torch.where(alphas == 1, loss, a * loss + (1 - a) * hard)
    grad = grad.mul_(a.view(n, 1, 1)).add_(hard_grad.mul_((1 - a).view(n, 1, 1)))
    return loss, grad.transpose(1, 2)


# --------------------------------------------------------------------------- decoupled and feature losses


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 where the device has it (as in :func:`soft_loss`), else float32."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _check_weight(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value}")


def _non_target(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The (B, C - 1) entries of ``z`` (B, C) other than each row's label, in class order.

    Index arithmetic instead of a boolean mask, so there is no host synchronisation on an accelerator.
    """
    b, c = z.shape
    idx = torch.arange(c - 1, device=z.device).expand(b, c - 1)
    idx = idx + (idx >= labels[:, None]).long()
    return z.gather(1, idx)


def _binary_log_probs(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_target, log(1 - p_target)) of softmax(``z``), each (B,), both from logsumexps (stable)."""
    total = torch.logsumexp(z, dim=1)
    log_pt = z.gather(1, labels[:, None]).squeeze(1) - total
    log_rest = torch.logsumexp(_non_target(z, labels), dim=1) - total
    return log_pt, log_rest


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022): ``alpha`` * TCKD + ``beta`` * NCKD.

    With T = ``temperature``, p_t the softmax(z / T) probability of the label and b = (p_t, 1 - p_t):

    * TCKD ("target class"): KL(b_teacher || b_student), the binary KL of target vs the rest;
    * NCKD ("non-target classes"): KL between teacher and student softmaxes over the C - 1 non-target
      logits only (mdistiller subtracts 1000 from the target logit; here the target is removed by a
      gather, the exact limit of that trick, so huge logits stay finite).

    Both terms are multiplied by T^2 and averaged over the batch, as the paper's reference code does.
    The decoupling lets NCKD -- the "dark knowledge" among wrong classes that classical KD weights by
    1 - p_t of the teacher -- get its own weight ``beta``. Computed in float64 from logsumexps (so
    log(1 - p_t) does not cancel when p_t is near 1); the teacher is detached.
    """
    _check_temperature(temperature)
    _check_weight(alpha, "alpha")
    _check_weight(beta, "beta")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape (batch, classes)"
        )
    b, c = student_logits.shape
    if c < 2:
        raise ValueError(f"student_logits: DKD needs at least 2 classes, got {c}")
    if labels.shape != (b,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels: need ({b},) integer class indices, got {tuple(labels.shape)} {labels.dtype}")
    work = _work_dtype(student_logits)
    y = labels.to(student_logits.device, torch.long)
    s = student_logits.to(work) / temperature
    t = teacher_logits.detach().to(work) / temperature
    # TCKD: binary KL, sum over {target, rest} of p (log p - log q).
    s_pt, s_rest = _binary_log_probs(s, y)
    t_pt, t_rest = _binary_log_probs(t, y)
    tckd = t_pt.exp() * (t_pt - s_pt) + t_rest.exp() * (t_rest - s_rest)
    # NCKD: KL over the non-target classes' own softmax.
    log_q = F.log_softmax(_non_target(s, y), dim=1)
    log_p = F.log_softmax(_non_target(t, y), dim=1)
    nckd = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    t2 = temperature * temperature
    loss = (alpha * tckd.mean() + beta * nckd.mean()) * t2
    return loss.to(student_logits.dtype)


def hint_loss(projected_student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015): mean squared error to the teacher's feature.

    The student's feature must already be projected to the teacher's shape (FitNets' regressor, e.g. a
    1x1 convolution); the teacher's feature is detached, so only the student side learns.
    """
    if projected_student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"projected_student_feature {tuple(projected_student_feature.shape)} and teacher_feature "
            f"{tuple(teacher_feature.shape)} must have the same shape (project the student feature first)"
        )
    s = projected_student_feature
    return F.mse_loss(s, teacher_feature.detach().to(s.dtype))


def _check_feature(f: torch.Tensor, name: str) -> None:
    if f.dim() != 4:
        raise ValueError(f"{name}: need a feature map shaped (B, C, H, W), got {tuple(f.shape)}")


def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Spatial attention of ``feature`` (B, C, H, W): mean over channels of |a|^p, flattened, L2-normalised.

    Zagoruyko & Komodakis (ICLR 2017), F^p_mean; returns (B, H * W) unit rows. For even p this equals
    mdistiller's / RepDistiller's ``f.pow(p).mean(1)``; the absolute value is the paper's definition
    and keeps odd p meaningful.
    """
    _check_feature(feature, "feature")
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"p: must be a finite number > 0, got {p}")
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): mean over batch and positions of (q_s - q_t)^2.

    q = :func:`attention_map` (as ``(at(s) - at(t)).pow(2).mean()`` in mdistiller's AT.py and
    RepDistiller's ``Attention``). Channel counts may differ. When the spatial sizes differ, the
    student's feature map is resized to the teacher's by ``F.adaptive_avg_pool2d`` before its map is
    formed (the teacher's map, the target, stays at its own resolution; a larger student is average-
    pooled as in those references, a smaller one is block-upsampled). The teacher is detached.
    """
    _check_feature(student_feature, "student_feature")
    _check_feature(teacher_feature, "teacher_feature")
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(
            f"student_feature {tuple(student_feature.shape)} and teacher_feature {tuple(teacher_feature.shape)} "
            "must have the same batch size"
        )
    size = teacher_feature.shape[-2:]
    s = student_feature if student_feature.shape[-2:] == size else F.adaptive_avg_pool2d(student_feature, size)
    q_s = attention_map(s, p)
    q_t = attention_map(teacher_feature.detach(), p).to(q_s.dtype)
    return (q_s - q_t).pow(2).mean()
