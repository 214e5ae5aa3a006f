"""``at``: attention transfer (Zagoruyko & Komodakis, ICLR 2017).

Each named layer pair contributes the mean squared difference of the L2-normalised attention maps
mean_c(|a|^p) (:func:`kdistill.losses.attention_transfer_loss`); their sum is weighted by ``beta``
(1000 as in mdistiller's CIFAR recipe, with p = 2). Plus the hard-label term and an optional KD term.
"""

from __future__ import annotations

import torch

from kdistill.losses import attention_transfer_loss
from kdistill.methods.base import Method, StepIO, register
from kdistill.methods.features import extra_terms, resolve_pairs
from kdistill.methods.kd import check_temperature, check_weight


@register("at")
class AttentionTransfer(Method):
    """Attention maps of the named layers matched; terms ``at``, ``ce`` (and ``kd``)."""

    def __init__(self, student_layers: tuple = (), teacher_layers: tuple = (), beta: float = 1000.0, p: float = 2.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__()
        check_weight(beta, "method.beta")
        if not (p > 0 and p < 100):
            raise ValueError(f"method.p: the attention exponent must be in (0, 100), got {p!r}")
        check_weight(ce_weight, "method.ce_weight")
        check_weight(kd_weight, "method.kd_weight")
        check_temperature(temperature)
        self.student_layers, self.teacher_layers = tuple(student_layers), tuple(teacher_layers)
        self.beta, self.p = float(beta), float(p)
        self.ce_weight, self.kd_weight, self.temperature = float(ce_weight), float(kd_weight), float(temperature)

    @property
    def needs_labels(self) -> bool:
        return self.ce_weight > 0

    def bind(self, student, teacher) -> None:
        self.student_features, self.teacher_features = resolve_pairs(
            student, teacher, self.student_layers, self.teacher_layers, "all", "at")

    def losses(self, io: StepIO) -> dict[str, torch.Tensor]:
        at = sum(attention_transfer_loss(io.student_features[s].float(), io.teacher_features[t].float(), p=self.p)
                 for s, t in zip(self.student_features, self.teacher_features))
        return {"at": self.beta * at, **extra_terms(io.student_logits, io.teacher_logits, io.labels,
                                                    self.ce_weight, self.kd_weight, self.temperature)}
