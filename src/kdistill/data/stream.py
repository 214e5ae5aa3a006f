"""Reading a split in batches, whichever kind it is: slices of in-memory tensors, or a ``DataLoader`` over
a streamed :class:`~kdistill.data.dataset.StreamData` (workers decode while the model computes).

A batch's inputs are a tensor or, for models that take keyword arguments (Hugging Face's ``input_ids``,
``attention_mask``), a dict of tensors with one row per sample; the ``*_inputs`` helpers move, slice and
compare either kind. Integer inputs (token ids) stay integers: only floats, ``uint8`` (scaled by 1/255, as
in memory) and ``bool`` become float32 when an item is read.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdistill.data.dataset import IGNORE_LABEL, Split, StreamData, TensorData

Inputs = torch.Tensor | dict[str, torch.Tensor]
"""One batch's inputs: a tensor, or a dict of tensors passed to the model as keyword arguments."""


def as_input(x: Any) -> Inputs:
    """One item's input as a tensor (or a dict of them): float and ``bool`` data as float32, ``uint8``
    (8-bit pixels, e.g. from ``PILToTensor``) scaled by 1/255 into float32 as in-memory arrays are, other
    integers as int64, so token ids reach an embedding layer as ids."""
    if isinstance(x, Mapping):
        return {str(k): as_input(v) for k, v in x.items()}
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if t.is_floating_point() or t.dtype == torch.bool:
        return t.to(torch.float32)
    return t.to(torch.long) if not t.is_complex() else t


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], x: Inputs) -> Inputs:
    """``fn`` applied to the tensor ``x`` or to every tensor of the dict ``x``."""
    return {k: fn(v) for k, v in x.items()} if isinstance(x, Mapping) else fn(x)


def inputs_to(x: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    return map_inputs(lambda t: t.to(device, non_blocking=non_blocking), x)


def inputs_len(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def inputs_rows(x: Inputs, rows: slice | torch.Tensor) -> Inputs:
    """Rows ``rows`` (a slice or an index tensor) of every input tensor."""
    return map_inputs(lambda t: t[rows], x)


def chunk_inputs(x: Inputs, k: int) -> list[Inputs]:
    """``x`` split into ``k`` micro-batches along the rows, as ``torch.chunk`` does."""
    if not isinstance(x, Mapping):
        return list(x.chunk(k))
    parts = {name: t.chunk(k) for name, t in x.items()}
    return [{name: p[i] for name, p in parts.items()} for i in range(len(next(iter(parts.values()))))]


def describe_inputs(x: Inputs) -> str:
    """One sample's shape (and, for integers, dtype) for messages: ``(3, 32, 32)``, ``{input_ids: (8,) int64}``."""
    def one(t: torch.Tensor) -> str:
        dtype = "" if t.is_floating_point() else f" {str(t.dtype).removeprefix('torch.')}"
        return f"{tuple(t.shape[1:])}{dtype}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in x.items()) + "}"
    return one(x)


def same_inputs(a: Any, b: Any) -> bool:
    """Whether two reads of one item gave the same inputs (tensors, arrays or dicts of them)."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(same_inputs(a[k], b[k]) for k in a))
    ta, tb = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a), \
        torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b)
    return ta.shape == tb.shape and ta.dtype == tb.dtype and bool(torch.equal(ta, tb))


def mask_padding(x: Inputs, y: torch.Tensor) -> torch.Tensor:
    """Per-position labels with -100 (not scored) wherever dict inputs carry an ``attention_mask`` of 0 (padding),
    so a padded position never counts even when its label was left as a token id; other labels as given."""
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    if mask is None or y.dim() < 1 or tuple(mask.shape) != tuple(y.shape):
        return y
    return y.masked_fill(mask == 0, IGNORE_LABEL)


class WithIds(torch.utils.data.Dataset):
    """Items of ``dataset`` as ``(x, y, sample_id)``: the item's own id when it has one, else ``index[i]``."""

    def __init__(self, dataset, index: torch.Tensor) -> None:
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"data: a Dataset item must be (x, y) or (x, y, sample_id), got {type(item).__name__}"
                             + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
        x, y = item[0], item[1]
        sid = item[2] if len(item) == 3 else self.index[i]
        x = as_input(x)
        return x, mask_padding(x, torch.as_tensor(y, dtype=torch.long)), torch.as_tensor(sid, dtype=torch.long)


class EpochBatches:
    """A batch sampler whose batches are replaced before each epoch: one ``DataLoader`` over it keeps its
    worker processes alive from epoch to epoch (``persistent_workers``) instead of starting them anew."""

    def __init__(self) -> None:
        self.batches: Sequence[Sequence[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader(data: StreamData, batches: Sequence[Sequence[int]] | EpochBatches, workers: int = 0,
           pin: bool = False) -> DataLoader:
    """A ``DataLoader`` yielding ``(x, y, ids)`` for the given batches of item positions, in that order.

    Given an :class:`EpochBatches`, the workers persist between iterations (refill its ``batches`` first)."""
    return DataLoader(WithIds(data.dataset, data.index), batch_sampler=batches, num_workers=workers,
                      pin_memory=pin, persistent_workers=bool(workers) and isinstance(batches, EpochBatches),
                      prefetch_factor=4 if workers else None)


def iterate(data: Split, batch_size: int = 1024, workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, y, ids)`` batches of ``data`` in order, on the CPU (or where a TensorData's tensors live)."""
    n = len(data)
    if isinstance(data, TensorData):
        for i in range(0, n, batch_size):
            yield data.x[i : i + batch_size], data.y[i : i + batch_size], data.index[i : i + batch_size]
        return
    batches = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    yield from loader(data, batches, workers)


def labels_of(data: Split) -> torch.Tensor:
    """Every label of ``data`` in order (read through the loader when a streamed split does not list them)."""
    if isinstance(data, TensorData):
        return data.y
    if data.labels is not None:
        return data.labels.long()
    return torch.cat([y for _, y, _ in iterate(data)])


RANDOM_TRANSFORMS = ("ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "GaussianBlur",
                     "ElasticTransform", "GaussianNoise", "Mixup", "CutMix")
"""Transforms (besides ``Random*``) of torchvision and timm that draw new parameters on every call."""


def random_transform(dataset: Any) -> str | None:
    """The class name of a random transform ``dataset`` applies to its items (a torchvision/timm
    ``Random*``, ``ColorJitter``, ``RandAugment``, ...), found through ``transform``/``transforms``
    attributes, ``Compose`` lists and wrappers' ``dataset``/``datasets``; None when there is none."""
    queue: deque[tuple[Any, bool]] = deque([(dataset, False)])  # breadth first: the first declared is named
    seen: set[int] = set()
    while queue and len(seen) < 500:
        obj, is_transform = queue.popleft()
        if id(obj) in seen or isinstance(obj, (str, bytes, torch.Tensor, np.ndarray)):
            continue
        seen.add(id(obj))
        name = type(obj).__name__
        if is_transform and (name.startswith("Random") or name in RANDOM_TRANSFORMS):
            return name
        for attr in ("dataset", "datasets", "transform", "transforms"):
            value = getattr(obj, attr, None)
            if value is not None:
                inner = is_transform or attr.startswith("transform")
                queue.extend((v, inner) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return None


def changing_items(data: StreamData, items: int = 4, reads: int = 3) -> str | None:
    """Why ``data``'s items may differ from one read to the next (random transforms), or None when they
    look deterministic: a random transform is declared, or one of ``items`` items spread over the split,
    each read ``reads`` times, gave different inputs. The global RNGs (torch, numpy, ``random``) are put
    back afterwards, so probing changes none of the run's later draws."""
    name = random_transform(data.dataset)
    if name is not None:
        return f"its transform {name} is random"
    n = len(data)
    picks = sorted({round(i * (n - 1) / max(1, items - 1)) for i in range(min(n, items))})
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        for i in picks:
            first = data.dataset[i][0]
            for _ in range(reads - 1):
                if not same_inputs(first, data.dataset[i][0]):
                    return f"reading item {i} twice gave different inputs"
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
    return None


def integer_hint(x: Inputs) -> str:
    """For an error about a model that failed on integer inputs: why they are integers and the fix."""
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        return (f"; the inputs are {str(x.dtype).removeprefix('torch.')}: integer inputs stay integers (token ids "
                "for an embedding); for numeric features pass floats (e.g. x.astype('float32'))")
    return ""
