"""Batched augmentation on tensors: one indexing op per batch instead of a per-sample Python loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .dataset import TensorData


def jitter(x: torch.Tensor, pixels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image of ``x`` (B, C, H, W) by its own random offset of up to ``pixels`` each way.

    Equivalent to a zero-padded random crop of the original size (the paper's 'jittered by up to two
    pixels'). Offsets are drawn on the CPU from ``generator`` so runs are reproducible on any device.
    """
    if pixels <= 0:
        return x
    if x.dim() != 4:
        raise ValueError(f"jitter expects images shaped (B, C, H, W), got {tuple(x.shape)}")
    b, _, h, w = x.shape
    k = pixels
    offsets = torch.randint(0, 2 * k + 1, (2, b), generator=generator).to(x.device)
    padded = F.pad(x, (k, k, k, k))
    rows = torch.arange(h, device=x.device)[None, :] + offsets[0][:, None]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] + offsets[1][:, None]  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing puts the broadcast (B, H, W) dims first and the channel dim last.
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def jittered_copies(data: "TensorData", copies: int, pixels: int, seed: int = 0) -> "TensorData":
    """A fixed augmented transfer set: ``data`` plus ``copies - 1`` randomly jittered versions of it.

    Each copy gets fresh sample ids (``k * stride + id`` for copy ``k``), so a teacher's logits on the
    augmented inputs can be computed once and cached by id — the student then sees the teacher's view of
    translated digits without a teacher forward in every step. Copy 0 is the original data.
    """
    from dataclasses import replace

    if copies < 1:
        raise ValueError(f"copies: need at least 1 (the original), got {copies}")
    gen = torch.Generator().manual_seed(seed)
    stride = int(data.index.max()) + 1 if len(data) else 0
    xs = [data.x] + [jitter(data.x, pixels, gen) for _ in range(copies - 1)]
    return replace(
        data,
        x=torch.cat(xs),
        y=data.y.repeat(copies),
        index=torch.cat([data.index + k * stride for k in range(copies)]),
        name=f"{data.name}-x{copies}",
    )
