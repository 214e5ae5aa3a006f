"""``kd``: Hinton, Vinyals & Dean (2015), soft targets at temperature T mixed with the hard labels.

``alpha`` is the soft-target weight: ``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels)``. ``kind``
picks the soft term (any registered kind: ``kl``, ``reverse_kl``, ``jsd``, ``tv``, ``soft_ce``, ``logit_mse``,
``prob_mse``; see :mod:`kdistill.losses.divergences`); ``beta`` is ``jsd``'s teacher weight (TRL's convention,
default 0.5), refused with another kind. A sparse cached teacher (:mod:`kdistill.teachers.sparse`) hands the
loss its top-k targets, which :mod:`kdistill.losses.sparse` uses with the left-out mass as one bucket.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdistill.losses import LOSS_KINDS, hard_loss, soft_loss
from kdistill.losses.divergences import resolve
from kdistill.losses.sparse import SparseTargets, sparse_distillation_terms, sparse_soft_loss
from kdistill.methods.base import Method, StepIO, register


def check_temperature(value: float, field: str = "method.temperature") -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1e4):
        raise ValueError(f"{field}: must be a finite number in (0, 1e4], got {value!r}")


def check_weight(value: float, field: str, upper: float | None = None) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 and (upper is None or value <= upper)):
        bound = f"[0, {upper}]" if upper is not None else ">= 0 and finite"
        raise ValueError(f"{field}: must be {bound}, got {value!r}")


@register("kd")
class KD(Method):
    """Soft targets (``alpha``) plus hard labels (``1 - alpha``); the terms are logged as ``kd`` and ``ce``.

    The defaults (T = 1, alpha = 1: soft targets only) are what ``fit`` uses with a teacher and no method;
    CIFAR recipes use T = 4, alpha = 0.9.
    """

    stackable = True
    per_position = True
    sparse_targets = True
    """Whether the method trains from a sparse (top-k) cached teacher's targets."""

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0, kind: str = "kl", beta: float | None = None) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weight(alpha, "method.alpha", 1.0)
        if kind not in LOSS_KINDS:
            raise ValueError(f"method.kind: must be one of {LOSS_KINDS}, got {kind!r}")
        if beta is not None and kind != "jsd":
            raise ValueError(f"method.beta: is the jsd kind's teacher weight, but method.kind is {kind!r}; "
                             "set method.kind: jsd or remove beta")
        self.temperature, self.alpha, self.kind, self.beta = float(temperature), float(alpha), kind, beta
        try:
            self._kind_options = resolve(kind, {} if beta is None else {"beta": beta})[1]
        except ValueError as exc:
            raise ValueError(f"method.{exc}") from None
        if kind == "jsd":
            self.beta = float(self._kind_options["beta"])

    def options(self) -> dict:
        """As recorded: ``beta`` only with ``kind: jsd`` (records of the other kinds stay as they were)."""
        opts = super().options()
        if self.kind != "jsd":
            opts.pop("beta", None)
        return opts

    @property
    def needs_labels(self) -> bool:
        return self.alpha < 1

    def losses(self, io: StepIO) -> dict[str, torch.Tensor]:
        logits = io.student_logits.float()
        if isinstance(io.teacher_logits, SparseTargets):
            return self._sparse_losses(logits, io)
        if logits.dim() > 2:
            return self._position_losses(logits, io)
        soft = soft_loss(logits, io.teacher_logits, temperature=self.temperature, kind=self.kind, **self._kind_options)
        if self.alpha == 1.0:
            return {"kd": soft}
        hard = F.cross_entropy(logits, io.labels).to(soft.dtype)
        return {"kd": self.alpha * soft, "ce": (1.0 - self.alpha) * hard}

    def _position_losses(self, logits: torch.Tensor, io: StepIO) -> dict[str, torch.Tensor]:
        """Per-position logits (B, L, C): each term averaged over the valid positions (label not -100) of
        the whole batch (``io.normalizer``), the same positions for both terms."""
        soft = soft_loss(logits, io.teacher_logits, temperature=self.temperature, kind=self.kind, labels=io.labels,
                         normalizer=io.normalizer, **self._kind_options)
        return self._mix(soft, logits, io)

    def _sparse_losses(self, logits: torch.Tensor, io: StepIO) -> dict[str, torch.Tensor]:
        """Sparse teacher targets (top-k + tail bucket, :mod:`kdistill.losses.sparse`): the same valid positions,
        normaliser and hard term as dense targets. One label per sample (B, C) uses every row."""
        labels = io.labels if logits.dim() > 2 else None
        if self.alpha < 1.0 and labels is not None:  # both terms in one pass over the logits (kl, soft_ce)
            loss, hard = sparse_distillation_terms(logits, io.teacher_logits, labels, temperature=self.temperature,
                                                   alpha=self.alpha, kind=self.kind, normalizer=io.normalizer,
                                                   **self._kind_options)
            ce = (1.0 - self.alpha) * hard  # detached: the gradient of both terms flows through "kd" below
            return {"kd": loss - ce, "ce": ce}
        soft = sparse_soft_loss(logits, io.teacher_logits, temperature=self.temperature, kind=self.kind,
                                labels=labels, normalizer=io.normalizer, **self._kind_options)
        return self._mix(soft, logits, io)

    def _mix(self, soft: torch.Tensor, logits: torch.Tensor, io: StepIO) -> dict[str, torch.Tensor]:
        if self.alpha == 1.0:
            return {"kd": soft}
        hard = hard_loss(logits, io.labels, normalizer=io.normalizer).to(soft.dtype)
        return {"kd": self.alpha * soft, "ce": (1.0 - self.alpha) * hard}
