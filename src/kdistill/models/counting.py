"""Parameter and FLOP counts, so reports can state model size and benchmark efficiency."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Forward FLOPs of one sample (2 per multiply-add) of its Linear and Conv2d layers.

    Counted by running one sample through forward hooks, so any composition of those layers works.
    Activations, pooling and normalisation are ignored: they are a rounding error for these models.
    """
    total = 0

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * m.in_features * m.out_features * (out.numel() // out.shape[-1])

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        per_output = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total += 2 * per_output * out.numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            model(torch.zeros(1, *in_shape, device=p.device if p is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
