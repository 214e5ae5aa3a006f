"""Batched augmentation on tensors: one indexing op per batch instead of a per-sample Python loop.

Besides the jitter helpers used by the trainers, :class:`Augment` is a parsed augmentation spec
(``"crop2,flip"``) whose random parameters are drawn on the CPU (:meth:`Augment.draw`, reproducible on
any device) or derived from (sample id, view, seed) by a hash (:meth:`Augment.view_params`, for teacher
logits cached per augmented view), and applied on the device by pure tensor ops (:meth:`Augment.apply`,
capturable in a CUDA graph). :func:`normalize` and :func:`channel_stats` handle per-channel scaling.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kdistill.data.dataset import TensorData


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


# --------------------------------------------------------------------------- augmentation specs

_KNOWN_OPS = ("crop", "flip", "jitter")
_KNOWN_TEXT = "crop<N>, flip, jitter<N>"
_OP_RE = re.compile(r"^([a-z_]+)([+-]?\d+)?$")


class AugParams(NamedTuple):
    """The random parameters of one batch: what :meth:`Augment.apply` needs besides the images.

    ``offsets``: (2, B) long crop offsets in [0, 2 * pixels] (as :func:`jitter_offsets`), or None without
    a crop; ``flip``: (B,) bool, True where the image is flipped horizontally, or None without a flip.
    """

    offsets: torch.Tensor | None = None
    flip: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "AugParams":
        """These parameters on ``device`` (via :func:`to_device_async`: no host stall on CUDA)."""
        device = torch.device(device)
        return AugParams(*(None if t is None else to_device_async(t, device) for t in self))


@dataclass(frozen=True)
class Augment:
    """A batched augmentation: a zero-padded random crop of ``crop`` pixels and/or a horizontal flip.

    ``crop=N`` translates each image by up to N pixels each way, zero-filling the border (the same as a
    random crop of the original size from the image padded by N: the paper's jitter); ``flip`` mirrors
    each image left-right with probability 0.5. The crop is applied first, then the flip. Build one from
    a spec string with :func:`parse_augment`; ``str(aug)`` gives the canonical spec back.
    """

    crop: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 0:
            raise ValueError(f"train.augment: crop must be a pixel count >= 0, got {self.crop!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"train.augment: flip must be a bool, got {self.flip!r}")

    def __str__(self) -> str:
        ops = ([f"crop{self.crop}"] if self.crop else []) + (["flip"] if self.flip else [])
        return ",".join(ops) or "none"

    @property
    def is_identity(self) -> bool:
        """True when the augmentation leaves every image unchanged."""
        return self.crop == 0 and not self.flip

    @property
    def pixels(self) -> int:
        """The crop padding (the largest translation each way); 0 without a crop."""
        return self.crop

    def draw(self, batch: int, generator: torch.Generator | None = None) -> AugParams:
        """Random parameters for ``batch`` images, drawn on the CPU from ``generator``.

        The crop offsets are drawn first, exactly as :func:`jitter_offsets`, then the flip mask: a spec of
        only ``cropN`` consumes the generator as ``jitter_offsets(batch, N, generator)`` does, so it
        reproduces the jitter runs bit for bit.
        """
        offsets = jitter_offsets(batch, self.crop, generator) if self.crop else None
        flip = torch.rand(batch, generator=generator) < 0.5 if self.flip else None
        return AugParams(offsets, flip)

    def view_params(self, ids: torch.Tensor, view: int | torch.Tensor, seed: int = 0) -> AugParams:
        """Deterministic parameters for view ``view`` of the samples ``ids`` (on the CPU).

        Each sample's parameters are a pure function of (id, view, seed) -- a splitmix64 hash, not a
        generator stream -- so the same triple gives the same pixels in any batch, order or run: a
        teacher's logits on view k of sample i can be computed once and cached under (i, k). Every view,
        view 0 included, is a random draw (no view is the un-augmented image); ``view`` is one int or
        one per sample.
        """
        ids = torch.as_tensor(ids).to("cpu", torch.int64).reshape(-1)
        views = torch.as_tensor(view).to("cpu", torch.int64)
        if views.dim() > 1 or (views.dim() == 1 and views.shape != ids.shape):
            raise ValueError(f"view: need one int or one per sample ({ids.numel()}), got shape {tuple(views.shape)}")
        key = _splitmix64(_splitmix64(_splitmix64(torch.full_like(ids, _to_int64(seed))) ^ ids) ^ views)
        offsets = flip = None
        if self.crop:
            span = 2 * self.crop + 1
            rows = _logical_shift(_splitmix64(key + 1), 11) % span  # 53 high bits: negligible modulo bias
            cols = _logical_shift(_splitmix64(key + 2), 11) % span
            offsets = torch.stack([rows, cols])
        if self.flip:
            flip = _splitmix64(key + 3) < 0  # the top bit
        return AugParams(offsets, flip)

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """``x`` (B, C, H, W) augmented with ``params`` (already on ``x``'s device).

        Pure device work -- no host synchronisation and no CPU tensors -- so it can be captured in a
        CUDA graph whose parameter buffers are refilled in place before each replay.
        """
        if x.dim() != 4:
            raise ValueError(f"augment expects images shaped (B, C, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        if self.crop:
            if params.offsets is None or params.offsets.shape != (2, b):
                raise ValueError(f"params.offsets: {str(self)} needs (2, {b}) crop offsets, got "
                                 f"{None if params.offsets is None else tuple(params.offsets.shape)}")
            x = translate(x, params.offsets, self.crop)
        if self.flip:
            if params.flip is None or params.flip.shape != (b,):
                raise ValueError(f"params.flip: {str(self)} needs a ({b},) flip mask, got "
                                 f"{None if params.flip is None else tuple(params.flip.shape)}")
            x = torch.where(params.flip.view(b, 1, 1, 1), x.flip(-1), x)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` augmented with fresh parameters from ``generator`` (drawn on the CPU, then moved)."""
        if self.is_identity:
            return x
        return self.apply(x, self.draw(x.shape[0], generator).to(x.device))


def parse_augment(spec: "str | Sequence[str] | Augment | None") -> Augment:
    """An :class:`Augment` from a comma-separated spec such as ``"crop2,flip"``.

    Ops: ``cropN`` (zero-padded random crop = translation by up to N pixels), ``jitterN`` (an alias of
    ``cropN``), ``flip`` (horizontal flip with probability 0.5). ``None``, ``""``, ``"none"`` and an empty
    list mean no augmentation. A list holds one op per item.
    """
    if isinstance(spec, Augment):
        return spec
    if spec is None:
        return Augment()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    ops = [str(op).strip() for op in items]
    ops = [op for op in ops if op]
    if ops == ["none"]:
        return Augment()
    crop, flip, seen = 0, False, {}
    for op in ops:
        name, n = _parse_op(op)
        kind = "crop" if name in ("crop", "jitter") else name
        if kind in seen:
            raise ValueError(f"train.augment: {op!r} repeats {seen[kind]!r} (jitterN is an alias of cropN); "
                             "give each op once")
        seen[kind] = op
        if kind == "crop":
            crop = n
        else:
            flip = True
    return Augment(crop=crop, flip=flip)


def _parse_op(op: str) -> tuple[str, int | None]:
    """(name, N) of one op, with errors that say what is known and what was probably meant."""
    m = _OP_RE.match(op)
    name, digits = (m.group(1), m.group(2)) if m else (re.sub(r"[^a-z_]", "", op), None)
    if not m or name not in _KNOWN_OPS:
        close = difflib.get_close_matches(name, _KNOWN_OPS, n=1, cutoff=0.6)
        hint = ""
        if close:
            number = "" if close[0] == "flip" else digits or "<N>"
            hint = f" (did you mean {close[0] + number!r}?)"
        raise ValueError(f"train.augment: unknown op {op!r}; known: {_KNOWN_TEXT}{hint}")
    if name == "flip":
        if digits is not None:
            raise ValueError(f"train.augment: {op!r}: flip takes no number")
        return name, None
    if digits is None:
        raise ValueError(f"train.augment: {op!r}: {name} needs a pixel count, e.g. {name}2")
    n = int(digits)
    if n < 1:
        raise ValueError(f"train.augment: {op!r}: N must be >= 1 (omit the op for no {name}), got {n}")
    return name, n


# --------------------------------------------------------------------------- hashing for views

_MASK64 = (1 << 64) - 1


def _to_int64(v: int) -> int:
    """A Python int reduced mod 2^64 into int64's signed range (two's complement)."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA, _MIX1, _MIX2 = (_to_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _logical_shift(z: torch.Tensor, k: int) -> torch.Tensor:
    """``z >>> k`` on int64: torch's ``>>`` is arithmetic, so mask off the copied sign bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Vectorised splitmix64 finaliser (Steele et al. 2014) on int64 tensors, wrapping mod 2^64.

    A bijection of 64-bit integers with good avalanche: nearby inputs (consecutive ids) give unrelated
    outputs, which is what makes per-sample parameters independent of batch composition.
    """
    z = x + _GAMMA
    z = (z ^ _logical_shift(z, 30)) * _MIX1
    z = (z ^ _logical_shift(z, 27)) * _MIX2
    return z ^ _logical_shift(z, 31)


# --------------------------------------------------------------------------- per-channel scaling


def _per_channel(value, c: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """``value`` (length ``c``) as a (1, c, 1, 1) tensor of ``like``'s dtype and device."""
    v = torch.as_tensor(value)
    if v.dim() != 1 or v.numel() != c:
        raise ValueError(f"{name}: need one value per channel ({c}), got shape {tuple(v.shape)}")
    return v.to(like.device, like.dtype).view(1, c, 1, 1)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of a (B, C, H, W) batch; ``mean`` and ``std`` have length C.

    Pass device tensors (of ``x``'s dtype) inside a training step to avoid a host-to-device copy per
    call. Non-positive ``std`` given on the CPU is rejected.
    """
    if x.dim() != 4:
        raise ValueError(f"normalize expects images shaped (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"normalize: x must be floating point, got {x.dtype}")
    c = x.shape[1]
    m, s = _per_channel(mean, c, "mean", x), _per_channel(std, c, "std", x)
    if not (isinstance(std, torch.Tensor) and std.device.type != "cpu"):
        if not bool((torch.as_tensor(std, dtype=torch.float64) > 0).all()):
            raise ValueError(f"std: every channel's std must be > 0, got {torch.as_tensor(std).tolist()}")
    return (x - m) / s


def channel_stats(x: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of ``x`` (N, C, H, W) over N, H and W, as float64 (C,) tensors.

    ``batch`` images at a time are converted to float64 and their (count, mean, sum of squared
    deviations) merged by Chan et al.'s pairwise update, so data too big to hold twice need not be
    copied whole, and large means do not cancel the variance. ``std`` is the population std (divisor
    N H W), the usual convention for normalisation constants.
    """
    if x.dim() != 4:
        raise ValueError(f"channel_stats expects images shaped (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"channel_stats: x is empty, shape {tuple(x.shape)}")
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    work = torch.device("cpu") if x.device.type == "mps" else x.device  # MPS has no float64
    count, mean, m2 = 0, torch.zeros(x.shape[1], dtype=torch.float64, device=work), None
    for start in range(0, x.shape[0], batch):
        chunk = x[start : start + batch].to(work, torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        n = chunk.shape[1]
        c_mean = chunk.mean(dim=1)
        c_m2 = (chunk - c_mean[:, None]).square().sum(dim=1)
        if m2 is None:
            count, mean, m2 = n, c_mean, c_m2
            continue
        delta, total = c_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + c_m2 + delta.square() * (count * n / total)
        count = total
    return mean, (m2 / count).sqrt()
