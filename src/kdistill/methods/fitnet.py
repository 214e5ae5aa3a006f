"""``fitnet``: FitNets hints (Romero et al., ICLR 2015).

A trainable regressor maps each named student feature to the shape of its teacher feature (a 1x1 conv with
batch norm for maps, as mdistiller's ConvReg, resized when the spatial sizes differ; a linear layer for
vectors); the hint loss is their mean squared error, weighted by ``weight``. The optimiser and the
checkpoint include the regressors. The hard-label term (``ce_weight``) and an optional KD term
(``kd_weight`` at ``temperature``) are added, as the papers train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.losses import hint_loss
from kdistill.methods.base import Method, StepIO, register
from kdistill.methods.features import extra_terms, resolve_pairs
from kdistill.methods.kd import check_temperature, check_weight


class Regressor(nn.Module):
    """Student feature -> teacher feature shape."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size) -> None:
        super().__init__()
        if len(s_shape) == 4 and len(t_shape) == 4:
            self.net: nn.Module = nn.Sequential(nn.Conv2d(s_shape[1], t_shape[1], 1, bias=False), nn.BatchNorm2d(t_shape[1]))
            self.size = tuple(t_shape[2:]) if tuple(s_shape[2:]) != tuple(t_shape[2:]) else None
        else:
            self.net = nn.Linear(int(torch.tensor(s_shape[1:]).prod()), int(torch.tensor(t_shape[1:]).prod()))
            self.size = None
        self.t_shape = tuple(t_shape[1:])

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, nn.Linear):
            return self.net(f.flatten(1)).view(-1, *self.t_shape)
        if self.size is not None:
            f = F.adaptive_avg_pool2d(f, self.size)
        return self.net(f)


@register("fitnet")
class FitNet(Method):
    """Hint loss through trainable regressors; terms ``hint``, ``ce`` (and ``kd``)."""

    def __init__(self, student_layers: tuple = (), teacher_layers: tuple = (), weight: float = 100.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__()
        check_weight(weight, "method.weight")
        check_weight(ce_weight, "method.ce_weight")
        check_weight(kd_weight, "method.kd_weight")
        check_temperature(temperature)
        self.student_layers, self.teacher_layers = tuple(student_layers), tuple(teacher_layers)
        self.weight, self.ce_weight, self.kd_weight, self.temperature = float(weight), float(ce_weight), float(kd_weight), float(temperature)
        self.regressors = nn.ModuleList()

    @property
    def needs_labels(self) -> bool:
        return self.ce_weight > 0

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.student_features, self.teacher_features = resolve_pairs(
            student, teacher, self.student_layers, self.teacher_layers, "middle", "fitnet")

    def setup(self, student_features, teacher_features, student_logits, teacher_logits) -> None:
        if len(self.regressors):
            return  # resumed or re-used: already built
        for s, t in zip(self.student_features, self.teacher_features):
            self.regressors.append(Regressor(student_features[s].shape, teacher_features[t].shape))

    def losses(self, io: StepIO) -> dict[str, torch.Tensor]:
        hint = sum(hint_loss(reg(io.student_features[s].float()), io.teacher_features[t].float())
                   for reg, s, t in zip(self.regressors, self.student_features, self.teacher_features))
        return {"hint": self.weight * hint, **extra_terms(io.student_logits, io.teacher_logits, io.labels,
                                                          self.ce_weight, self.kd_weight, self.temperature)}
