"""How a sparse teacher cache stores the k classes kept per position: as few bits as the vocabulary allows.

Two layouts, the smaller one chosen per (vocabulary V, k) by :func:`layout_for`:

* ``packed``: each class id in ``ceil(log2 V)`` bits, the k ids of a position one after the other in a little-endian
  bit string (bit i of the string is bit ``i % 8`` of byte ``i // 8``), padded to whole bytes: ``ceil(k * b / 8)``
  bytes. 11 bits for a 2,048-token vocabulary, 17 for 128k, where a whole integer type would spend 16 or 32.
* ``bitmap``: one bit per class of the vocabulary, set for the k kept: ``ceil(V / 8)`` bytes whatever k. Smaller
  when k is a large part of V (k = 128 of V = 256 bytes: 32 bytes where packed ids take 128). The ids come back in
  increasing order, so the values are stored in that order too (:func:`encode` permutes them); the loss treats
  the kept classes as a set, so the order does not change it.

Both are exact: :func:`decode` returns the very ids :func:`encode` was given (as int64), in the stored order.
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("packed", "bitmap")


def index_bits(num_classes: int) -> int:
    """Bits per class id for ``num_classes`` classes (ids 0 .. num_classes - 1), at least 1."""
    return max(1, (int(num_classes) - 1).bit_length())


def code_bytes(num_classes: int, k: int, layout: str) -> int:
    """Bytes per position of ``layout`` for k kept classes out of ``num_classes``."""
    if layout == "bitmap":
        return math.ceil(num_classes / 8)
    return math.ceil(k * index_bits(num_classes) / 8)


def layout_for(num_classes: int, k: int) -> str:
    """The smaller layout for k kept classes out of ``num_classes`` (``packed`` on a tie: it keeps the order)."""
    return "bitmap" if code_bytes(num_classes, k, "bitmap") < code_bytes(num_classes, k, "packed") else "packed"


def _to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) 0/1 integers -> (..., ceil(n / 8)) uint8, little-endian within each byte."""
    n = bits.shape[-1]
    pad = (-n) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    return (bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _to_bits(codes: torch.Tensor, n: int) -> torch.Tensor:
    """(..., m) uint8 -> the first ``n`` bits, (..., n) int32 0/1, the inverse of :func:`_to_bytes`."""
    shifts = torch.arange(8, device=codes.device, dtype=torch.int32)
    bits = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*codes.shape[:-1], -1)[..., :n]


def encode(values: torch.Tensor, indices: torch.Tensor, num_classes: int,
           layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(values, codes, layout) for the kept classes ``indices`` (..., k) with their ``values`` (..., k): ``codes``
    (..., code_bytes) uint8; under ``bitmap`` the values come back permuted into increasing class order."""
    k = indices.shape[-1]
    layout = layout or layout_for(num_classes, k)
    if layout not in LAYOUTS:
        raise ValueError(f"index layout: one of {LAYOUTS}, got {layout!r}")
    idx = indices.long()
    if layout == "bitmap":
        idx, order = idx.sort(dim=-1)
        values = values.gather(-1, order)
        bits = torch.zeros(*idx.shape[:-1], num_classes, dtype=torch.int32, device=idx.device).scatter_(-1, idx, 1)
        return values, _to_bytes(bits), layout
    b = index_bits(num_classes)
    bits = (idx.unsqueeze(-1) >> torch.arange(b, device=idx.device)) & 1  # (..., k, b)
    return values, _to_bytes(bits.reshape(*idx.shape[:-1], k * b)), layout


def decode(codes: torch.Tensor, num_classes: int, k: int, layout: str) -> torch.Tensor:
    """The kept class ids (..., k) int64 that :func:`encode` stored in ``codes`` (..., code_bytes)."""
    lead = codes.shape[:-1]
    if layout == "bitmap":
        bits = _to_bits(codes, num_classes).reshape(-1, num_classes)
        return bits.nonzero()[:, 1].reshape(*lead, k)  # row-major: each row's k set bits, increasing
    if layout != "packed":
        raise ValueError(f"index layout: one of {LAYOUTS}, got {layout!r}")
    b = index_bits(num_classes)
    bits = _to_bits(codes, k * b).reshape(*lead, k, b).long()
    return (bits << torch.arange(b, device=codes.device)).sum(-1)
