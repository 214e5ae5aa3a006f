"""The CIFAR model zoo of the CRD / mdistiller distillation tables, as native registry models.

Specs: ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``
(CIFAR ResNets, basic blocks, widths 16/32/64), ``resnet8x4``, ``resnet32x4`` (stem 32, stages
64/128/256), ``wrn:DEPTH,WIDTH`` (WideResNet, e.g. ``wrn:40,2``; aliases ``wrn_16_1``, ``wrn_16_2``,
``wrn_40_1``, ``wrn_40_2``) and ``vgg8``, ``vgg11``, ``vgg13`` (VGG with batch norm, as mdistiller's
``vgg*_bn`` that its tables call ``vgg*``; ``batch_norm=false`` drops it).

The architectures follow mdistiller (``mdistiller/models/cifar``) and so do the parameter names, so a
state dict of an mdistiller / CRD teacher loads as it is. Two differences, neither touching the
weights: ``forward`` returns the logits alone (features come from forward hooks on the module paths in
each class's ``feature_layers``), and the classifier sits behind adaptive average pooling, so any input
of at least 8x8 works (for 32x32 it is exactly mdistiller's 8x8 average pooling). Parameter counts at
100 classes agree with the CRD table: resnet8 0.08M, resnet20 0.28M, resnet56 0.86M, resnet110 1.74M,
resnet8x4 1.23M, resnet32x4 7.43M, wrn:16,2 0.70M, wrn:40,2 2.26M, vgg8 3.96M, vgg13 9.46M.

ReLUs are not in-place, so a stage output captured by a hook is never overwritten later in the pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kdistill.models.registry import register

__all__ = ["CifarResNet", "WideResNet", "CifarVGG", "RESNET_DEPTHS", "VGG_CONFIGS"]

MIN_SIDE = 8  # three stride-2 steps (ResNet, WRN) or poolings (VGG) still leave at least one pixel

RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
                 "resnet56": 56, "resnet110": 110}
RESNET_X4_DEPTHS = {"resnet8x4": 8, "resnet32x4": 32}

# Conv widths per block, mdistiller's configurations S, A and B (block4 runs without a pooling before it
# on inputs under 64x64, as in mdistiller).
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _image_shape(name: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of ``in_shape``, or a ValueError naming the model when it is not an image of >= 8x8."""
    if len(in_shape) != 3:
        raise ValueError(f"model: {name} needs image input (C, H, W), got shape {tuple(in_shape)}")
    c, h, w = (int(v) for v in in_shape)
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"model: {name} needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}")
    return c, h, w


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


# --------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (depth 6n+2, three stages of n basic blocks), mdistiller's layout.

    ``widths`` is (stem, stage1, stage2, stage3): (16, 16, 32, 64) for resnet20 etc., (32, 64, 128, 256)
    for the x4 models.
    """

    feature_layers: tuple[str, ...] = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        depth: int = 20,
        widths: Sequence[int] = (16, 16, 32, 64),
        name: str = "resnet",
    ) -> None:
        super().__init__()
        c, _, _ = _image_shape(name, in_shape)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model: {name} needs depth 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"model: {name} takes 4 positive widths (stem, stage1-3), got {tuple(widths)}")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = _conv3x3(c, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(stem, w1, n, 1)
        self.layer2 = self._stage(w1, w2, n, 2)
        self.layer3 = self._stage(w2, w3, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride), *(BasicBlock(c_out, c_out) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------- WideResNet


class WideBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis: BN-ReLU-conv-BN-ReLU-(dropout)-conv plus shortcut.

    When the width or stride changes, the shortcut is a 1x1 convolution of the *activated* input, as in
    the reference code. The attribute name ``convShortcut`` is kept so mdistiller weights load.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.dropout = dropout
        self.equal_in_out = c_in == c_out and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.bn1(x))
        out = torch.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = nn.functional.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideGroup(nn.Module):
    """``blocks`` wide blocks, the first one changing width/stride (a ``.layer`` Sequential, as mdistiller)."""

    def __init__(self, blocks: int, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(
            WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(blocks)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-DEPTH-WIDTH: a 16-map stem, three groups of (depth-4)/6 blocks at 16k, 32k, 64k maps, BN-ReLU, fc."""

    feature_layers: tuple[str, ...] = ("block1", "block2", "block3")

    def __init__(
        self, in_shape: Sequence[int], num_classes: int, depth: int = 16, width: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        name = f"wrn:{depth},{width}"
        c, _, _ = _image_shape(name, in_shape)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model: {name} needs depth 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"model: {name} needs width >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model: {name} needs 0 <= dropout < 1, got {dropout}")
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = _conv3x3(c, widths[0])
        self.block1 = WideGroup(n, widths[0], widths[1], 1, dropout)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, dropout)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------------ VGG


class CifarVGG(nn.Module):
    """mdistiller's CIFAR VGG: five conv blocks (3x3 conv [-BN] -ReLU each), 2x2 max-pools between the
    first four, global average pooling and one linear layer on 512 maps.

    Each block ends with its ReLU, so a hook on ``blockK`` sees mdistiller's post-activation feature; the
    ReLU has no weights, so the state-dict keys are mdistiller's. The pooling before ``block4`` only runs
    on inputs of at least 64x64 (mdistiller pools there for 64x64 TinyImageNet, not for 32x32 CIFAR).
    """

    feature_layers: tuple[str, ...] = ("block0", "block1", "block2", "block3", "block4")

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        config: Sequence[Sequence[int]] = VGG_CONFIGS["vgg13"],
        batch_norm: bool = True,
        name: str = "vgg",
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(name, in_shape)
        if len(config) != 5 or not all(config) or min(min(b) for b in config) < 1:
            raise ValueError(f"model: {name} needs five non-empty blocks of positive widths, got {config}")
        for i, widths in enumerate(config):
            setattr(self, f"block{i}", self._block(c, widths, batch_norm))
            c = widths[-1]
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3: nn.Module = nn.MaxPool2d(2) if min(h, w) >= 64 else nn.Identity()
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _block(c_in: int, widths: Sequence[int], batch_norm: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for c_out in widths:
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.pool4(self.block4(x))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------------------------------- registry


def _no_ints(name: str, ints: Sequence[int]) -> None:
    if ints:
        raise ValueError(f"model: {name} takes no positional numbers, got {name}:{','.join(map(str, ints))}")


def _register_resnet(name: str, depth: int, widths: tuple[int, ...]) -> None:
    def build(in_shape, num_classes, ints):
        _no_ints(name, ints)
        return CifarResNet(in_shape, num_classes, depth, widths, name=name)

    build.__doc__ = f"{name}: CIFAR ResNet of depth {depth}, widths {widths}."
    register(name)(build)


for _name, _depth in RESNET_DEPTHS.items():
    _register_resnet(_name, _depth, (16, 16, 32, 64))
for _name, _depth in RESNET_X4_DEPTHS.items():
    _register_resnet(_name, _depth, (32, 64, 128, 256))


@register("wrn")
def _wrn(in_shape, num_classes, ints, dropout=0.0):
    """``wrn:DEPTH[,WIDTH]``: WideResNet with (DEPTH-4)/6 blocks per group, widen factor WIDTH (default 1)."""
    if len(ints) not in (1, 2):
        got = f"wrn:{','.join(map(str, ints))}" if ints else "wrn"
        raise ValueError(f"model: {got!r} needs DEPTH[,WIDTH], e.g. wrn:40,2 or wrn:16,2")
    depth, width = ints[0], ints[1] if len(ints) == 2 else 1
    return WideResNet(in_shape, num_classes, depth, width, dropout)


def _register_wrn_alias(depth: int, width: int) -> None:
    name = f"wrn_{depth}_{width}"

    def build(in_shape, num_classes, ints, dropout=0.0):
        _no_ints(name, ints)
        return WideResNet(in_shape, num_classes, depth, width, dropout)

    build.__doc__ = f"{name}: alias of wrn:{depth},{width}."
    register(name)(build)


for _depth, _width in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn_alias(_depth, _width)


def _register_vgg(name: str) -> None:
    def build(in_shape, num_classes, ints, batch_norm=True):
        _no_ints(name, ints)
        return CifarVGG(in_shape, num_classes, VGG_CONFIGS[name], bool(batch_norm), name=name)

    build.__doc__ = f"{name}: mdistiller's CIFAR VGG (configuration {VGG_CONFIGS[name]}), batch norm by default."
    register(name)(build)


for _name in VGG_CONFIGS:
    _register_vgg(_name)
