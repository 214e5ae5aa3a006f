"""Convolutional nets: a CNN teacher for MNIST-sized images and LeNet-5."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvNet(nn.Module):
    """``[conv k x k -> ReLU -> 2x2 max-pool]`` per entry of ``channels``, then a dropout MLP head.

    With channels (32, 64), kernel 5 and a 256-unit head it is the usual strong MNIST CNN (~99.5%).
    Each block runs the pooling before the ReLU: the same function and the same gradients (ReLU is
    monotone, so it commutes with a max), with the ReLU's memory traffic cut to a quarter.
    ``feature_layers`` are the blocks' outputs (each block's ReLU: ``features.2``, ``features.5``, ...),
    the stages that feature methods (``fitnet``, ``at``) read by default.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        kernel: int = 5,
        hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"cnn: needs image input (C, H, W), got shape {tuple(in_shape)}")
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out_c in channels:
            layers += [nn.Conv2d(c, out_c, kernel, padding=kernel // 2), nn.MaxPool2d(2), nn.ReLU()]
            c, h, w = out_c, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.feature_layers: tuple[str, ...] = tuple(f"features.{3 * i + 2}" for i in range(len(channels)))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LeNet5(nn.Module):
    """LeCun et al.'s LeNet-5 (6 and 16 feature maps, 120-84 head), with ReLU and max-pooling (pooling
    first, as in :class:`ConvNet`: the same function, a cheaper ReLU); its two blocks are its feature stages."""

    feature_layers: tuple[str, ...] = ("features.2", "features.5")

    def __init__(self, in_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        pad = 2 if h < 32 else 0  # 28x28 MNIST is padded to LeNet's 32x32
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
        )
        side_h, side_w = ((h + 2 * pad - 4) // 2 - 4) // 2, ((w + 2 * pad - 4) // 2 - 4) // 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side_h * side_w, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
