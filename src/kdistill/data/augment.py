"""Batched augmentation on tensors: one indexing op per batch instead of a per-sample Python loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .dataset import TensorData


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device`` without making the host wait for the GPU's queued work.

    A plain ``.to("cuda")`` from pageable memory synchronises the stream: once per training step that
    would stall the host behind every kernel already queued. A pinned staging copy lets the transfer
    queue behind them instead (torch's pinned allocator keeps the buffer alive until the copy is done).
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def jitter_offsets(batch: int, pixels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(2, ``batch``) random row and column offsets in [0, 2 * ``pixels``], drawn on the CPU.

    Drawn on the CPU from ``generator`` so that runs are reproducible on any device.
    """
    return torch.randint(0, 2 * pixels + 1, (2, batch), generator=generator)


def translate(x: torch.Tensor, offsets: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate image i of ``x`` (B, C, H, W) by ``offsets[:, i] - pixels``, zero-filling the border.

    Equivalent to a zero-padded crop of the original size at the given offsets; ``offsets`` must be on
    ``x``'s device (a CUDA graph replays this with offsets refilled in place).
    """
    if x.dim() != 4:
        raise ValueError(f"jitter expects images shaped (B, C, H, W), got {tuple(x.shape)}")
    b, _, h, w = x.shape
    k = pixels
    padded = F.pad(x, (k, k, k, k))
    rows = torch.arange(h, device=x.device)[None, :] + offsets[0][:, None]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] + offsets[1][:, None]  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing puts the broadcast (B, H, W) dims first and the channel dim last.
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def jitter(x: torch.Tensor, pixels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image of ``x`` (B, C, H, W) by its own random offset of up to ``pixels`` each way.

    Equivalent to a zero-padded random crop of the original size (the paper's 'jittered by up to two
    pixels'). Offsets come from :func:`jitter_offsets`, so runs are reproducible on any device.
    """
    if pixels <= 0:
        return x
    offsets = to_device_async(jitter_offsets(x.shape[0], pixels, generator), x.device)
    return translate(x, offsets, pixels)


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
