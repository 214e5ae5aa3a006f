"""Reading a split in batches, whichever kind it is: slices of in-memory tensors, or a ``DataLoader`` over
a streamed :class:`~kdistill.data.dataset.StreamData` (workers decode while the model computes)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .dataset import Split, StreamData, TensorData


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
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long), torch.as_tensor(sid, dtype=torch.long)


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
