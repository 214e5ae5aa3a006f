"""``dkd``: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

Loss = ``ce_weight`` * CE(labels) + warm-up * (``alpha`` * TCKD + ``beta`` * NCKD), with both KD parts
T^2-scaled (:func:`kdistill.losses.dkd_loss`). The DKD weight rises linearly from 0 over the first
``warmup`` epochs, as in the paper's code (20 of 240 epochs on CIFAR-100); ``warmup=0`` turns it off.
A run of at most ``warmup`` epochs gets a :class:`~kdistill.methods.base.ScheduleWarning` before training
(the term would never reach full weight) naming ``method.warmup`` and a value for the run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses import dkd_loss
from kdistill.methods.base import Method, StepIO, register
from kdistill.methods.kd import check_temperature, check_weight


@register("dkd")
class DKD(Method):
    """Target-class (TCKD) and non-target-class (NCKD) KD, weighted separately; terms ``ce`` and ``dkd``."""

    schedule_options = ("warmup",)

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup: float = 20.0) -> None:
        super().__init__()
        check_weight(alpha, "method.alpha")
        check_weight(beta, "method.beta")
        check_temperature(temperature)
        check_weight(ce_weight, "method.ce_weight")
        check_weight(warmup, "method.warmup")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.ce_weight, self.warmup = float(ce_weight), float(warmup)

    @property
    def needs_labels(self) -> bool:
        return True  # TCKD splits the distribution at the target class

    def losses(self, io: StepIO) -> dict[str, torch.Tensor]:
        logits = io.student_logits.float()
        ramp = 1.0
        if self.warmup > 0:
            p = io.progress
            ramp = torch.clamp(p / self.warmup, max=1.0) if isinstance(p, torch.Tensor) else min(float(p) / self.warmup, 1.0)
        kd = dkd_loss(logits, io.teacher_logits, io.labels, alpha=self.alpha, beta=self.beta,
                      temperature=self.temperature)
        return {"ce": self.ce_weight * F.cross_entropy(logits, io.labels), "dkd": ramp * kd}
