"""Batched augmentation on tensors: one indexing op per batch instead of a per-sample Python loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
