"""Distillation losses: pure functions of logits.

With p = softmax(teacher / T) and q = softmax(student / T):

* ``kl``:        T^2 * KL(p || q), summed over classes, averaged over the batch ("batchmean");
* ``soft_ce``:   T^2 * mean over the batch of -sum p log q (KL plus the teacher's entropy: same gradient);
* ``logit_mse``: mean over batch and classes of (s - t)^2 (Caruana's logit matching; T does not enter);
* ``prob_mse``:  mean over batch and classes of (q - p)^2.

The soft terms' gradients scale as 1/T^2, hence the T^2 factor: it keeps their weight relative to the
hard-label cross-entropy unchanged when T changes (Hinton et al. 2015, section 2). Everything is
computed from ``log_softmax``, so logits of any magnitude give finite values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("kl", "soft_ce", "logit_mse", "prob_mse")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last dimension."""
    _check_temperature(temperature)
    return F.softmax(logits / temperature, dim=-1)


def soft_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, kind: str = "kl"
) -> torch.Tensor:
    """The soft-target term alone (already T^2-scaled for ``kl`` and ``soft_ce``)."""
    _check_temperature(temperature)
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {LOSS_KINDS}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape (batch, classes)"
        )
    out_dtype = student_logits.dtype
    # The soft term costs O(batch x classes): compute it in float64 (where the device has it) so that
    # T^2 does not amplify float32 cancellation in log p - log q at high temperatures.
    work = torch.float32 if student_logits.device.type == "mps" else torch.float64
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


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    kind: str = "kl",
) -> torch.Tensor:
    """``alpha`` * soft term + (1 - ``alpha``) * cross-entropy with the hard ``labels``.

    ``alpha`` is the weight of the soft targets: 1 means pure distillation (no labels needed),
    0 means ordinary supervised training.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: the soft-target weight must be in [0, 1], got {alpha}")
    if alpha < 1.0:
        if labels is None:
            raise ValueError(f"labels: required when alpha < 1 (alpha={alpha}); pass labels or set alpha=1")
        if labels.shape != student_logits.shape[:1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match batch {student_logits.shape[0]}")
    soft = soft_loss(student_logits, teacher_logits, temperature=temperature, kind=kind)
    if alpha == 1.0:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels).to(soft.dtype)
    return alpha * soft + (1.0 - alpha) * hard
