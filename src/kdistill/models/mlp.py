"""Fully connected nets: the paper's 2x1200 teacher, 2x800 student and the tiny 2x20 student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def apply_max_norm(module: nn.Module, max_norm: float) -> None:
    """Rescale each unit's incoming weight vector to L2 norm <= ``max_norm`` (Hinton et al.'s constraint)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight  # in place and in any memory layout (a channels_last conv weight cannot be .view()ed)
                norms = w.flatten(1).norm(dim=1).clamp_min(1e-12)
                w.mul_(torch.clamp(max_norm / norms, max=1.0).view(-1, *[1] * (w.dim() - 1)))


class MLP(nn.Module):
    """Flatten, then ``hidden`` fully connected layers and a linear output producing logits.

    ``input_dropout`` / ``dropout`` follow the dropout-net recipe the paper's teacher used;
    ``max_norm`` (if set) is enforced by :meth:`constrain`, which the trainer calls after each step.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        max_norm: float | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: {activation!r} is not one of {sorted(ACTIVATIONS)}")
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {p}")
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.hidden = tuple(hidden)
        self.max_norm = max_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def constrain(self) -> None:
        if self.max_norm:
            apply_max_norm(self, self.max_norm)
