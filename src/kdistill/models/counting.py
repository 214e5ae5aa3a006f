"""Parameter and FLOP counts, so reports can state model size and benchmark efficiency."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Forward FLOPs of one sample, counting a multiply-add as 2 FLOPs.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one forward pass of a single zero
    sample (eval mode, no autograd), so every matrix product and convolution the forward dispatches is
    seen, whichever module or functional call issues it (Linear, Conv*, ``bmm``/``matmul``, attention).
    FlopCounterMode already counts ``2 * M * N * K`` per product (one multiply-add = 2 FLOPs) and
    leaves out bias additions, activations, pooling and normalisation, which is the convention the
    earlier hand-written Linear/Conv2d hook counter used, so numbers recorded before stay comparable
    (for Linear/Conv2d-only models they are identical).
    """
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    x = torch.zeros(1, *in_shape, device=p.device if p is not None else "cpu")
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
