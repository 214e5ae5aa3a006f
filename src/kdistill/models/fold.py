"""BatchNorm folded into the convolution before it, for a frozen network's inference.

A teacher in eval mode applies each BatchNorm as a fixed affine map, so ``conv -> bn`` equals one conv with
rescaled weights and a bias: the same logits (to float rounding) without the BatchNorm's pass over every
activation. On a CPU that pass is a memory-bound share of a CIFAR ResNet's forward; the teacher's forward
is run on every batch of a live distillation, so it is worth removing there. The fusion itself is PyTorch's
(``torch.fx.experimental.optimization.fuse``); this module decides when it is safe and checks the result.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_hooks(module: nn.Module) -> bool:
    """Whether any module of the tree has forward (pre-)hooks: a traced copy would silently drop them."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def fold_batchnorm(module: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> nn.Module | None:
    """An eval-mode copy of ``module`` with every ``conv -> BatchNorm`` folded, or None where folding does not
    apply: training mode, no BatchNorm, hooks on the tree, a forward that ``torch.fx`` cannot trace, or a
    folded copy whose output on ``example`` differs from the original's by more than ``atol`` relative to
    the output's scale (a BatchNorm whose input is also used elsewhere is left alone by the fusion)."""
    if module.training or has_hooks(module) or not any(isinstance(m, _BN) for m in module.modules()):
        return None
    try:
        with warnings.catch_warnings():  # the module imports torch.utils.mkldnn, deprecated TorchScript at import
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse

        plain = copy.deepcopy(module)
        vars(plain).pop("train", None)  # an instance-level train() (a frozen teacher's no-op) is not traceable state
        folded = fuse(plain, inplace=True)
    except Exception:  # noqa: BLE001 - any tracing failure means "keep the original"
        return None
    folded.eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        want, got = module(example), folded(example)
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)) or want.shape != got.shape:
        return None
    scale = want.abs().max().clamp_min(1.0)
    if not torch.allclose(want, got, rtol=0.0, atol=atol * float(scale)):
        return None
    return folded
