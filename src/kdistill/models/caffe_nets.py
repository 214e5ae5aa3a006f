"""The small Caffe example nets used by teacher-student write-ups: MNIST LeNet, CIFAR-10 "quick" and "mini".

* ``caffe_lenet``: Caffe's MNIST LeNet (not LeCun's LeNet-5): conv 20 5x5 -> max-pool 2 -> conv 50 5x5 ->
  max-pool 2 -> fc 500 -> ReLU -> fc. There is no non-linearity after the convolutions, as in Caffe's
  example. Weights start from Caffe's "xavier" filler (uniform, variance 1/fan_in) and biases at zero.
* ``cifar_quick``: Caffe's CIFAR-10 quick model: three 5x5 convolutions (32, 32, 64 maps, padding 2),
  each followed by a 3x3 stride-2 pooling (max after the first, average after the others; Caffe rounds
  the output size up, so 32 -> 16 -> 8 -> 4), then fc 64 -> fc 10 (no ReLU between them, as in Caffe).
* ``cifar_mini``: the same with the third convolution (and its ReLU) removed, keeping its pooling.

Every builder takes optional channel counts, e.g. ``cifar_quick:32,32,64`` or ``caffe_lenet:20,50,500``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kdistill.models.registry import register


def xavier_fill(module: nn.Module) -> nn.Module:
    """Caffe's "xavier" filler: weights uniform in +-sqrt(3 / fan_in), biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = math.sqrt(3.0 / fan_in)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def _need_image(name: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(f"model: {name} needs image input (C, H, W), got shape {tuple(in_shape)}")
    c, h, w = (int(v) for v in in_shape)
    return c, h, w


def _widths(name: str, ints: Sequence[int], default: tuple[int, ...]) -> tuple[int, ...]:
    if not ints:
        return default
    if len(ints) != len(default) or min(ints) < 1:
        raise ValueError(f"model: {name} takes {len(default)} positive widths (default {default}), got {tuple(ints)}")
    return tuple(ints)


class CaffeLeNet(nn.Module):
    """Caffe's MNIST LeNet: two 5x5 convolutions with max-pooling, a 500-unit ReLU layer, logits."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (20, 50, 500)) -> None:
        super().__init__()
        c, h, w = _need_image("caffe_lenet", in_shape)
        c1, c2, fc = widths
        side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if side_h < 1 or side_w < 1:
            raise ValueError(f"model: caffe_lenet needs images of at least 16x16, got {h}x{w}")
        self.features = nn.Sequential(nn.Conv2d(c, c1, 5), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5), nn.MaxPool2d(2))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side_h * side_w, fc), nn.ReLU(), nn.Linear(fc, num_classes)
        )
        xavier_fill(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _pool_out(side: int) -> int:
    """Output side of a 3x3 stride-2 pooling with Caffe's round-up (PyTorch ``ceil_mode=True``)."""
    return math.ceil((side - 3) / 2) + 1


class CifarQuick(nn.Module):
    """Caffe's CIFAR-10 quick model (``third_conv=True``) or the "mini" model without the third convolution."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (32, 32, 64, 64),
        third_conv: bool = True,
    ) -> None:
        super().__init__()
        c, h, w = _need_image("cifar_quick", in_shape)
        if min(h, w) < 8:
            raise ValueError(f"model: cifar_quick/cifar_mini need images of at least 8x8, got {h}x{w}")
        c1, c2, c3, fc = widths
        layers: list[nn.Module] = [
            nn.Conv2d(c, c1, 5, padding=2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool2d(3, 2, ceil_mode=True),
        ]
        out_c = c2
        if third_conv:
            layers += [nn.Conv2d(c2, c3, 5, padding=2), nn.ReLU()]
            out_c = c3
        layers.append(nn.AvgPool2d(3, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        side_h, side_w = _pool_out(_pool_out(_pool_out(h))), _pool_out(_pool_out(_pool_out(w)))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(out_c * side_h * side_w, fc), nn.Linear(fc, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("caffe_lenet")
def _caffe_lenet(in_shape, num_classes, ints):
    return CaffeLeNet(in_shape, num_classes, _widths("caffe_lenet", ints, (20, 50, 500)))


@register("cifar_quick")
def _cifar_quick(in_shape, num_classes, ints):
    return CifarQuick(in_shape, num_classes, _widths("cifar_quick", ints, (32, 32, 64, 64)), third_conv=True)


@register("cifar_mini")
def _cifar_mini(in_shape, num_classes, ints):
    widths = _widths("cifar_mini", ints, (32, 32, 64))
    return CifarQuick(in_shape, num_classes, (widths[0], widths[1], 1, widths[2]), third_conv=False)
