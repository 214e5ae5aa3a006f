"""``ce``: plain supervised training on the hard labels (a student's baseline, or a teacher's training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses import hard_loss
from kdistill.methods.base import Method, StepIO, register


@register("ce")
class CrossEntropy(Method):
    """Cross-entropy with the hard labels; no teacher."""

    needs_teacher = False
    stackable = True
    per_position = True

    def __init__(self) -> None:
        super().__init__()

    def losses(self, io: StepIO) -> dict[str, torch.Tensor]:
        if io.student_logits.dim() > 2:  # per position: mean over the whole batch's valid positions
            return {"ce": hard_loss(io.student_logits.float(), io.labels, normalizer=io.normalizer)}
        return {"ce": F.cross_entropy(io.student_logits.float(), io.labels)}
